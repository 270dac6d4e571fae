"""Story telling as a library: settings -> GenerationConfig (banned words, where stories stop, an optional compiled
static cache) -> batched, left-padded generate() calls (or one streamed story) -> stories, each with its tokens
counted and whether it reached the end-of-story token.

    model, tokenizer = load_model("runs/tiny_cpu")
    stories = tell_stories(model, tokenizer, ["Once upon a time"], Settings(num_return_sequences=3, seed=7))

`tsg generate` is a short command on top; `tsg evaluate`, the W&B sample-stories callback and `tsg bench` tell their
stories through `tell_stories` too, so the same settings, seed and model give the same stories everywhere.

A model is a folder saved by `tsg train` (model and tokenizer), an adapter run (a folder with
`adapter_config.json`: merged once into RUN/merged, see tsg.adapter), or a hub name. Each story stops at the
end-of-story token (eos) or at `end_marker`; stories are returned without markers or special tokens.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, CompileConfig, GenerationConfig, StoppingCriteria,
                          StoppingCriteriaList, TextStreamer, set_seed)
from transformers.generation.streamers import BaseStreamer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import logging as hf_logging

from tsg import adapter
from tsg.config import option
from tsg.files import UserError, check_weights, one_line, replaced_atomically
from tsg.model import (check_remote_code, context_length, keep_standard_4bit_layout, quantization_config,
                       refused_remote_code, with_pad_token)

OUTPUT_FORMATS = (".csv", ".jsonl")
QUANTIZATIONS = ("none", "8bit", "4bit")
MAX_SPELLINGS = 20_000  # token sequences per banned word (all variants): ~15 letters with a 4k vocabulary

logger = logging.getLogger(__name__)


# (lowest, highest) of each number Settings checks, None where unbounded, for controls that show them (tsg play);
# temperature and top_p must be above their lowest, repetition_penalty too, the others may equal it
LIMITS = {"max_new_tokens": (1, None), "temperature": (0, None), "top_k": (0, None), "top_p": (0, 1),
          "repetition_penalty": (0, None), "num_beams": (1, None), "num_return_sequences": (1, None),
          "seed": (0, 2**32 - 1), "batch_size": (1, None)}


@dataclass(frozen=True)
class Settings:
    """How stories are told: everything that, with the model and the prompt, decides the stories (GenerationConfig's
    names). Checked when made: a bad value is a UserError naming it."""

    max_new_tokens: int = option(200, "Most tokens added to each prompt.")
    do_sample: bool = option(True, "Sample the tokens (false, or --greedy: the likeliest token, or beams).")
    temperature: float = option(1.0, "Sampling temperature, > 0.")
    top_k: int = option(50, "Sample among the k likeliest tokens (0: all).")
    top_p: float = option(1.0, "Nucleus sampling: the likeliest tokens that cover this share.")
    repetition_penalty: float = option(1.0, "> 1 discourages repeating tokens.")
    num_beams: int = option(1, "Beam search with this many beams (1: none).")
    length_penalty: float = option(1.0, "Beam search: > 0 favours longer stories, < 0 shorter.")
    num_return_sequences: int = option(1, "Stories per prompt.", aliases=["-n"])
    seed: int = option(0, "Random seed: same seed, settings and model, same stories.", aliases=["-rnd"])
    banned_words: list[str] = option([], "Words never told, in any tokenization, with a leading space or "
                                         "capitalised.")
    start_marker: str = option("", "Text put before each prompt (e.g. <|startoftext|> for a model trained on "
                                   "tsg prepare's CSV).")
    end_marker: str = option("", "Text that ends a story besides the eos token.")
    batch_size: int = option(8, "Prompts generated together, each with its stories (left padded).")

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "num_return_sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.do_sample and self.temperature <= 0:
            raise UserError(f"temperature: expected a positive number when sampling, got {self.temperature} "
                            "(do_sample false, or --greedy, takes the likeliest tokens)")
        if self.top_k < 0:
            raise UserError(f"top_k: expected 0 (off) or a positive integer, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty: expected a positive number, got {self.repetition_penalty}")
        if not self.do_sample and self.num_beams == 1 and self.num_return_sequences > 1:
            raise UserError(f"num_return_sequences={self.num_return_sequences} without sampling (greedy) would tell "
                            "the same story each time: sample, or use num_beams >= num_return_sequences")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise UserError(f"num_return_sequences={self.num_return_sequences} is more than "
                            f"num_beams={self.num_beams}: beam search returns at most one story per beam")
        if not 0 <= self.seed < 2**32:  # what torch's and llama.cpp's generators take
            raise UserError(f"seed: expected an integer from 0 to {2**32 - 1}, got {self.seed}")
        if any(not word.strip() for word in self.banned_words):
            raise UserError("banned_words: a banned word is empty")
        object.__setattr__(self, "banned_words", list(dict.fromkeys(word.strip() for word in self.banned_words)))

    def record(self) -> dict:
        """The settings in effect, for the rows of an output file (sampling-only and beam-only ones blank when
        unused)."""
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
    continuation: str = ""  # the generated text alone, special tokens left out
    ended: bool = False  # it reached the end-of-story token within max_new_tokens

    @property
    def length(self) -> int:
        """Generated tokens before the end-of-story token."""
        return self.tokens - self.ended


# --- the model ---


@dataclass
class ModelArguments:
    """Which model tells the stories, and how it is loaded (tsg generate's and tsg evaluate's options)."""

    model: Optional[str] = option(None, "Folder saved by tsg train, an adapter run, or a hub name.")
    base_model: Optional[str] = option(None, "An adapter run's base model (default: the one its adapter names).")
    use_peft: Optional[bool] = option(None, "true: model must be an adapter run; false: must not (default: either).")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "Load the weights in 8 or 4 bits (bitsandbytes).")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    allow_changed_base: bool = option(False, "Merge an adapter run even into a base that is not the one it was "
                                      "trained on (its adapter_base.json).")
    trust_remote_code: bool = option(False, "Run Python code the model folder names (auto_map in its config).")

    def __post_init__(self):
        if not self.model:
            raise UserError("model: required (a folder saved by tsg train, an adapter run or a hub name)")
        if not self.model.lower().endswith(".gguf"):  # a GGUF file is llama.cpp's (tsg generate --backend llama.cpp)
            check_model_name(self.model, self.use_peft)
        pick_device(self.device)

    def load(self):
        """(model, tokenizer): see load_model."""
        return load_model(self.model, self.quantization, self.device, self.base_model, self.use_peft,
                          self.allow_changed_base, self.trust_remote_code)


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local folder rather than a hub name (`gpt2`, `org/model`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def check_model_name(name: str, use_peft: bool | None = None) -> Path | None:
    """The local folder `name` names (None: a hub name), checked to hold a model or an adapter run (and to be an
    adapter run, or not, when `use_peft` says so); a missing local folder is an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        is_adapter = adapter.is_adapter_run(path)
        if use_peft is not None and use_peft != is_adapter:
            raise UserError(f"{name}: use_peft is {str(use_peft).lower()}, but the folder "
                            f"{'holds' if is_adapter else 'holds no'} adapter_config.json")
        if not is_adapter and not (path / "config.json").is_file():
            raise UserError(f"{name}: not a model folder (no config.json, nor adapter_config.json for an "
                            "adapter run)")
        check_weights(path)
        return path
    if path.exists():
        raise UserError(f"{name}: not a folder")
    if looks_like_path(name):
        raise UserError(f"{name}: no such folder")
    return None


