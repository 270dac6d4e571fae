"""Tell stories with a trained model.

    python -m tsg.generate --model runs/tiny_cpu --prompt "Once upon a time" -n 3
    python -m tsg.generate --model runs/tiny_cpu -q "Once upon a time" -n 1            # streams the story as it grows
    python -m tsg.generate --model runs/tiny_cpu --prompts_file prompts.txt -n 2 --output stories.jsonl
    python -m tsg.generate --model runs/tiny_cpu -q "Tom had a dog" --banned_words dog cat --greedy
    python -m tsg.generate --model runs/csv_run -q "Once upon a time" --start_marker "<|startoftext|>"
    python -m tsg.generate --model runs/lora_run -q "Once upon a time" --quantization 4bit
    python -m tsg.generate --model runs/tiny_cpu -q "Once upon a time" --compile   # static KV cache, compiled steps
    python -m tsg.generate --config generate.yaml --temperature 0.7       # the command line overrides the file
    make generate PROMPT="Once upon a time" MODEL=runs/tiny_cpu ARGS="-n 3"

`--model` is a folder saved by `tsg.train` (model and tokenizer), an adapter run (a folder with
`adapter_config.json`: merged once into RUN/merged by `tsg.merge`), or a hub name. Each story stops at the
end-of-story token (eos) or at `--end_marker`; stories are printed without markers or special tokens.
One story from one prompt without `--output` is streamed token by token; otherwise the prompts are told in
batches of `--batch_size` (left padding) and the stories are printed numbered. `--output FILE.csv|.jsonl`
also writes one row per story: the prompt, the story and every generation setting.

`--config FILE` (JSON or YAML) takes the long option names as keys (`temperature`, `banned_words`, ...);
keys that start with `//` are comments. Bad input stops with exit code 2 and one line
`tsg.generate: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, GenerationConfig, TextStreamer, set_seed
from transformers.utils import logging as hf_logging

from tsg.config import COMMENT_PREFIX
from tsg.model import context_length, keep_standard_4bit_layout, with_pad_token

PROG = "tsg.generate"
DEFAULT_PROMPT = "Once upon a time"
OUTPUT_FORMATS = (".csv", ".jsonl")
QUANTIZATIONS = ("none", "8bit", "4bit")
MAX_SPELLINGS = 20_000  # token sequences per banned word (all variants): ~15 letters with a 4k vocabulary


class GenerateError(ValueError):
    """Bad input: the message is one line that names the option and what is expected."""


@dataclass(frozen=True)
class Settings:
    """How stories are told: everything that, with the model and the prompt, decides the stories."""

    max_new_tokens: int = 200
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0
    banned_words: tuple[str, ...] = ()
    start_marker: str = ""
    end_marker: str = ""
    batch_size: int = 8

    def check(self) -> None:
        for name in ("max_new_tokens", "num_beams", "num_return_sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerateError(f"--{name}: expected a positive integer, got {getattr(self, name)}")
        if self.do_sample and self.temperature <= 0:
            raise GenerateError(f"--temperature: expected a positive number when sampling, got {self.temperature} "
                                "(use --greedy for the likeliest tokens)")
        if self.top_k < 0:
            raise GenerateError(f"--top_k: expected 0 (off) or a positive integer, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"--top_p: expected a number in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerateError(f"--repetition_penalty: expected a positive number, got {self.repetition_penalty}")
        if not self.do_sample and self.num_beams == 1 and self.num_return_sequences > 1:
            raise GenerateError(f"--num_return_sequences={self.num_return_sequences} with --greedy would tell the same "
                                "story each time: sample (--do_sample) or use --num_beams >= --num_return_sequences")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerateError(f"--num_return_sequences={self.num_return_sequences} is more than "
                                f"--num_beams={self.num_beams}: beam search returns at most one story per beam")
        if any(not word.strip() for word in self.banned_words):
            raise GenerateError("--banned_words: a banned word is empty")

    def record(self) -> dict:
        """The settings in effect, for the rows of --output (sampling-only and beam-only ones blank when unused)."""
        values = asdict(self)
        if not self.do_sample:
            values.update(temperature=None, top_k=None, top_p=None)
        if self.num_beams == 1:
            values["length_penalty"] = None
        values["banned_words"] = " ".join(self.banned_words)
        return values


@dataclass(frozen=True)
class Story:
    prompt: str
    number: int  # 1..num_return_sequences among the stories of this prompt
    text: str  # the prompt and its continuation, without markers
    tokens: int = 0  # new tokens generated, the end-of-story token included


# --- the model ---


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local folder rather than a hub name (`gpt2`, `org/model`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def resolve_model_dir(name: str) -> str:
    """The folder or hub name to load: an adapter run becomes its merged folder; a missing local folder is an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return merged_adapter_run(path, name)
        if not (path / "config.json").is_file():
            raise GenerateError(f"--model {name}: not a model folder (no config.json, nor adapter_config.json "
                                "for an adapter run)")
        return str(path)
    if path.exists():
        raise GenerateError(f"--model {name}: not a folder")
    if looks_like_path(name):
        raise GenerateError(f"--model {name}: no such folder")
    return name


