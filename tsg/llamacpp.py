"""Stories told by llama.cpp (through llama-cpp-python) from a GGUF file, with tsg's settings: `tsg generate
--backend llama.cpp`.

    llm, tokenizer, path = load_gguf_model("runs/tiny_cpu")     # exports runs/tiny_cpu/tiny_cpu-f32.gguf once
    stories = tell_stories(llm, tokenizer, ["Once upon a time"], Settings(num_return_sequences=2, seed=7))

The model is a `.gguf` file, or a run folder or adapter run: its GGUF is then `tsg export`'s default file,
`<folder>/<name>-f32.gguf`, exported once (and checked there), and again when the run's weights are newer.

llama.cpp evaluates the model and draws the tokens; what decides them is tsg's, in transformers' order: the prompt
tokenized by tsg's tokenizer (the GGUF's reproduces it, checked at export), then at each step the repetition penalty
over every earlier token (the prompt's too), the banned words in every tokenization (transformers' rule: a
sequence's last token is forbidden where the tokens so far end with the rest of it) and the temperature, applied by
a logits processor; then llama.cpp's top-k, top-p (min-p and typical-p off) and draw, or the likeliest token. A
story ends at the end-of-story token, at `end_marker` or after `max_new_tokens`, counted and cut as
tsg.generation counts and cuts them. So a greedy story is the transformers backend's; a sampled one is
reproducible by seed, but llama.cpp draws its own random numbers, so it is not the transformers backend's story
for that seed. Story k (counting from 0 over all prompts and their stories) is drawn with seed + k. No beam
search.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tsg.conversion import default_gguf_path, write_gguf
from tsg.files import UserError, one_line
from tsg.generation import (Settings, Story, StoryStreamer, banned_token_sequences, check_model_name, clean_story,
                            fit_to_context, prompt_texts, resolve_model_dir, stop_conditions)

logger = logging.getLogger(__name__)
INSTALL = "pip install 'tsg[llamacpp]' (builds llama-cpp-python from source: minutes)"


# llama.cpp allocates the whole KV cache up front: a long-context GGUF (not tsg's) would take gigabytes for stories
MAX_CONTEXT = 8192


@dataclass
class LlamaCppModel:
    """A GGUF loaded in llama.cpp, with tsg's tokenizer of the same vocabulary."""

    llm: object  # llama_cpp.Llama
    tokenizer: object
    path: Path
    device: str  # cpu or cuda: where its layers run
    context: int  # tokens a story may fill: the model's context (llama.cpp rounds its own cache size up)

    def close(self) -> None:
        """Free llama.cpp's model now (left to interpreter shutdown, llama-cpp-python's cleanup fails)."""
        self.llm.close()


def check_gguf_name(name: str, base_model: str | None = None, use_peft: bool | None = None) -> None:
    """A UserError unless `name` is a .gguf file or a local model folder / adapter run (nothing is written)."""
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"{name}: {'not a file' if path.exists() else 'no such file'}")
        if base_model or use_peft:
            raise UserError(f"{'base_model' if base_model else 'use_peft'}: {name} holds merged weights already; give "
                            "the adapter run instead to merge it into a base")
    elif check_model_name(name, use_peft) is None:
        raise UserError(f"{name}: a hub model runs on llama.cpp once exported: tsg export {name} --output FILE.gguf, "
                        "then --model FILE.gguf")


def gguf_path(name: str, base_model: str | None = None) -> tuple[Path, str | None]:
    """(the GGUF file to run, the model folder whose tokenizer it holds, or None for a given .gguf file) for a name
    check_gguf_name has passed: a run's f32 GGUF (tsg export's default file) is written when missing or older than
    the run's weights."""
    if name.lower().endswith(".gguf"):
        return Path(name).expanduser(), None
    folder = resolve_model_dir(name, base_model)  # an adapter run: merged first
    path = default_gguf_path(name)
    if not path.is_file() or path.stat().st_mtime < newest_weights(Path(name), Path(folder)):
        logger.info("exporting %s for llama.cpp (%s)", path, "the model changed since" if path.is_file() else "once")
        try:
            write_gguf(folder, path, "f32")
        except OSError as e:
            raise UserError(f"{path}: cannot write it ({e.strerror or e}): tsg export {name} --output FILE.gguf, then "
                            "--model FILE.gguf") from None
    return path, folder


def newest_weights(*folders: Path) -> float:
    """The newest modification time of the weights and configs in `folders` (a GGUF older than that is stale: the
    run was trained again)."""
    files = [f for folder in folders for pattern in ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
             for f in folder.glob(pattern)]
    return max((f.stat().st_mtime for f in files), default=0.0)


def load_gguf_model(name: str, base_model: str | None = None, device: str = "auto",
                    use_peft: bool | None = None) -> LlamaCppModel:
    """The GGUF `name` names (see gguf_path) in llama.cpp, its context the model's (at most MAX_CONTEXT). `device`
    auto uses a GPU where llama-cpp-python was built to offload to one and torch sees one, else the CPU."""
    check_gguf_name(name, base_model, use_peft)
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"backend llama.cpp: llama-cpp-python is not installed: {INSTALL}") from None
    from transformers import AutoTokenizer

    from tsg.model import with_pad_token

    offload = llama_cpp.llama_supports_gpu_offload()
    if device.startswith("cuda") and not offload:
        raise UserError(f"device {device}: this llama-cpp-python was built for the CPU only (reinstall it with "
                        "CMAKE_ARGS=-DGGML_CUDA=on) or use --device cpu")
    on_gpu = device.startswith("cuda") or (device == "auto" and offload and torch.cuda.is_available())
    path, folder = gguf_path(name, base_model)
    try:
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
                                   if folder is not None else
                                   AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 trust_remote_code=False))
        n_ctx = min(gguf_context_length(path), MAX_CONTEXT)
        with quiet_native_logs():
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), seed=0, verbose=False,
                                  n_threads=torch.get_num_threads(), n_gpu_layers=-1 if on_gpu else 0)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp could not load it ({one_line(e, 200)})") from None
    return LlamaCppModel(llm, tokenizer, path, "cuda" if on_gpu else "cpu", n_ctx)


