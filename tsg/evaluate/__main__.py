"""`tsg evaluate`: score a trained model: exact held-out loss and bits per byte, and the quality of the stories it
tells (definitions: tsg.scoring).

    tsg evaluate --model runs/tiny_cpu --data valid.txt
    tsg evaluate --model runs/tiny_cpu --data valid.txt --train_data tsg/sample/tinystories_sample.txt
    tsg evaluate --model runs/qlora_cpu --data valid.jsonl --max_stories 500 --output eval.json
    make eval MODEL=runs/tiny_cpu VALID=valid.txt TRAIN=train.txt

The report (`--output`, default MODEL/eval_report.json, written atomically) holds every score, the settings, the
definitions and a few sample stories; a short table of them is printed.
"""

# This command is the folder tsg/evaluate/ (this file, no __init__.py), not a module tsg/evaluate.py: when a file of
# tsg runs as a script (`accelerate launch tsg/train.py`), tsg/ comes first on sys.path, and a module evaluate.py
# there would be imported in place of the `evaluate` library. A folder without __init__.py never shadows it.

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tsg import __version__
from tsg.config import Command, option, run
from tsg.data import END_OF_STORY, iter_stories, read_stories
from tsg.files import UserError, existing_file, read_lines, write_text
from tsg.generation import ModelArguments, Settings, fit_to_context, progress_bars_only_on_a_terminal, tell_stories
from tsg.model import context_length
from tsg.scoring import DEFAULT_PROMPTS, DEFINITIONS, SCORE_KEYS, generation_scores, score_stories

REPORT_NAME = "eval_report.json"
N_SAMPLES = 3  # sample stories in the report and on the terminal

logger = logging.getLogger("tsg")


@dataclass
class EvaluateArguments:
    data: Optional[str] = option(None, f"Held-out stories: .txt with {END_OF_STORY} separator lines, or "
                                 f".csv/.json/.jsonl/.parquet with a text column.")
    prompts: Optional[str] = option(None, "Story openings, one a line (default: tsg/metrics/prompts.txt).")
    output: Optional[str] = option(None, f"The JSON report (default: MODEL/{REPORT_NAME}).")
    max_stories: Optional[int] = option(None, "Score only the first N stories of data.")
    batch_size: int = option(8, "Windows scored together, prompts told together.")
    num_samples_per_prompt: int = option(5, "Stories told from each prompt (0: no generation scores).")
    max_new_tokens: int = option(256, "Most tokens told after each prompt.")
    seed: int = option(0, "Sampling seed.")
    train_data: Optional[str] = option(None, "The training stories (any data format): the share of generated 8-grams "
                                       "copied from them.")
    text_column: str = option("text", "The column that holds the stories in .csv/.json/.jsonl/.parquet files.")

    def __post_init__(self):
        if not self.data:
            raise UserError("data: required (the held-out stories)")
        existing_file(self.data, "data")
        if self.train_data:
            existing_file(self.train_data, "train_data")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.max_stories is not None and self.max_stories < 1:
            raise UserError(f"max_stories: expected a positive integer, got {self.max_stories}")
        if self.num_samples_per_prompt < 0:
            raise UserError(f"num_samples_per_prompt: expected 0 or more, got {self.num_samples_per_prompt}")
        if self.output and Path(self.output).is_dir():
            raise UserError(f"output {self.output}: is a folder")


EVALUATE = Command(name="evaluate", types=(ModelArguments, EvaluateArguments), description=__doc__)


def report_path(model_args: ModelArguments, options: EvaluateArguments) -> Path:
    if options.output:
        return Path(options.output)
    model = Path(model_args.model).expanduser()
    if not model.is_dir():  # ModelArguments refused a missing folder: this is a hub name
        raise UserError(f"output: required when model is a hub name ({model_args.model})")
    return model / REPORT_NAME


def told_settings(options: EvaluateArguments) -> Settings:
    """Generation scores sample at temperature 1 with no top-k or top-p cut, so they score the model's own
    distribution."""
    return Settings(max_new_tokens=options.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    num_return_sequences=max(1, options.num_samples_per_prompt), seed=options.seed,
                    batch_size=options.batch_size)