def merged_adapter_run(path: Path, name: str) -> str:
    """The folder of an adapter run's merged model (tsg.merge merges it once into RUN/merged)."""
    import importlib

    try:
        merging = importlib.import_module("tsg.merge")  # only adapter runs need it
        return str(merging.merged_model_dir(path))
    except ImportError as e:
        raise GenerateError(f"--model {name}: an adapter run, but tsg.merge cannot be imported ({e})") from None
    except (merging.MergeError, OSError, ValueError) as e:
        raise GenerateError(f"--model {name}: the adapter run could not be merged ({' '.join(str(e).split())[:200]})"
                            ) from None


def pick_device(device: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cpu, cuda and cuda:N are checked."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise GenerateError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise GenerateError(f"--device {device}: no such CUDA GPU is visible "
                                f"({torch.cuda.device_count()} visible)")
    return device


def quantization_config(quantization: str, device: str):
    """A BitsAndBytesConfig for 8-bit or 4-bit (NF4) inference, or None."""
    if quantization not in QUANTIZATIONS:
        raise GenerateError(f"--quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise GenerateError(f"--quantization {quantization}: bitsandbytes is not installed") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        # bitsandbytes casts each fp32 activation to fp16 and logs it at every layer call: an expected step here
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load_model(name: str, quantization: str = "none", device: str = "auto"):
    """Model (eval mode, on `device`) and tokenizer (pad = eos when it has none, left padding)."""
    device = pick_device(device)
    quantize = quantization_config(quantization, device)
    folder = resolve_model_dir(name)
    try:
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(folder))
        if quantize is None:
            model = AutoModelForCausalLM.from_pretrained(folder).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantize,
                                                         device_map={"": device})
    except (OSError, ValueError, ImportError) as e:
        raise GenerateError(f"--model {name}: no model could be loaded ({' '.join(str(e).split())[:200]})") from None
    tokenizer.padding_side = "left"
    if quantization == "4bit" and device == "cpu":
        keep_standard_4bit_layout(model, unpackable_only=True)
    return model.eval(), tokenizer


# --- banned words ---


def word_variants(word: str) -> list[str]:
    """The word, with a leading space, capitalised, capitalised with a leading space."""
    word = word.strip()
    capital = word[:1].upper() + word[1:]
    return list(dict.fromkeys([word, " " + word, capital, " " + capital]))


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in a token's text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_pieces(tokenizer) -> dict[bytes, list[int]]:
    """The UTF-8 bytes each vocabulary token stands for -> the ids that stand for them (special tokens left out).

    Byte-level BPE tokens (GPT-2 style) are read byte by byte, so that tokens holding part of a character count.
    Other tokenizers' tokens are decoded after an anchor token, so that a leading space survives decoders that
    strip it at the start of a text (SentencePiece); tokens that decode to part of a character are left out."""
    special = set(tokenizer.all_special_ids)
    pieces: dict[bytes, list[int]] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        alphabet = byte_level_alphabet()
        for token, i in tokenizer.get_vocab().items():
            if i not in special and token and all(c in alphabet for c in token):
                pieces.setdefault(bytes(alphabet[c] for c in token), []).append(i)
        return pieces
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[anchor, i] for i in ids], clean_up_tokenization_spaces=False)
    for i, text in zip(ids, texts):
        piece = text[len(prefix):]
        if text.startswith(prefix) and piece and "\ufffd" not in piece:
            pieces.setdefault(piece.encode("utf-8"), []).append(i)
    return pieces