def gguf_context_length(path: Path) -> int:
    """The context the model was trained with, from the GGUF's `<arch>.context_length`."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    field = fields[f"{arch}.context_length"]
    return int(field.parts[field.data[0]][0])


@contextlib.contextmanager
def quiet_native_logs():
    """llama.cpp's C code logs to file descriptor 2 while it loads a model even when asked not to: silenced here
    (a load error still reaches Python as an exception)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def logits_processor(settings: Settings, banned: list[list[int]]):
    """A llama-cpp-python logits processor doing, in transformers' order, what llama.cpp's sampler would do
    otherwise (or not at all): the repetition penalty over every earlier token, the prompt's included (llama.cpp's
    counts only the tokens it drew), the banned token sequences (NoBadWordsLogitsProcessor's rule) and the
    temperature (llama.cpp's comes after top-p, transformers' before). None when there is nothing to do."""
    penalty, banned = settings.repetition_penalty, [list(s) for s in banned]
    temperature = settings.temperature if settings.do_sample else 1.0
    if penalty == 1.0 and not banned and temperature == 1.0:
        return None
    always = [s[0] for s in banned if len(s) == 1]
    longer = [s for s in banned if len(s) > 1]

    def process(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        if penalty != 1.0 and len(input_ids):
            seen = np.unique(input_ids)
            scores[seen] = np.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
        scores[always] = -np.inf
        if longer:
            tail = input_ids.tolist()
            for sequence in longer:
                if len(tail) >= len(sequence) - 1 and tail[len(tail) - len(sequence) + 1:] == sequence[:-1]:
                    scores[sequence[-1]] = -np.inf
        if temperature != 1.0:
            scores /= temperature
        return scores

    return process


def check_settings(settings: Settings) -> None:
    if settings.num_beams > 1:
        raise UserError(f"num_beams {settings.num_beams}: the llama.cpp backend has no beam search")


def tell_stories(model: LlamaCppModel, prompts, settings: Settings | None = None, *, stream: bool = False,
                 **overrides) -> list[Story]:
    """`num_return_sequences` stories for each prompt, one at a time, from llama.cpp (see the module's docstring);
    `stream` prints the one story as it grows, as tsg.generation streams it."""
    return [story for batch in iter_stories(model, prompts, settings, stream=stream, **overrides) for story in batch]


def iter_stories(model: LlamaCppModel, prompts, settings: Settings | None = None, *, stream: bool = False,
                 start: int = 0, **overrides):
    """tell_stories one prompt at a time: yields each prompt's stories as soon as they are told, from the prompt
    `start` on (seeded as a run from the first prompt seeds them)."""
    import llama_cpp

    llm, tokenizer = model.llm, model.tokenizer
    settings = replace(settings or Settings(), **overrides)
    check_settings(settings)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = prompt_texts(prompts, settings.start_marker)
    settings = fit_to_context(model.context, tokenizer, prompts, settings)
    if stream and (len(prompts) > 1 or settings.num_return_sequences > 1):
        raise UserError("streaming tells one story from one prompt")
    eos_ids, stop_strings = stop_conditions(llm.token_eos(), tokenizer, settings.end_marker)
    process = logits_processor(settings, banned_token_sequences(tokenizer, settings.banned_words))
    sampling = dict(temp=1.0, top_k=settings.top_k or llm.n_vocab(), top_p=settings.top_p) if settings.do_sample \
        else dict(temp=0.0)  # temperature 0: llama.cpp takes the likeliest token
    for index in range(start, len(prompts)):
        prompt, text, stories = prompts[index], texts[index], []
        ids = tokenizer(text)["input_ids"]
        for number in range(settings.num_return_sequences):
            k = index * settings.num_return_sequences + number  # the story's place among all the prompts' stories
            llm.set_seed((settings.seed + k) % (2**32 - 1))  # 2**32 - 1 is llama.cpp's "any seed"
            streamer = StoryStreamer(tokenizer, prompt, settings.start_marker, settings.end_marker) if stream else None
            if streamer:
                streamer.put(torch.tensor(ids))
            new, ended = [], False
            for token in llm.generate(ids, **sampling, min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                                      logits_processor=llama_cpp.LogitsProcessorList([process]) if process else None):
                new.append(token)
                if streamer:
                    streamer.put(torch.tensor([token]))
                ended = token in eos_ids
                text_so_far = tokenizer.decode(new, skip_special_tokens=True) if stop_strings else ""
                if ended or len(new) == settings.max_new_tokens or any(m in text_so_far for m in stop_strings or ()):
                    break  # at the end-of-story token, the length, or the end marker (marker_end's rule)
            if streamer:
                streamer.end()
            decoded = tokenizer.decode(ids + new, skip_special_tokens=True)
            continuation = tokenizer.decode(new[:len(new) - ended], skip_special_tokens=True).strip()
            stories.append(Story(prompt, number + 1, clean_story(decoded, prompt, settings.start_marker,
                                                                 settings.end_marker), len(new), continuation, ended))
        yield stories
