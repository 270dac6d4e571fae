"""Score a trained model: exact held-out loss and bits per byte, and the quality of the stories it tells.

    python -m tsg.evaluate --model runs/tiny_cpu --data valid.txt
    python -m tsg.evaluate --model runs/tiny_cpu --data valid.txt --train_data tsg/sample/tinystories_sample.txt
    python -m tsg.evaluate --model runs/qlora_cpu --data valid.jsonl --max_stories 500 --output eval.json
    make evaluate MODEL=runs/tiny_cpu VALID=valid.txt TRAIN=train.txt

Held-out scores (`--data`: .txt with `<|endoftext|>` separator lines, or .csv/.json/.jsonl/.parquet with a
`text` column; blank stories skipped) are exact sums over every story (or the first `--max_stories`): each
story is tokenized as the trainer does (text stripped, no BOS, the EOS token appended) and scored on its own
(no packing). Every token is predicted, the first and the closing EOS included, so every byte is paid for:
the first token from the EOS token alone as the start-of-story context (one forward pass of [EOS], the same
for every story), each later token from the story before it, at positions from 0 as in training (no EOS in
that context: tsg's isolated and pad packing never put one before a story). A story longer than the model's
context C is scored in windows of C tokens that start every C//2 tokens: each token is scored once, in the
first window that holds it, from at least C - C//2 tokens before it. Then

    eval_loss     = total NLL (nats) / predicted tokens (all tokens of all stories, with their EOS)
    perplexity    = exp(eval_loss)
    bits_per_byte = total NLL (nats) / UTF-8 bytes of the story texts (as tokenized: no separator, no EOS) / ln 2
    loss_after_first_token = NLL of tokens 2..n / their count: what the trainer's eval_loss estimates

Generation scores: `--num_samples_per_prompt` stories for each prompt (the ~20 openings in
tsg/metrics/prompts.txt, or `--prompts FILE`, one a line), sampled at temperature 1 with no top-k or top-p cut
and a fixed seed, scored by the story_scores metric (tsg/metrics/story_scores, an `evaluate` module):
eos_rate, mean_length, distinct_1/2/3, repeated_4gram_share and, with `--train_data`, copied_8gram_share.

The report (`--output`, default MODEL/eval_report.json, written atomically) holds every score, the settings,
the definitions and a few sample stories. Bad input stops with exit code 2 and one line `tsg.evaluate: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

if __name__ == "__main__" and not __package__:  # run as a file: tsg/ first on sys.path would shadow `evaluate`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from tsg import __version__  # noqa: E402
from tsg.config import ConfigError  # noqa: E402
from tsg.data import STORY_SEPARATOR, load_story_file, read_tinystories_txt  # noqa: E402
from tsg.generate import (GenerateError, Settings, Story, clean_story, fit_to_context,  # noqa: E402
                          generate_batches, generation_config, load_model, looks_like_path,
                          new_token_counts, progress_bars_only_on_a_terminal, prompt_texts, read_lines,
                          resolve_model_dir)
from tsg.model import context_length  # noqa: E402

PROG = "tsg.evaluate"
METRICS_DIR = Path(__file__).parent / "metrics"
STORY_SCORES = METRICS_DIR / "story_scores"
DEFAULT_PROMPTS = METRICS_DIR / "prompts.txt"
REPORT_NAME = "eval_report.json"
SCORE_KEYS = ("bits_per_byte", "eval_loss", "perplexity", "eos_rate", "mean_length", "distinct_1", "distinct_2",
              "distinct_3", "repeated_4gram_share", "copied_8gram_share")
N_SAMPLES = 3  # sample stories in the report and on the terminal

DEFINITIONS = {
    "tokens": "tokens of the stories as the trainer makes them: the text (stripped, a trailing <|endoftext|> marker "
              "removed) tokenized without special tokens, then the EOS token",
    "predicted_tokens": "every token of every story, the first and the closing EOS included (= tokens); each story "
                        "is scored alone (no packing)",
    "first_token": "predicted from the EOS token alone at position 0 (the start-of-story context, the same for "
                   "every story); every later token from the story tokens before it, at positions from 0 as in "
                   "training, with no EOS before the story",
    "bytes": "UTF-8 bytes of the story texts as tokenized (stripped, no separator line, no EOS marker)",
    "eval_loss": "total negative log-likelihood in nats / predicted_tokens",
    "perplexity": "exp(eval_loss)",
    "bits_per_byte": "total negative log-likelihood in nats / bytes / ln 2: every byte is paid for",
    "loss_after_first_token": "(total NLL - first_token_nll_nats) / (predicted_tokens - stories): tokens 2..n of "
                              "each story, what the trainer's eval_loss estimates",
    "windows": "a story longer than the model's context C is scored in windows of C tokens starting every C//2 "
               "tokens (positions restart at 0 in each); each token is scored once, in the first window that holds "
               "it, from at least C - C//2 tokens before it",
    "generated": "num_samples_per_prompt stories per prompt, sampled with the settings; scores are over the "
                 "continuations (the prompt left out)",
    "words": "n-grams are over words: the continuation lower-cased and split on whitespace (punctuation stays on "
             "its word); n-grams do not cross stories",
    "eos_rate": "share of the generated stories that reached the end-of-story token within max_new_tokens",
    "mean_length": "mean generated tokens per story, before the end-of-story token (that token not counted)",
    "distinct_n": "distinct word n-grams / all word n-grams, over all generated stories together",
    "repeated_4gram_share": "pooled over the stories: 4-grams that repeat an earlier 4-gram of the same story / "
                            "all 4-grams",
    "copied_8gram_share": "pooled: generated 8-grams (each occurrence) found verbatim in a training story "
                          "(--train_data, same words) / all generated 8-grams; null without --train_data",
}


class EvaluateError(ValueError):
    """Bad input: the message is one line that names the option and what is expected."""


# --- held-out scores ---


@dataclass
class HeldOut:
    """Sums over the scored stories, and the scores made from them."""

    stories: int = 0
    tokens: int = 0  # story tokens with the closing EOS: all of them are predicted
    bytes: int = 0
    nll: float = 0.0  # nats, all tokens
    first_token_nll: float = 0.0  # nats, the first token of each story (from the EOS context)
    long_stories: int = 0  # scored in several windows
    nll_per_story: list[float] = field(default_factory=list, repr=False)

    @property
    def predicted_tokens(self) -> int:
        return self.tokens

    @property
    def eval_loss(self) -> float | None:
        return self.nll / self.tokens if self.tokens else None

    @property
    def perplexity(self) -> float | None:
        return math.exp(min(self.eval_loss, 700.0)) if self.eval_loss is not None else None

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / self.bytes / math.log(2) if self.bytes else None

    @property
    def loss_after_first_token(self) -> float | None:
        """Nats per token over tokens 2..n of each story: what the trainer's eval_loss estimates."""
        rest = self.tokens - self.stories
        return (self.nll - self.first_token_nll) / rest if rest else None