def resolve_model_dir(name: str, base_model: str | None = None, use_peft: bool | None = None,
                      allow_changed_base: bool = False, trust_remote_code: bool = False) -> str:
    """The folder or hub name to load: an adapter run becomes its merged folder (merged into `base_model` when given,
    else into the base its adapter names; see tsg.adapter.merge for the other two)."""
    path = check_model_name(name, use_peft)
    if path is not None and adapter.is_adapter_run(path):
        return str(adapter.merged_model_dir(path, base_model, allow_changed_base, trust_remote_code))
    return name if path is None else str(path)


def pick_device(device: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cpu, cuda and cuda:N are checked."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UserError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UserError(f"device {device}: no such CUDA GPU is visible "
                                f"({torch.cuda.device_count()} visible)")
    return device


def load_model(name: str, quantization: str = "none", device: str = "auto", base_model: str | None = None,
               use_peft: bool | None = None, allow_changed_base: bool = False, trust_remote_code: bool = False):
    """Model (eval mode, on `device`) and tokenizer (pad = eos when it has none, left padding) of a saved folder, an
    adapter run (merged first, in full precision) or a hub name; weights in 8 or 4 bits when `quantization` asks."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    device = pick_device(device)
    if name.lower().endswith(".gguf"):
        raise UserError(f"{name}: a GGUF file runs on llama.cpp (tsg generate --backend llama.cpp); here, give the "
                        "model folder it was exported from")
    folder = resolve_model_dir(name, base_model, use_peft, allow_changed_base, trust_remote_code)
    check_remote_code(folder, trust_remote_code)
    quantize = quantization_config(not device.startswith("cuda"), load_in_8bit=quantization == "8bit",
                                   load_in_4bit=quantization == "4bit", bnb_4bit_use_double_quant=False)
    if quantization == "8bit":
        # bitsandbytes casts each fp32 activation to fp16 and logs it at every layer call: an expected step here
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
        if quantize is None:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantize,
                                                         device_map={"": device}, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        refused_remote_code(e, name)
        raise UserError(f"{name}: no model could be loaded ({one_line(e, 200)})") from None
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


def token_pieces(tokenizer) -> dict[bytes, list[int]]:
    """The UTF-8 bytes each vocabulary token stands for -> the ids that stand for them (special tokens left out).

    Byte-level BPE tokens (GPT-2 style) are read byte by byte, so that tokens holding part of a character count.
    Other tokenizers' tokens are decoded after an anchor token, so that a leading space survives decoders that
    strip it at the start of a text (SentencePiece); tokens that decode to part of a character are left out."""
    special = set(tokenizer.all_special_ids)
    pieces: dict[bytes, list[int]] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        alphabet = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's character for each byte
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
            raise UserError(f"banned_words: {word.strip()!r} has {count:,} tokenizations with this vocabulary, "
                            f"more than the {MAX_SPELLINGS:,} that can be banned: ban a shorter word")
        sequences.update(tuple(s) for variant in word_variants(word) for s in spellings(variant, pieces))
    return sorted(map(list, sequences))


# --- telling stories ---


def prompt_texts(prompts, start_marker: str) -> list[str]:
    """What the model reads: each prompt after the start marker. Empty prompts are an error."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("prompt: no prompts")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise UserError(f"prompt: {which} is empty")
    return [start_marker + prompt for prompt in prompts]