def count_spellings(data: bytes, pieces: dict[bytes, list[int]]) -> int:
    """How many token sequences spell `data` (counted from the end, without listing them)."""
    longest = max(map(len, pieces), default=0)
    counts = [0] * len(data) + [1]
    for start in range(len(data) - 1, -1, -1):
        counts[start] = sum(len(pieces.get(data[start:end], ())) * counts[end]
                            for end in range(start + 1, min(len(data), start + longest) + 1))
    return counts[0]


def spellings(text: str, pieces: dict[bytes, list[int]]) -> list[list[int]]:
    """Every sequence of token ids whose pieces, joined, are exactly `text` (depth-first over its UTF-8 bytes)."""
    data = text.encode("utf-8")
    longest = max(map(len, pieces), default=0)

    @lru_cache(maxsize=None)
    def from_position(start: int) -> tuple[tuple[int, ...], ...]:
        if start == len(data):
            return ((),)
        found = []
        for end in range(start + 1, min(len(data), start + longest) + 1):
            for token in pieces.get(data[start:end], ()):
                found += [(token, *rest) for rest in from_position(end)]
        return tuple(found)

    return [list(sequence) for sequence in from_position(0)]


def banned_token_sequences(tokenizer, words) -> list[list[int]]:
    """bad_words_ids for `words`: every tokenization of every variant (see word_variants) of each word."""
    if not words:
        return []
    pieces = token_pieces(tokenizer)
    sequences = set()
    for word in words:
        count = sum(count_spellings(variant.encode("utf-8"), pieces) for variant in word_variants(word))
        if count > MAX_SPELLINGS:
            raise GenerateError(f"--banned_words: {word.strip()!r} has {count:,} tokenizations with this vocabulary, "
                                f"more than the {MAX_SPELLINGS:,} that can be banned: ban a shorter word")
        sequences.update(tuple(s) for variant in word_variants(word) for s in spellings(variant, pieces))
    return sorted(map(list, sequences))


# --- telling stories ---