def story_text(text: str, eos_token: str) -> str:
    """The text the trainer tokenizes (tsg.data.tokenize_stories): stripped, a trailing EOS marker removed."""
    return text.strip().removesuffix(eos_token).rstrip()


def story_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each story's token ids as the trainer makes them: no special tokens, the EOS token appended."""
    if tokenizer.eos_token_id is None:
        raise EvaluateError("--model: the tokenizer has no eos_token: stories cannot be scored")
    ids = tokenizer([story_text(t, tokenizer.eos_token) for t in texts], add_special_tokens=False,
                    verbose=False)["input_ids"] if texts else []
    return [story + [tokenizer.eos_token_id] for story in ids]


def windows(length: int, context: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows over a story of `length` tokens whose tokens 1..length-1 (0-based) are scored
    from the tokens before them: each window is tokens[begin:end] and scores its last `scored` tokens. One window
    when the story fits the context; else windows of `context` tokens every context//2 tokens, each token scored
    once, in the first window that holds it, so from at least context - context//2 tokens before it."""
    if context is None or length <= context:
        return [(0, length, length - 1)]
    if context < 2:
        raise EvaluateError(f"--model: a context of {context} token cannot score a story")
    stride = context // 2
    spans, scored_to, begin = [], 1, 0
    while scored_to < length:
        end = min(begin + context, length)
        spans.append((begin, end, end - scored_to))
        scored_to, begin = end, begin + stride
    return spans


def start_log_probs(model, eos: int) -> torch.Tensor:
    """log P(first token | the EOS token alone, at position 0): the same for every story (float64, on the CPU)."""
    with torch.inference_mode():
        one = torch.tensor([[eos]], device=model.device)
        logits = model(input_ids=one, attention_mask=torch.ones_like(one)).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def score_stories(model, tokenizer, texts: list[str], batch_size: int = 8, progress: bool = False) -> HeldOut:
    """Exact held-out sums over `texts` (see the module doc): each story's first token from the EOS token alone,
    the rest from the story before it (positions from 0, as trained), in windows when longer than the context."""
    eos = tokenizer.eos_token_id
    stories = story_token_ids(tokenizer, texts)
    context = context_length(model.config)
    start = start_log_probs(model, eos)
    result = HeldOut(stories=len(stories))
    sums = [[-start[ids[0]].item()] for ids in stories]  # each story's NLL, piece by piece
    result.first_token_nll = math.fsum(parts[0] for parts in sums)
    pieces = []  # (story, window tokens, tokens scored at its end)
    for index, (text, ids) in enumerate(zip(texts, stories)):
        spans = windows(len(ids), context)
        result.long_stories += len(spans) > 1
        pieces += [(index, ids[begin:end], scored) for begin, end, scored in spans if scored]
        result.tokens += len(ids)
        result.bytes += len(story_text(text, tokenizer.eos_token).encode("utf-8"))
    pieces.sort(key=lambda piece: -len(piece[1]))  # alike lengths together: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    from tqdm.auto import tqdm

    with tqdm(total=result.tokens, unit="tok", desc="Scoring stories", disable=not progress) as bar, \
            torch.inference_mode():
        bar.update(len(stories))
        for first in range(0, len(pieces), batch_size):
            batch = pieces[first:first + batch_size]
            width = len(batch[0][1])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, tokens, _) in enumerate(batch):
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, (index, tokens, scored) in enumerate(batch):
                n = len(tokens)
                nll = torch.nn.functional.cross_entropy(logits[row, n - 1 - scored:n - 1].float(),
                                                        ids[row, n - scored:n].to(logits.device), reduction="none")
                sums[index].append(nll.double().sum().item())
                bar.update(scored)
    result.nll_per_story = [math.fsum(parts) for parts in sums]
    result.nll = math.fsum(result.nll_per_story)
    return result