def fit_to_context(context: int | None, tokenizer, prompts, settings: Settings) -> Settings:
    """Settings whose max_new_tokens fits the model's `context` (tokens; None: unbounded) after the longest prompt;
    a prompt that fills the context is an error."""
    if context is None:
        return settings
    lengths = [len(ids) for ids in tokenizer(prompt_texts(prompts, settings.start_marker))["input_ids"]]
    longest = max(lengths)
    if longest >= context:
        which = "the prompt" if len(lengths) == 1 else f"prompt {lengths.index(longest) + 1}"
        raise UserError(f"prompt: {which} is {longest} tokens long, but the model's context is {context} "
                        "tokens: shorten it")
    if longest + settings.max_new_tokens > context:
        logger.info("note: max_new_tokens %d lowered to %d: the longest prompt is %d tokens and the model's "
                    "context %d", settings.max_new_tokens, context - longest, longest, context)
        return replace(settings, max_new_tokens=context - longest)
    return settings


def stop_conditions(model_eos, tokenizer, end_marker: str) -> tuple[list[int], list[str] | None]:
    """(eos token ids, stop strings): the tokenizer's and the model's eos token(s) (`model_eos`: an id, a list or
    None), and the end marker as a token or as a stop string."""
    eos_ids = [tokenizer.eos_token_id] + (model_eos if isinstance(model_eos, list) else [model_eos])
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
    eos_ids, stop_strings = stop_conditions(model.generation_config.eos_token_id, tokenizer, settings.end_marker)
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


