"""Stories told by llama.cpp (through llama-cpp-python) from a GGUF file, with tsg's settings: `tsg generate
--backend llama.cpp`.

    llm, tokenizer, path = load_gguf_model("runs/tiny_cpu")     # exports runs/tiny_cpu/tiny_cpu-f32.gguf once
    stories = tell_stories(llm, tokenizer, ["Once upon a time"], Settings(num_return_sequences=2, seed=7))

The model is a `.gguf` file, or anything `tsg generate` loads (a run folder, an adapter run, a hub name): its GGUF
is then `tsg export`'s default file, `<folder>/<name>-f32.gguf`, exported once (and checked there). The settings mean what they
mean in tsg.generation: greedy or sampling with temperature, top-k and top-p (llama.cpp's min-p and typical-p off),
the repetition penalty over every earlier token, banned words in every tokenization (the same token sequences, by
tsg's tokenizer, which the GGUF's tokenizer reproduces), the start and end markers, the end-of-story token. A greedy
story is the transformers backend's; a sampled one is reproducible by seed, but llama.cpp draws its own random
numbers, so it is not the transformers backend's story for that seed. Story k (counting from 0 over all prompts and
their stories) is drawn with seed + k. Beam search is not offered (llama.cpp has none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tsg.conversion import default_gguf_path, write_gguf
from tsg.files import UserError, one_line
from tsg.generation import (Settings, Story, banned_token_sequences, check_model_name, clean_story, fit_to_context,
                            prompt_texts, resolve_model_dir)

logger = logging.getLogger(__name__)
INSTALL = "pip install 'tsg[llamacpp]' (builds llama-cpp-python from source: minutes)"


def gguf_path(name: str, base_model: str | None = None) -> tuple[Path, str | None]:
    """(the GGUF file to run, the model folder whose tokenizer it holds, or None for a given .gguf file) for `name`:
    a .gguf file, or a model folder or adapter run whose f32 GGUF (tsg export's default file) is written once."""
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"{name}: {'not a file' if path.exists() else 'no such file'}")
        return path, None
    if check_model_name(name) is None:
        raise UserError(f"{name}: a hub model runs on llama.cpp once exported: tsg export {name} --output FILE.gguf, "
                        "then --model FILE.gguf")
    folder = resolve_model_dir(name, base_model)  # an adapter run: merged first
    path = default_gguf_path(name)
    if not path.is_file() or path.stat().st_mtime < newest_weights(Path(name), Path(folder)):
        logger.info("exporting %s for llama.cpp (%s)", path, "the model changed since" if path.is_file() else "once")
        write_gguf(folder, path, "f32")
    return path, folder


def newest_weights(*folders: Path) -> float:
    """The newest modification time of the weights and configs in `folders` (a GGUF older than that is stale: the
    run was trained again)."""
    files = [f for folder in folders for pattern in ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
             for f in folder.glob(pattern)]
    return max((f.stat().st_mtime for f in files), default=0.0)


def load_gguf_model(name: str, base_model: str | None = None, device: str = "cpu", context: int | None = None):
    """(llama_cpp.Llama, a transformers tokenizer of the same vocabulary, the GGUF's path). `device` cuda offloads
    every layer (a llama-cpp-python built with CUDA); `context` defaults to the model's training context."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"backend llama.cpp: llama-cpp-python is not installed: {INSTALL}") from None
    from transformers import AutoTokenizer

    from tsg.model import with_pad_token

    path, folder = gguf_path(name, base_model)
    try:
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(str(folder)) if folder is not None else
                                   AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        with quiet_native_logs():
            n_ctx = context or gguf_context_length(path)
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), seed=0, verbose=False,
                                  n_threads=torch.get_num_threads(), last_n_tokens_size=n_ctx,
                                  n_gpu_layers=-1 if device.startswith("cuda") else 0)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp could not load it ({one_line(e, 200)})") from None
    return llm, tokenizer, path


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


def banned_words_processor(sequences: list[list[int]]):
    """A llama-cpp-python logits processor with transformers' NoBadWordsLogitsProcessor's rule: a banned sequence's
    last token is forbidden wherever the tokens so far end with the rest of it."""
    if not sequences:
        return None
    always = [s[0] for s in sequences if len(s) == 1]
    longer = [s for s in sequences if len(s) > 1]

    def forbid(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        scores[always] = -np.inf
        tail = input_ids.tolist()
        for sequence in longer:
            if len(tail) >= len(sequence) - 1 and tail[len(tail) - len(sequence) + 1:] == sequence[:-1]:
                scores[sequence[-1]] = -np.inf
        return scores

    return forbid


def check_settings(settings: Settings) -> None:
    if settings.num_beams > 1:
        raise UserError(f"num_beams {settings.num_beams}: the llama.cpp backend has no beam search")


def tell_stories(llm, tokenizer, prompts, settings: Settings | None = None, *, stream: bool = False,
                 **overrides) -> list[Story]:
    """`num_return_sequences` stories for each prompt, one at a time, from llama.cpp (see the module's docstring);
    `stream` prints the one story token by token as llama.cpp makes it."""
    import llama_cpp

    settings = replace(settings or Settings(), **overrides)
    check_settings(settings)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = prompt_texts(prompts, settings.start_marker)
    settings = fit_to_context(llm.n_ctx(), tokenizer, prompts, settings)
    if stream and (len(prompts) > 1 or settings.num_return_sequences > 1):
        raise UserError("streaming tells one story from one prompt")
    forbid = banned_words_processor(banned_token_sequences(tokenizer, settings.banned_words))
    sampling = (dict(temperature=settings.temperature, top_k=settings.top_k or llm.n_vocab(), top_p=settings.top_p)
                if settings.do_sample else dict(temperature=0.0))
    stories = []
    for index, (prompt, text) in enumerate(zip(prompts, texts)):
        for number in range(settings.num_return_sequences):
            seed = settings.seed + len(stories)
            llm.reset()  # each story from the prompt alone
            output = llm.create_completion(
                text, max_tokens=settings.max_new_tokens, **sampling, min_p=0.0, typical_p=1.0,
                repeat_penalty=settings.repetition_penalty, seed=seed, stream=stream,
                stop=[settings.end_marker] if settings.end_marker else [],
                logits_processor=llama_cpp.LogitsProcessorList([forbid]) if forbid else None)
            if stream:
                output = _streamed(output, prompt)
            choice = output["choices"][0]
            ended = choice["finish_reason"] == "stop"
            continuation = choice["text"]
            told = (len(tokenizer(continuation, add_special_tokens=False)["input_ids"]) if stream  # chunks are not tokens
                    else output["usage"]["completion_tokens"])
            tokens = told + ended  # the end-of-story token counted, as in tsg.generation
            stories.append(Story(prompt, number + 1, clean_story(text + continuation, prompt, settings.start_marker,
                                                                 settings.end_marker),
                                 tokens, continuation.strip(), ended))
    return stories


def _streamed(chunks, prompt: str) -> dict:
    """Print a streamed completion as it comes (the prompt first); the whole completion, as create_completion
    returns it without streaming."""
    print(prompt, end="", flush=True)
    text, finish = "", None
    for chunk in chunks:
        piece = chunk["choices"][0]["text"]
        print(piece, end="", flush=True)
        text += piece
        finish = chunk["choices"][0]["finish_reason"] or finish
    print(flush=True)
    return {"choices": [{"text": text, "finish_reason": finish}]}
