"""`tsg generate`: tell stories with a trained model.

    tsg generate --model runs/tiny_cpu -q "Once upon a time"             # one story, streamed as it grows
    tsg generate --model runs/tiny_cpu --prompts_file prompts.txt -n 2 --output stories.jsonl
    tsg generate --model runs/tiny_cpu -q "Tom had a dog" --banned_words dog cat --greedy
    tsg generate --model runs/lora_run -q "Once upon a time" --quantization 4bit
    tsg generate -c model_inference.toml -q "Once upon a time, ..." -n 1 -rnd 876543
    tsg generate --model runs/tiny_cpu -q "Once upon a time" --backend llama.cpp     # its GGUF, exported once
    make generate PROMPT="Once upon a time" MODEL=runs/tiny_cpu ARGS="-n 3"

`--model` is a folder saved by `tsg train`, an adapter run (merged once into RUN/merged) or a hub name; with
`--backend llama.cpp` also a .gguf file (see tsg.llamacpp for what the settings mean there). One story
from one prompt without `--output` is streamed token by token; otherwise the prompts are told in batches and the
stories printed numbered. `--output FILE.csv|.jsonl` also writes one row per story with every setting beside it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Literal, Optional

from tsg import llamacpp
from tsg.config import Command, SeedKey, option, run, seed_bool
from tsg.files import UserError, read_lines
from tsg.generation import (ModelArguments, Settings, check_output_path, fit_to_context, progress_bars_only_on_a_terminal,
                            prompt_texts, tell_stories, write_stories)
from tsg.model import context_length

DEFAULT_PROMPT = "Once upon a time"

logger = logging.getLogger("tsg")


@dataclass
class GenerateArguments:
    """Which prompts, and where the stories go (ModelArguments: which model; Settings: how they are told)."""

    prompt: Optional[str] = option(None, f"How the story starts (default: {DEFAULT_PROMPT!r} unless prompts_file gives "
                                   f"prompts; with it, this prompt comes first).", aliases=["-q"])
    prompts_file: Optional[str] = option(None, "Text file of prompts, one a line (blank lines skipped).")
    banned_words_file: Optional[str] = option(None, "Text file of banned words, one a line (added to banned_words).")
    compile: bool = option(False, "Static KV cache and torch.compile'd decoding steps: a one-time compile (tens of "
                           "seconds on a CPU), then faster tokens; pays off for long stories or many prompts.")
    output: Optional[str] = option(None, "Also write the stories, a row each with the settings, to FILE.csv or .jsonl.")
    backend: Literal["transformers", "llama.cpp"] = option(
        "transformers", "Who tells the stories: transformers, or llama.cpp from the model's GGUF (a .gguf model, or "
        "MODEL/<name>-f32.gguf exported once; pip install 'tsg[llamacpp]').")

    def __post_init__(self):
        if self.output:
            check_output_path(self.output)
        if self.backend == "llama.cpp" and self.compile:
            raise UserError("compile: a transformers backend option (llama.cpp's decoding is compiled C++)")


GENERATE = Command(
    name="generate",
    types=(ModelArguments, GenerateArguments, Settings),
    description=__doc__,
    seed_keys={
        "model_folder": SeedKey("model"),
        "model_name": SeedKey("base_model"),
        "lora_peft": SeedKey("use_peft"),
        "quantized": SeedKey("quantization", seed_bool("quantized", "8bit", "none")),
        "device": SeedKey("device", lambda value: "cuda" if str(value).lower() == "gpu" else value),
        "output_file": SeedKey("output"),
        "starter": SeedKey("start_marker"),
        "ender": SeedKey("end_marker"),
        "bad_words": SeedKey("banned_words"),
    },
    sections=("hyper-parameters",),
    flags={"--greedy": ("do_sample", False, "Take the likeliest token (or beams): do_sample false.")},
)


def read_prompts(options: GenerateArguments) -> list[str]:
    prompts = [options.prompt] if options.prompt is not None else []
    if options.prompts_file:
        prompts += read_lines(options.prompts_file, "prompts_file")
    prompts = prompts or [DEFAULT_PROMPT]
    prompt_texts(prompts, "")  # empty prompts stop here, before the model is loaded
    return prompts


def generate(model_args: ModelArguments, options: GenerateArguments, settings: Settings) -> None:
    """Check every input, load the model, tell the stories, print them and write them where asked."""
    if options.banned_words_file:
        words = read_lines(options.banned_words_file, "banned_words_file")
        settings = replace(settings, banned_words=[*settings.banned_words, *words])
    prompts = read_prompts(options)
    stream = (not options.output and len(prompts) == 1 and settings.num_return_sequences == 1
              and settings.num_beams == 1)
    if options.backend == "llama.cpp":
        if model_args.quantization != "none":
            raise UserError(f"quantization {model_args.quantization}: llama.cpp runs the GGUF's own weights (tsg export "
                            "--outtype q8_0 for 8-bit ones)")
        llamacpp.check_settings(settings)
        model = llamacpp.load_gguf_model(model_args.model, model_args.base_model, model_args.device,
                                         model_args.use_peft)
        with contextlib.closing(model):
            settings = fit_to_context(model.context, model.tokenizer, prompts, settings)
            stories = llamacpp.tell_stories(model, prompts, settings, stream=stream)
        loaded = {"model": model_args.model, "quantization": "none", "device": model.device}
    else:
        with progress_bars_only_on_a_terminal():
            model, tokenizer = model_args.load()
        # what --output records: the max_new_tokens told
        settings = fit_to_context(context_length(model.config), tokenizer, prompts, settings)
        stories = tell_stories(model, tokenizer, prompts, settings, stream=stream, compile=options.compile)
        loaded = {"model": model_args.model, "quantization": model_args.quantization, "device": str(model.device)}
    if not stream:
        for i, story in enumerate(stories, 1):
            where = f" (prompt {story.prompt!r}, {story.number})" if len(prompts) > 1 else ""
            print(f"--- story {i}{where} ---\n{story.text}\n", flush=True)
    if options.output:
        record = {**loaded, "backend": options.backend, **settings.record()}
        try:
            path = write_stories(options.output, stories, record)
        except OSError as e:
            raise UserError(f"output {options.output}: cannot write ({e.strerror or e})") from None
        logger.info("wrote %d %s to %s", len(stories), "story" if len(stories) == 1 else "stories", path)


def main(argv: list[str] | None = None) -> None:
    run(GENERATE, generate, argv)


if __name__ == "__main__":
    main()
