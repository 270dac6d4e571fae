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
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from tsg import llamacpp
from tsg.config import Command, SeedKey, option, run, seed_bool
from tsg.files import UserError, read_lines
from tsg.generation import (ModelArguments, Settings, check_output_path, fit_to_context, iter_stories,
                            output_record, progress_bars_only_on_a_terminal, prompt_texts, read_rows,
                            write_stories)
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
    output: Optional[str] = option(None, "Also write the stories, a row each with the settings, to FILE.csv or .jsonl "
                                   "(rewritten after each batch: an interrupted run keeps every story told).")
    resume: bool = option(False, "With output: keep the stories an interrupted run wrote there (same model and "
                          "settings) and tell only the prompts after them.")
    backend: Literal["transformers", "llama.cpp"] = option(
        "transformers", "Who tells the stories: transformers, or llama.cpp from the model's GGUF (a .gguf model, or "
        "MODEL/<name>-f32.gguf exported once; pip install 'tsg[llamacpp]').")

    def __post_init__(self):
        if self.output:
            check_output_path(self.output)
        if self.backend == "llama.cpp" and self.compile:
            raise UserError("compile: a transformers backend option (llama.cpp's decoding is compiled C++)")
        if self.resume and not self.output:
            raise UserError("resume: needs output (the file whose stories are kept)")


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


def stories_told_before(options: GenerateArguments, prompts: list[str], settings: Settings) -> list[dict]:
    """With --resume, the rows already in --output: checked to be the first prompts' stories, in order."""
    if not options.resume or not Path(options.output).is_file():
        return []
    rows = read_rows(options.output)
    n = settings.num_return_sequences
    expected = [(prompt, str(number)) for prompt in prompts for number in range(1, n + 1)]
    if [(row["prompt"], str(row["number"])) for row in rows] != expected[:len(rows)]:
        raise UserError(f"{options.output}: its stories are not those of the first prompts, in order (other prompts "
                        "or num_return_sequences): drop resume to tell them all again")
    return rows


def check_same_settings(path: str, rows: list[dict], record: dict) -> None:
    """The rows kept by --resume were told as this run tells (same model and settings; any device)."""
    for key, value in record.items():
        found = {str(row.get(key)) if row.get(key) not in (None, "") else "" for row in rows}
        if key != "device" and found and found != {"" if value in (None, "") else str(value)}:
            raise UserError(f"{path}: its stories were told with {key} {', '.join(sorted(found))}, not {value}: "
                            "use the same settings to resume, or drop resume")


@contextlib.contextmanager
def interruptions():
    """SIGTERM (what schedulers send before a kill) raised as Ctrl-C's KeyboardInterrupt, so both end the run the
    same way; yields a list that holds the signal's number once one arrived."""
    arrived = []

    def stop(signum, frame):
        arrived.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield arrived
    finally:
        signal.signal(signal.SIGTERM, previous)


def generate(model_args: ModelArguments, options: GenerateArguments, settings: Settings) -> None:
    """Check every input, load the model, tell the stories (written to --output after each batch), print them."""
    if options.banned_words_file:
        words = read_lines(options.banned_words_file, "banned_words_file")
        settings = replace(settings, banned_words=[*settings.banned_words, *words])
    prompts = read_prompts(options)
    before = stories_told_before(options, prompts, settings)
    start = len(before) // settings.num_return_sequences
    stream = (not options.output and len(prompts) == 1 and settings.num_return_sequences == 1
              and settings.num_beams == 1)
    stories, model = [], None
    with interruptions() as arrived:
        try:
            if options.backend == "llama.cpp":
                if model_args.quantization != "none":
                    raise UserError(f"quantization {model_args.quantization}: llama.cpp runs the GGUF's own weights "
                                    "(tsg export --outtype q8_0 for 8-bit ones)")
                llamacpp.check_settings(settings)
                model = llamacpp.load_gguf_model(model_args.model, model_args.base_model, model_args.device,
                                                 model_args.use_peft)
                settings = fit_to_context(model.context, model.tokenizer, prompts, settings)
                device = model.device
                batches = llamacpp.iter_stories(model, prompts, settings, stream=stream, start=start)
            else:
                with progress_bars_only_on_a_terminal():
                    loaded, tokenizer = model_args.load()
                # what --output records: the max_new_tokens told
                settings = fit_to_context(context_length(loaded.config), tokenizer, prompts, settings)
                device = str(loaded.device)
                batches = iter_stories(loaded, tokenizer, prompts, settings, stream=stream, compile=options.compile,
                                       start=start)
            record = output_record(model_args.model, model_args.quantization, device, options.backend, settings)
            check_same_settings(options.output, before, record)
            if before:
                logger.info("resuming: %d of %d prompts told already in %s", start, len(prompts), options.output)
            for batch in batches:
                stories += batch
                if options.output:
                    write(options.output, stories, record, before)
        except KeyboardInterrupt:
            kept = len(before) + len(stories)
            where = f" ({kept} {'story' if kept == 1 else 'stories'} in {options.output}: add --resume to tell " \
                    "the rest)" if options.output else ""
            logger.info("interrupted after %d of %d prompts%s", start + len(stories) // settings.num_return_sequences,
                        len(prompts), where)
            if not stream:
                show(stories, prompts)
            raise SystemExit(128 + (arrived[0] if arrived else signal.SIGINT))
        finally:
            if isinstance(model, llamacpp.LlamaCppModel):
                model.close()  # now: left to interpreter shutdown, llama-cpp-python's cleanup fails
    if not stream:
        show(stories, prompts)
    if options.output:
        total = len(before) + len(stories)
        logger.info("wrote %d %s to %s", total, "story" if total == 1 else "stories", options.output)


def write(output: str, stories, record: dict, before: list[dict]) -> None:
    try:
        write_stories(output, stories, record, before)
    except OSError as e:
        raise UserError(f"output {output}: cannot write ({e.strerror or e}); the file holds the stories of the "
                        "batches before") from None


def show(stories, prompts: list[str]) -> None:
    for i, story in enumerate(stories, 1):
        where = f" (prompt {story.prompt!r}, {story.number})" if len(prompts) > 1 else ""
        print(f"--- story {i}{where} ---\n{story.text}\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    run(GENERATE, generate, argv)


if __name__ == "__main__":
    main()