def prompt_texts(prompts, start_marker: str) -> list[str]:
    """What the model reads: each prompt after the start marker. Empty prompts are an error."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise GenerateError("--prompt: no prompts")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise GenerateError(f"--prompt: {which} is empty")
    return [start_marker + prompt for prompt in prompts]


def fit_to_context(model, tokenizer, prompts, settings: Settings) -> Settings:
    """Settings whose max_new_tokens fits the model's context after the longest prompt; a prompt that fills the
    context is an error."""
    context = context_length(model.config)
    if context is None:
        return settings
    lengths = [len(ids) for ids in tokenizer(prompt_texts(prompts, settings.start_marker))["input_ids"]]
    longest = max(lengths)
    if longest >= context:
        which = "the prompt" if len(lengths) == 1 else f"prompt {lengths.index(longest) + 1}"
        raise GenerateError(f"--prompt: {which} is {longest} tokens long, but the model's context is {context} "
                            "tokens: shorten it")
    if longest + settings.max_new_tokens > context:
        print(f"{PROG}: note: --max_new_tokens {settings.max_new_tokens} lowered to {context - longest}: the "
              f"longest prompt is {longest} tokens and the model's context {context}", file=sys.stderr)
        return replace(settings, max_new_tokens=context - longest)
    return settings


def stop_conditions(model, tokenizer, end_marker: str) -> tuple[list[int], list[str] | None]:
    """(eos token ids, stop strings): the eos token(s), and the end marker as a token or as a stop string."""
    eos = model.generation_config.eos_token_id
    eos_ids = [tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])
    stop_strings = None
    if end_marker and end_marker != tokenizer.eos_token:
        if end_marker in tokenizer.get_added_vocab():
            eos_ids.append(tokenizer.convert_tokens_to_ids(end_marker))
        else:
            stop_strings = [end_marker]
    return list(dict.fromkeys(i for i in eos_ids if i is not None)), stop_strings


def compiled_decoding(model, settings: Settings) -> dict:
    """GenerationConfig fields for a static KV cache and torch.compile'd decoding steps (`--compile`).

    generate() compiles the model's forward once per cache shape (batch, prompt + new tokens; a later, shorter call
    reuses the larger cache) and runs every decoding step through it: no Python per layer and token. transformers
    auto-compiles only on GPUs; on a CPU the compile config is marked for every device (CUDA graphs, the GPU's
    `reduce-overhead` mode, do not exist there). Beam search and models without a compilable forward keep the
    dynamic cache."""
    if settings.num_beams > 1 or not getattr(model, "_can_compile_fullgraph", False):
        return {}
    on_gpu = model.device.type == "cuda"
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if on_gpu else "default")
    compile_config._compile_all_devices = not on_gpu
    return {"cache_implementation": "static", "compile_config": compile_config}


def generation_config(model, tokenizer, settings: Settings, compile: bool = False) -> GenerationConfig:
    """The GenerationConfig for `settings`: decoding strategy, banned words, where stories stop; with `compile`, a
    static KV cache and compiled decoding steps (see compiled_decoding)."""
    eos_ids, stop_strings = stop_conditions(model, tokenizer, settings.end_marker)
    sampling = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        **(sampling if settings.do_sample else {}),
        repetition_penalty=settings.repetition_penalty,
        num_beams=settings.num_beams,
        **({"length_penalty": settings.length_penalty} if settings.num_beams > 1 else {}),
        num_return_sequences=settings.num_return_sequences,
        bad_words_ids=banned_token_sequences(tokenizer, settings.banned_words) or None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=stop_strings,
        use_cache=True,
        **(compiled_decoding(model, settings) if compile else {}),
    )


def clean_story(text: str, prompt: str, start_marker: str, end_marker: str) -> str:
    """A decoded story without its markers, ending before the first end marker after the prompt."""
    if start_marker:
        text = text.replace(start_marker, "")
    if end_marker:
        end = text.find(end_marker, len(prompt) if text.startswith(prompt) else 0)
        text = text if end < 0 else text[:end]
    return text.strip()


class StoryStreamer(TextStreamer):
    """TextStreamer that prints the story without special tokens or markers (a marker may come over several tokens)
    and stops printing at the first end marker after the prompt."""

    def __init__(self, tokenizer, prompt: str = "", start_marker: str = "", end_marker: str = ""):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.prompt, self.start_marker, self.end_marker = prompt, start_marker, end_marker
        self.held = ""  # text not printed yet: it may be the start of a marker
        self.shown = 0  # characters printed so far
        self.ended = False  # the end marker went by: print nothing more

    def on_finalized_text(self, text: str, stream_end: bool = False):
        text = "" if self.ended else self.held + text
        if self.start_marker:
            text = text.replace(self.start_marker, "")
        end = text.find(self.end_marker, max(0, len(self.prompt) - self.shown)) if self.end_marker else -1
        if end >= 0:
            text, self.ended = text[:end], True
        keep = 0 if stream_end or self.ended else self._marker_start(text)
        self.held = text[len(text) - keep:] if keep else ""
        self.shown += len(text) - keep
        print(text[:len(text) - keep], end="\n" if stream_end else "", flush=True)
        if stream_end:
            self.held, self.shown, self.ended = "", 0, False

    def _marker_start(self, text: str) -> int:
        """Length of the longest end of `text` that begins a marker."""
        markers = [m for m in (self.start_marker, self.end_marker) if m]
        return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def new_token_counts(new: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Tokens each row of `new` (the generated part of generate()'s output) told: up to and including its first
    end-of-story token (generate() pads a finished row with the pad token, which may be that same token)."""
    ended = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, new.shape[1])
    return first_end.tolist()