def read_stories(path: str, max_stories: int | None = None, text_column: str = "text") -> tuple[list[str], int]:
    """(the stories of a story file, blank ones skipped, the first max_stories of them; how many were blank)."""
    file = Path(path)
    if not file.is_file():
        raise EvaluateError(f"{path}: no such file" if not file.exists() else f"{path}: not a file")
    try:
        dataset = load_story_file(path, text_column)
    except ConfigError as e:
        raise EvaluateError(str(e)) from None
    texts, blank = [], 0
    for text in dataset["text"]:
        if isinstance(text, str) and text.strip():
            texts.append(text)
            if max_stories is not None and len(texts) >= max_stories:
                break
        else:
            blank += 1
    if not texts:
        raise EvaluateError(f"{path}: no stories (the file is empty or every story is blank)")
    return texts, blank


def iter_stories(path: str, text_column: str = "text") -> Iterator[str]:
    """The stories of a story file, streamed (a .txt file is never held in memory whole). A file that cannot be
    read as stories is an error here, before the first story is asked for."""
    if Path(path).suffix.lower() == ".txt":
        return read_tinystories_txt(path)
    try:
        dataset = load_story_file(path, text_column)
    except ConfigError as e:
        raise EvaluateError(str(e)) from None
    return (text for first in range(0, len(dataset), 10_000) for text in dataset[first:first + 10_000]["text"])


# --- generation scores ---


@dataclass(frozen=True)
class Told:
    """A generated story and what the scores need of it."""

    story: Story  # as tsg.generate.tell_stories tells it: the prompt and its continuation
    continuation: str  # the generated text alone, special tokens left out
    tokens: int  # generated tokens before the end-of-story token
    eos_reached: bool