def evaluate(model_args: ModelArguments, options: EvaluateArguments) -> dict:
    """Check the inputs, score the model, write and print the report."""
    output = report_path(model_args, options)
    started = time.monotonic()
    progress = sys.stderr.isatty()
    prompts = read_lines(options.prompts or DEFAULT_PROMPTS, "prompts") if options.num_samples_per_prompt else []
    texts, blank = read_stories(options.data, options.max_stories, options.text_column)
    train_texts = iter_stories(options.train_data, options.text_column) if options.train_data else None
    with progress_bars_only_on_a_terminal():
        model, tokenizer = model_args.load()
    settings = told_settings(options)
    if prompts:  # a prompt longer than the context stops here, before the scoring
        settings = fit_to_context(context_length(model.config), tokenizer, prompts, settings)
    held_out = score_stories(model, tokenizer, texts, options.batch_size, progress)
    told, scores = [], dict.fromkeys(SCORE_KEYS[3:])
    if prompts:
        told = tell_stories(model, tokenizer, prompts, settings, progress=progress)
        if train_texts is not None:
            from tqdm.auto import tqdm

            train_texts = tqdm(train_texts, desc="Reading training stories", unit="story", disable=not progress)
        scores.update(generation_scores(told, train_texts))
    report = {
        "bits_per_byte": held_out.bits_per_byte, "eval_loss": held_out.eval_loss, "perplexity": held_out.perplexity,
        **{key: scores[key] for key in SCORE_KEYS[3:]},
        **held_out_figures(model_args.model, options, held_out, blank, context_length(model.config)),
        "generated_stories": len(told), "prompts": len(prompts), "train_data": options.train_data,
        "settings": report_settings(options, settings, prompts, str(model.device)),
        "definitions": DEFINITIONS,
        "samples": [{"prompt": s.prompt, "story": s.text, "tokens": s.length, "eos_reached": s.ended}
                    for s in told[:: max(1, len(told) // N_SAMPLES)][:N_SAMPLES]],
        "tsg_version": __version__, "seconds": round(time.monotonic() - started, 1),
    }
    try:
        write_text(output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"output {output}: cannot write the report ({e.strerror or e})") from None
    print_summary(report)
    logger.info("wrote %s", output)
    return report


def held_out_figures(model: str, options: EvaluateArguments, held_out, blank: int, context: int | None) -> dict:
    return {"model": model, "data": options.data, "stories": held_out.stories, "tokens": held_out.tokens,
            "predicted_tokens": held_out.predicted_tokens, "bytes": held_out.bytes, "nll_nats": held_out.nll,
            "first_token_nll_nats": held_out.first_token_nll,
            "loss_after_first_token": held_out.loss_after_first_token, "long_stories": held_out.long_stories,
            "empty_stories_skipped": blank, "context": context}


def report_settings(options: EvaluateArguments, settings: Settings, prompts: list[str], device: str) -> dict:
    return {
        "max_stories": options.max_stories, "text_column": options.text_column, "batch_size": options.batch_size,
        "num_samples_per_prompt": options.num_samples_per_prompt,
        "prompts_file": str(options.prompts or DEFAULT_PROMPTS) if prompts else None,
        "max_new_tokens": settings.max_new_tokens,  # lowered to fit the context after the longest prompt
        "max_new_tokens_asked": options.max_new_tokens,
        "do_sample": True, "temperature": settings.temperature, "top_k": None, "top_p": settings.top_p,
        "seed": settings.seed, "device": device,
    }


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_summary(report: dict) -> None:
    """A short table of the scores, and the sample stories."""
    rows = [
        ("held-out", f"{report['stories']:,} stories, {report['tokens']:,} tokens, {report['bytes']:,} bytes"),
        ("eval_loss", f"{_number(report['eval_loss'])} nats/token"),
        ("perplexity", _number(report["perplexity"], 3)),
        ("bits_per_byte", _number(report["bits_per_byte"])),
    ]
    if report["generated_stories"]:
        rows += [
            ("generated", f"{report['generated_stories']} stories ({report['settings']['num_samples_per_prompt']} "
                          f"per prompt, max {report['settings']['max_new_tokens']} new tokens)"),
            ("eos_rate", _number(report["eos_rate"], 3)),
            ("mean_length", f"{_number(report['mean_length'], 1)} tokens"),
            ("distinct_1/2/3", " / ".join(_number(report[f"distinct_{n}"], 3) for n in (1, 2, 3))),
            ("repeated_4gram_share", _number(report["repeated_4gram_share"], 3)),
            ("copied_8gram_share", _number(report["copied_8gram_share"], 3)
             + ("" if report["train_data"] else " (no train_data)")),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"tsg evaluate: {report['model']} on {report['data']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for i, sample in enumerate(report["samples"], 1):
        end = "ended" if sample["eos_reached"] else "cut at max_new_tokens"
        print(f"--- sample {i} ({sample['tokens']} tokens, {end}) ---\n{sample['story']}")


def main(argv: list[str] | None = None) -> None:
    run(EVALUATE, evaluate, argv)


if __name__ == "__main__":
    main()