@contextlib.contextmanager
def decoding_layout(model):
    """While stories are told on a CPU, the output layer's weight is laid out [hidden, vocab] in memory (the same
    values, transposed strides); on exit the original tensor is put back, so the model saves and trains as before.

    Each decoding step multiplies one row per story by that weight, and the BLAS reads a one-row product from the
    usual [vocab, hidden] layout at a fraction of the memory bandwidth: 4.1 ms against 1.6 ms for a 32000 x 288
    head on a 2-core EPYC, the same at thousands of rows (`make bench`: single stream). The head is the largest
    matrix of a small model. Tied input embeddings share the laid-out weight (a lookup of a few rows a step)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (type(head) is not torch.nn.Linear or weight is None or weight.device.type != "cpu"
            or not weight.is_floating_point() or not weight.is_contiguous()):
        yield
        return
    embeddings = model.get_input_embeddings()
    tied = getattr(embeddings, "weight", None) is weight
    laid_out = torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
    head.weight = laid_out
    if tied:
        embeddings.weight = laid_out
    try:
        yield
    finally:
        head.weight = weight
        if tied:
            embeddings.weight = weight


def generate_batches(model, tokenizer, texts: list[str], config: GenerationConfig, batch_size: int,
                     streamer=None, progress: bool = False):
    """generate() on `texts` in left-padded batches: (index of the batch's first text, the output, its generated
    part) for each batch, in order. The caller sets the seed once before the first batch."""
    from tqdm.auto import tqdm

    with decoding_layout(model):  # laid out once for all the batches
        for first in tqdm(range(0, len(texts), batch_size), desc="Telling stories", unit="batch",
                          disable=not progress):
            inputs = tokenizer(texts[first:first + batch_size], return_tensors="pt", padding=True,
                               padding_side="left").to(model.device)
            with torch.inference_mode():
                output = model.generate(**inputs, generation_config=config, streamer=streamer,
                                        **({"tokenizer": tokenizer} if config.stop_strings else {}))
            yield first, output, output[:, inputs["input_ids"].shape[1]:]


def tell_stories(model, tokenizer, prompts, settings: Settings | None = None, *, stream: bool = False,
                 compile: bool = False, **overrides) -> list[Story]:
    """`num_return_sequences` stories for each prompt (a string or a list), told in batches of `batch_size` with
    left padding, or streamed to stdout (`stream`: one prompt, one story, no beam search). `compile`: a static KV
    cache and compiled decoding steps (a one-time compile, then faster tokens). Keyword overrides replace fields
    of `settings`, e.g. `tell_stories(model, tokenizer, "Once", num_return_sequences=3)`."""
    settings = replace(settings or Settings(), **overrides)
    settings.check()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = prompt_texts(prompts, settings.start_marker)
    settings = fit_to_context(model, tokenizer, prompts, settings)
    if stream and (len(prompts) > 1 or settings.num_return_sequences > 1 or settings.num_beams > 1):
        raise GenerateError("streaming tells one story from one prompt, without beam search")
    config = generation_config(model, tokenizer, settings, compile)
    streamer = StoryStreamer(tokenizer, prompts[0], settings.start_marker, settings.end_marker) if stream else None
    set_seed(settings.seed)
    stories = []
    for first, output, new in generate_batches(model, tokenizer, texts, config, settings.batch_size, streamer):
        decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
        counts = new_token_counts(new, config.eos_token_id)
        for row, (text, tokens) in enumerate(zip(decoded, counts)):
            index, number = divmod(row, settings.num_return_sequences)
            story = clean_story(text, prompts[first + index], settings.start_marker, settings.end_marker)
            stories.append(Story(prompts[first + index], number + 1, story, tokens))
    return stories


# --- files ---


def check_output_path(path: str) -> Path:
    output = Path(path)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise GenerateError(f"--output {path}: expected a .csv or .jsonl file name, got {output.suffix or 'none'!r}")
    if output.is_dir():
        raise GenerateError(f"--output {path}: is a folder")
    return output


def write_stories(path, stories: list[Story], record: dict) -> Path:
    """One row per story, the settings in `record` beside it, as CSV or JSON lines (atomically: temp file, rename)."""
    output = check_output_path(str(path))
    rows = [{"prompt": s.prompt, "number": s.number, "story": s.text, **record} for s in stories]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if output.suffix.lower() == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["prompt", "number", "story"])
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def read_lines(path: str, option: str) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    file = Path(path)
    if not file.is_file():
        raise GenerateError(f"{option} {path}: no such file")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise GenerateError(f"{option} {path}: the file holds no lines")
    return lines


# --- the command line ---


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one-line exceptions instead of a usage screen."""

    def error(self, message):
        raise GenerateError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tsg.generate", description="\n\n".join(__doc__.split("\n\n")[:2]),
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                     epilog="Each long option is also a key of --config.")
    add = parser.add_argument
    add("--config", metavar="FILE", help="JSON or YAML file of options (long names as keys; `//` keys are comments)")
    add("--model", metavar="DIR", help="folder saved by tsg.train, an adapter run (adapter_config.json), or a hub name")
    add("--prompt", "-q", metavar="TEXT", help=f"how the story starts (default: {DEFAULT_PROMPT!r} unless "
        "--prompts_file gives prompts; with it, this prompt comes first)")
    add("--prompts_file", metavar="FILE", help="text file of prompts, one a line (blank lines skipped)")
    add("--num_return_sequences", "-n", metavar="N", type=int, default=1, help="stories per prompt")
    add("--seed", "-rnd", metavar="N", type=int, default=0,
        help="random seed: same seed, settings and model, same stories")
    add("--max_new_tokens", metavar="N", type=int, default=200, help="most tokens added to each prompt")
    add("--do_sample", dest="do_sample", action="store_true", default=True, help="sample the tokens (default)")
    add("--greedy", dest="do_sample", action="store_false", help="take the likeliest token (or beams) instead")
    add("--temperature", type=float, default=1.0, help="sampling temperature, > 0")
    add("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    add("--top_p", type=float, default=1.0, help="nucleus sampling: the likeliest tokens that cover this share")
    add("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    add("--num_beams", type=int, default=1, help="beam search with this many beams (1: none)")
    add("--length_penalty", type=float, default=1.0, help="beam search: > 0 favours longer stories, < 0 shorter")
    add("--banned_words", nargs="+", default=[], metavar="WORD",
        help="words never told, in any tokenization, with a leading space or capitalised")
    add("--banned_words_file", metavar="FILE", help="text file of banned words, one a line")
    add("--start_marker", metavar="TEXT", default="",
        help="text put before each prompt (e.g. <|startoftext|> for a model trained on tsg.prepare's CSV)")
    add("--end_marker", metavar="TEXT", default="", help="text that ends a story besides the eos token")
    add("--quantization", choices=QUANTIZATIONS, default="none", help="load the weights in 8 or 4 bits (bitsandbytes)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--batch_size", type=int, default=8, help="prompts generated together, each with its -n stories (left padded)")
    add("--compile", action="store_true", help="static KV cache and torch.compile'd decoding steps: a one-time compile "
        "(tens of seconds on a CPU), then faster tokens; pays off for long stories or many prompts")
    add("--output", metavar="FILE",
        help="also write the stories, one row each with the settings, to FILE.csv or FILE.jsonl (atomically)")
    return parser


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s[2:]: a for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _config_value(action: argparse.Action, key: str, value, source: str):
    """A config file's value checked and converted like the command line would."""
    def bad(expected):
        return GenerateError(f"{source}: {key}: expected {expected}, got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if action.nargs == "+":
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or any(isinstance(v, (list, dict, bool)) or v is None for v in values):
            raise bad("a list of words")
        return [str(v) for v in values]
    if isinstance(value, (list, dict, bool)):
        raise bad("a number" if action.type in (int, float) else "a string")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except ValueError:
        raise bad("an integer" if action.type is int else "a number") from None
    if action.choices and converted not in action.choices:
        raise bad(f"one of {', '.join(action.choices)}")
    return converted


def _unknown_option(words: list[str], parser: argparse.ArgumentParser) -> GenerateError:
    options = [w for w in words if w.startswith("-")]
    if not options:
        return GenerateError(f"unexpected words: {' '.join(words)} (quote a prompt with spaces)")
    name = options[0].split("=", 1)[0]
    known = [s for a in parser._actions for s in a.option_strings]
    close = [k for k in known if k.startswith(name) and len(name) > 2] or difflib.get_close_matches(name, known)
    return GenerateError(f"unknown option {name}" + (f" (did you mean {' or '.join(close[:2])}?)" if close else ""))


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Defaults for `parser` from a flat JSON or YAML file; `//` keys are comments, unknown keys an error."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise GenerateError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise GenerateError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise GenerateError(f"{path}: expected one flat object of keys and values, got {type(values).__name__}")
    actions = {name: a for name, a in _option_actions(parser).items() if name != "config"}
    defaults = {}
    for key, value in values.items():
        key = str(key)  # YAML reads `4:` or `on:` as a number or a boolean
        if key.startswith(COMMENT_PREFIX):
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            raise GenerateError(f"{path}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        if value is not None:
            defaults[actions[key].dest] = _config_value(actions[key], key, value, path)
    return defaults


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options from --config, overridden by the command line."""
    parser = build_parser()
    config = _Parser(add_help=False, allow_abbrev=False)
    config.add_argument("--config")
    known, _ = config.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config(known.config, parser))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_option(unknown, parser)
    if not args.model:
        raise GenerateError("--model: required (a folder saved by tsg.train, an adapter run or a hub name)")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    words = list(args.banned_words) + (read_lines(args.banned_words_file, "--banned_words_file")
                                       if args.banned_words_file else [])
    settings = Settings(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, num_return_sequences=args.num_return_sequences, seed=args.seed,
        banned_words=tuple(dict.fromkeys(w.strip() for w in words)), start_marker=args.start_marker,
        end_marker=args.end_marker, batch_size=args.batch_size,
    )
    settings.check()
    return settings


def prompts_from(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        prompts += read_lines(args.prompts_file, "--prompts_file")
    prompts = prompts or [DEFAULT_PROMPT]
    prompt_texts(prompts, "")  # empty prompts stop here, before the model is loaded
    return prompts


def print_stories(stories: list[Story], several_prompts: bool) -> None:
    for i, story in enumerate(stories, 1):
        where = f" (prompt {story.prompt!r}, {story.number})" if several_prompts else ""
        print(f"--- story {i}{where} ---\n{story.text}\n", flush=True)


@contextlib.contextmanager
def progress_bars_only_on_a_terminal():
    """No weight-loading progress bars when stderr is a file or pipe (they would clutter logs and error output)."""
    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings = settings_from(args)
        prompts = prompts_from(args)
        if args.output:
            check_output_path(args.output)
        with progress_bars_only_on_a_terminal():
            model, tokenizer = load_model(args.model, args.quantization, args.device)
        banned_token_sequences(tokenizer, settings.banned_words)  # a word that cannot be banned stops here
        settings = fit_to_context(model, tokenizer, prompts, settings)
        stream = (not args.output and len(prompts) == 1 and settings.num_return_sequences == 1
                  and settings.num_beams == 1)
        stories = tell_stories(model, tokenizer, prompts, settings, stream=stream, compile=args.compile)
    except GenerateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not stream:
        print_stories(stories, len(prompts) > 1)
    if args.output:
        record = {"model": args.model, "quantization": args.quantization, "device": str(model.device),
                  **settings.record()}
        try:
            path = write_stories(args.output, stories, record)
        except OSError as e:
            print(f"{PROG}: error: --output {args.output}: cannot write ({e.strerror or e})", file=sys.stderr)
            sys.exit(2)
        print(f"{PROG}: wrote {len(stories)} stories to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