class RowsStreamer(BaseStreamer):
    """Hands `on_text` every story of a one-prompt batch so far (a list of texts, one a row), decoded and cleaned as
    the finished stories are, after each token: what a page shows growing (tsg play). Rows that ended add nothing
    (their pad tokens are special)."""

    def __init__(self, tokenizer, prompt: str, settings: "Settings", on_text: Callable[[list[str]], None]):
        self.tokenizer, self.prompt, self.settings, self.on_text = tokenizer, prompt, settings, on_text
        self.rows: list[list[int]] | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.rows is None:  # generate()'s first call: the prompt of every row, left padded
            self.rows = [list(row) for row in value.reshape(value.shape[0], -1).tolist()]
        else:
            for row, token in zip(self.rows, value.reshape(-1).tolist()):
                row.append(token)
        texts = self.tokenizer.batch_decode(self.rows, skip_special_tokens=True)
        # a character whose bytes have not all come decodes as U+FFFD for now: held back, so that texts only grow
        self.on_text([clean_story(text.rstrip("\ufffd"), self.prompt, self.settings.start_marker,
                                  self.settings.end_marker) for text in texts])

    def end(self) -> None:
        self.rows = None


class StopWhenSet(StoppingCriteria):
    """Ends every row at its next token once `event` (a threading.Event) is set: a Stop button."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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


def generate_batches(model, tokenizer, texts: list[str], config: GenerationConfig, batch_size: int, seed: int,
                     streamer=None, progress: bool = False, start: int = 0, stop=None):
    """generate() on `texts[start:]` in left-padded batches: (index of the batch's first text, the output, its
    generated part) for each batch, in order. Each batch is seeded with `seed` + the index of its first text, so that
    a batch tells the same stories whether or not the batches before it were told in this run (`tsg generate
    --resume`). `stop` (a threading.Event), once set, ends the batch under way at its next token and the batches."""
    from tqdm.auto import tqdm

    criteria = {"stopping_criteria": StoppingCriteriaList([StopWhenSet(stop)])} if stop is not None else {}
    with decoding_layout(model):  # laid out once for all the batches
        for first in tqdm(range(start, len(texts), batch_size), desc="Telling stories", unit="batch",
                          disable=not progress):
            if stop is not None and stop.is_set():
                return
            inputs = tokenizer(texts[first:first + batch_size], return_tensors="pt", padding=True,
                               padding_side="left").to(model.device)
            set_seed((seed + first) % 2**32)
            with torch.inference_mode():
                output = model.generate(**inputs, generation_config=config, streamer=streamer, **criteria,
                                        **({"tokenizer": tokenizer} if config.stop_strings else {}))
            yield first, output, output[:, inputs["input_ids"].shape[1]:]


def tell_stories(model, tokenizer, prompts, settings: Settings | None = None, *, stream: bool = False,
                 compile: bool = False, progress: bool = False, **overrides) -> list[Story]:
    """`num_return_sequences` stories for each prompt (a string or a list), told in batches of `batch_size` with
    left padding, or streamed to stdout (`stream`: one prompt, one story, no beam search). `compile`: a static KV
    cache and compiled decoding steps (a one-time compile, then faster tokens). `progress`: a bar over the batches.
    Keyword overrides replace fields of `settings`, e.g. `tell_stories(model, tokenizer, "Once",
    num_return_sequences=3)`."""
    return [story for batch in iter_stories(model, tokenizer, prompts, settings, stream=stream, compile=compile,
                                            progress=progress, **overrides) for story in batch]


def iter_stories(model, tokenizer, prompts, settings: Settings | None = None, *, stream: bool = False,
                 compile: bool = False, progress: bool = False, start: int = 0,
                 on_text: Callable[[list[str]], None] | None = None, stop=None, **overrides):
    """tell_stories one batch at a time: yields each batch's stories as soon as they are told, from the prompt
    `start` on (a multiple of batch_size tells exactly what a run from the first prompt would tell there).
    `on_text`: called with every story so far after each token (one prompt, no beam search; see RowsStreamer).
    `stop`: a threading.Event that, once set, ends the stories under way at their next token (see
    generate_batches). Neither changes which stories are told."""
    settings = replace(settings or Settings(), **overrides)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = prompt_texts(prompts, settings.start_marker)
    settings = fit_to_context(context_length(model.config), tokenizer, prompts, settings)
    if stream and (len(prompts) > 1 or settings.num_return_sequences > 1 or settings.num_beams > 1):
        raise UserError("streaming tells one story from one prompt, without beam search")
    if on_text and (len(prompts) > 1 or settings.num_beams > 1):
        raise UserError("stories grow token by token from one prompt, without beam search")
    config = generation_config(model, tokenizer, settings, compile)
    streamer = StoryStreamer(tokenizer, prompts[0], settings.start_marker, settings.end_marker) if stream else None
    if on_text:
        streamer = RowsStreamer(tokenizer, prompts[0], settings, on_text)
    for first, output, new in generate_batches(model, tokenizer, texts, config, settings.batch_size, settings.seed,
                                               streamer, progress, start, stop):
        yield _batch_stories(tokenizer, prompts, first, output, new.cpu(), config.eos_token_id, settings,
                             config.stop_strings)


def _batch_stories(tokenizer, prompts: list[str], first: int, output, new, eos_ids: list[int],
                   settings: Settings, stop_strings: list[str] | None = None) -> list[Story]:
    """The Story of each row of one batch's generate() output; `new` is its generated part."""
    decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
    counts = new_token_counts(new, eos_ids)
    ended = torch.isin(new, torch.tensor(eos_ids)).any(dim=1).tolist()
    stories = []
    for row, (text, tokens, reached) in enumerate(zip(decoded, counts, ended)):
        if stop_strings:  # a row stopped at its end marker is padded after it, and the pad may be the eos token
            at_marker = marker_end(tokenizer, new[row, :tokens].tolist(), stop_strings)
            if at_marker is not None and (not reached or at_marker < tokens):
                tokens, reached = at_marker, False
        index, number = divmod(row, settings.num_return_sequences)
        prompt = prompts[first + index]
        continuation = tokenizer.decode(new[row, :tokens - reached], skip_special_tokens=True).strip()
        stories.append(Story(prompt, number + 1, clean_story(text, prompt, settings.start_marker, settings.end_marker),
                             tokens, continuation, reached))
    return stories