def tell_and_count(model, tokenizer, prompts: list[str], settings: Settings, progress: bool = False) -> list[Told]:
    """The stories `tsg.generate.tell_stories` tells with these settings (the same batches, seed and calls, so the
    same stories), with the generated tokens counted and whether each reached the end-of-story token."""
    from transformers import set_seed

    settings.check()
    texts = prompt_texts(prompts, settings.start_marker)
    settings = fit_to_context(model, tokenizer, prompts, settings)
    config = generation_config(model, tokenizer, settings)
    set_seed(settings.seed)
    told = []
    for first, output, new in generate_batches(model, tokenizer, texts, config, settings.batch_size,
                                               progress=progress):
        decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
        new = new.cpu()
        counts = new_token_counts(new, config.eos_token_id)  # the end-of-story token included, as tell_stories
        reached_end = torch.isin(new, torch.tensor(config.eos_token_id)).any(dim=1).tolist()
        for row, (text, tokens, reached) in enumerate(zip(decoded, counts, reached_end)):
            index, number = divmod(row, settings.num_return_sequences)
            prompt = prompts[first + index]
            length = tokens - reached  # before the end-of-story token
            story = Story(prompt, number + 1, clean_story(text, prompt, settings.start_marker, settings.end_marker),
                          tokens)
            continuation = tokenizer.decode(new[row, :length], skip_special_tokens=True).strip()
            told.append(Told(story, continuation, length, reached))
    return told