def marker_end(tokenizer, ids: list[int], markers: list[str]) -> int | None:
    """How many of the generated `ids` it takes for their text to hold one of `markers` (None: it never does):
    where a story told with an end marker stopped."""
    if not any(marker in tokenizer.decode(ids, skip_special_tokens=True) for marker in markers):
        return None
    return next(k for k in range(1, len(ids) + 1)
                if any(marker in tokenizer.decode(ids[:k], skip_special_tokens=True) for marker in markers))


# --- files ---


def check_output_path(path: str) -> Path:
    """An output file name tsg can write stories to: .csv or .jsonl, not a folder."""
    output = Path(path)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"output {path}: expected a .csv or .jsonl file name, got {output.suffix or 'none'!r}")
    if output.is_dir():
        raise UserError(f"output {path}: is a folder")
    return output


def output_record(model: str, quantization: str, device: str, backend: str, settings: Settings) -> dict:
    """What each row of a stories file records beside its story: the model, how it ran, and the settings."""
    return {"model": model, "quantization": quantization, "device": device, "backend": backend, **settings.record()}


def story_rows(stories: list[Story], record: dict) -> list[dict]:
    """The rows `tsg generate --output` writes: one per story, the settings in `record` beside it."""
    return [{"prompt": s.prompt, "number": s.number, "story": s.text, **record} for s in stories]


def write_stories(path, stories: list[Story], record: dict, before: list[dict] = ()) -> Path:
    """`before` (rows read back by read_rows) and then one row per story, the settings in `record` beside it, as CSV
    or JSON lines (atomically: an interrupted write leaves the file as it was)."""
    output = check_output_path(str(path))
    rows = [*before, *story_rows(stories, record)]
    with replaced_atomically(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if output.suffix.lower() == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["prompt", "number", "story"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return output


def read_rows(path) -> list[dict]:
    """The rows of a stories file write_stories wrote (CSV values as strings), or a UserError naming the file."""
    output = check_output_path(str(path))
    try:
        with open(output, encoding="utf-8", newline="") as f:
            if output.suffix.lower() == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read its stories ({one_line(e, 120)})") from None
    if any(not isinstance(row, dict) or not {"prompt", "number", "story"} <= set(row) for row in rows):
        raise UserError(f"{path}: not a stories file of tsg generate (rows need prompt, number and story)")
    return rows


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