def load_story_scores(**kwargs):
    """The story_scores metric (an `evaluate.Metric`), loaded by path: no network (kept in memory by default)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(STORY_SCORES), **kwargs)


def generation_scores(told: list[Told], train_texts: Iterable[str] | None = None) -> dict:
    """story_scores over the continuations of `told`."""
    return load_story_scores().compute(
        predictions=[t.continuation for t in told], eos_reached=[t.eos_reached for t in told],
        lengths=[t.tokens for t in told], train_texts=train_texts,
    )


# --- the report ---


def write_json(path: Path, report: dict) -> Path:
    """JSON, atomically: a temp file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    generated = report["generated_stories"]
    if generated:
        rows += [
            ("generated", f"{generated} stories ({report['settings']['num_samples_per_prompt']} per prompt, "
                          f"max {report['settings']['max_new_tokens']} new tokens)"),
            ("eos_rate", _number(report["eos_rate"], 3)),
            ("mean_length", f"{_number(report['mean_length'], 1)} tokens"),
            ("distinct_1/2/3", " / ".join(_number(report[f"distinct_{n}"], 3) for n in (1, 2, 3))),
            ("repeated_4gram_share", _number(report["repeated_4gram_share"], 3)),
            ("copied_8gram_share", _number(report["copied_8gram_share"], 3)
             + ("" if report["train_data"] else " (no --train_data)")),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"{PROG}: {report['model']} on {report['data']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for i, sample in enumerate(report["samples"], 1):
        end = "ended" if sample["eos_reached"] else "cut at max_new_tokens"
        print(f"--- sample {i} ({sample['tokens']} tokens, {end}) ---\n{sample['story']}")


# --- the command line ---


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one-line exceptions instead of a usage screen."""

    def error(self, message):
        raise EvaluateError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tsg.evaluate", description="\n\n".join(__doc__.split("\n\n")[:2]),
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--model", metavar="DIR", required=True,
        help="folder saved by tsg.train, an adapter run (adapter_config.json), or a hub name")
    add("--data", metavar="VALID", required=True,
        help=f"held-out stories: .txt with {STORY_SEPARATOR} separator lines, or .csv/.json/.jsonl/.parquet "
             "with a text column")
    add("--prompts", metavar="FILE", help="story openings, one a line (default: tsg/metrics/prompts.txt)")
    add("--output", metavar="FILE", help=f"the JSON report (default: MODEL/{REPORT_NAME})")
    add("--max_stories", metavar="N", type=int, help="score only the first N stories of --data")
    add("--batch_size", metavar="N", type=int, default=8, help="windows scored together, prompts told together")
    add("--num_samples_per_prompt", metavar="N", type=int, default=5,
        help="stories told from each prompt (0: no generation scores)")
    add("--max_new_tokens", metavar="N", type=int, default=256, help="most tokens told after each prompt")
    add("--seed", metavar="N", type=int, default=0, help="sampling seed")
    add("--train_data", metavar="TRAIN",
        help="the training stories (any --data format): the share of generated 8-grams copied from them")
    add("--text_column", default="text", help="the column that holds the stories in .csv/.json/.jsonl/.parquet files")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise EvaluateError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.max_stories is not None and args.max_stories < 1:
        raise EvaluateError(f"--max_stories: expected a positive integer, got {args.max_stories}")
    if args.num_samples_per_prompt < 0:
        raise EvaluateError(f"--num_samples_per_prompt: expected 0 or more, got {args.num_samples_per_prompt}")
    for option, path in (("--data", args.data), ("--train_data", args.train_data)):
        if path is not None and not Path(path).is_file():
            raise EvaluateError(f"{option} {path}: no such file" if not Path(path).exists() else
                                f"{option} {path}: not a file")
    if args.output and Path(args.output).is_dir():
        raise EvaluateError(f"--output {args.output}: is a folder")


def report_path(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    model = Path(args.model).expanduser()
    if not model.is_dir():
        if looks_like_path(args.model) or model.exists():
            raise EvaluateError(f"--model {args.model}: no such folder")
        raise EvaluateError(f"--output: required when --model is a hub name ({args.model})")
    return model / REPORT_NAME


def evaluate_model(args: argparse.Namespace) -> dict:
    """Everything the report holds (see the module doc)."""
    started = time.monotonic()
    progress = sys.stderr.isatty()
    prompts = read_lines(args.prompts or str(DEFAULT_PROMPTS), "--prompts") if args.num_samples_per_prompt else []
    resolve_model_dir(args.model)  # a missing model stops here, before the stories are read
    try:
        texts, blank = read_stories(args.data, args.max_stories, args.text_column)
    except EvaluateError as e:
        raise EvaluateError(f"--data {e}") from None
    try:
        train_texts = iter_stories(args.train_data, args.text_column) if args.train_data else None
    except EvaluateError as e:
        raise EvaluateError(f"--train_data {e}") from None
    with progress_bars_only_on_a_terminal():
        model, tokenizer = load_model(args.model, device=args.device)
    settings = Settings(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=max(1, args.num_samples_per_prompt), seed=args.seed,
                        batch_size=args.batch_size)
    if prompts:  # a prompt longer than the context stops here, before the scoring
        settings = fit_to_context(model, tokenizer, prompts, settings)
    held_out = score_stories(model, tokenizer, texts, args.batch_size, progress)
    told, scores = [], dict.fromkeys(SCORE_KEYS[3:])
    if prompts:
        told = tell_and_count(model, tokenizer, prompts, settings, progress)
        if train_texts is not None:
            from tqdm.auto import tqdm

            train_texts = tqdm(train_texts, desc="Reading training stories", unit="story", disable=not progress)
        scores.update(generation_scores(told, train_texts))
    return {
        "bits_per_byte": held_out.bits_per_byte,
        "eval_loss": held_out.eval_loss,
        "perplexity": held_out.perplexity,
        **{key: scores[key] for key in SCORE_KEYS[3:]},
        "model": args.model,
        "data": args.data,
        "stories": held_out.stories,
        "tokens": held_out.tokens,
        "predicted_tokens": held_out.predicted_tokens,
        "bytes": held_out.bytes,
        "nll_nats": held_out.nll,
        "first_token_nll_nats": held_out.first_token_nll,
        "loss_after_first_token": held_out.loss_after_first_token,
        "long_stories": held_out.long_stories,
        "empty_stories_skipped": blank,
        "context": context_length(model.config),
        "generated_stories": len(told),
        "prompts": len(prompts),
        "train_data": args.train_data,
        "settings": {
            "max_stories": args.max_stories, "text_column": args.text_column, "batch_size": args.batch_size,
            "num_samples_per_prompt": args.num_samples_per_prompt,
            "prompts_file": str(args.prompts or DEFAULT_PROMPTS) if prompts else None,
            "max_new_tokens": settings.max_new_tokens,  # lowered to fit the context after the longest prompt
            "max_new_tokens_asked": args.max_new_tokens,
            "do_sample": True, "temperature": settings.temperature, "top_k": None, "top_p": settings.top_p,
            "seed": settings.seed, "device": str(model.device),
        },
        "definitions": DEFINITIONS,
        "samples": [{"prompt": t.story.prompt, "story": t.story.text, "tokens": t.tokens,
                     "eos_reached": t.eos_reached} for t in told[:: max(1, len(told) // N_SAMPLES)][:N_SAMPLES]],
        "tsg_version": __version__,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        check_args(args)
        output = report_path(args)
        report = evaluate_model(args)
        try:
            write_json(output, report)
        except OSError as e:
            raise EvaluateError(f"--output {output}: cannot write the report ({e.strerror or e})") from None
    except (EvaluateError, GenerateError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print_summary(report)
    print(f"{PROG}: wrote {output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
