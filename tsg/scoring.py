"""Scores of a model: exact held-out loss and bits per byte, and the quality of the stories it tells.

Held-out scores (`data`: .txt with `<|endoftext|>` separator lines, or .csv/.json/.jsonl/.parquet with a
`text` column; blank stories skipped) are exact sums over every story (or the first `max_stories`): each
story is tokenized as the trainer does (tsg.data.story_token_ids: text stripped, no BOS, the EOS token
appended) and scored on its own (no packing). Every token is predicted, the first and the closing EOS included,
so every byte is paid for: the first token from the EOS token alone as the start-of-story context (one forward pass of [EOS], the same
for every story), each later token from the story before it, at positions from 0 as in training (no EOS in
that context: tsg's isolated and pad packing never put one before a story). A story longer than the model's
context C is scored in windows of C tokens that start every C//2 tokens: each token is scored once, in the
first window that holds it, from at least C - C//2 tokens before it. Then

    eval_loss     = total NLL (nats) / predicted tokens (all tokens of all stories, with their EOS)
    perplexity    = exp(eval_loss)
    bits_per_byte = total NLL (nats) / UTF-8 bytes of the story texts (as tokenized: no separator, no EOS) / ln 2
    loss_after_first_token = NLL of tokens 2..n / their count: what the trainer's eval_loss estimates

Generation scores: `num_samples_per_prompt` stories for each prompt (the ~20 openings in
tsg/metrics/prompts.txt, or a file of one a line), sampled at temperature 1 with no top-k or top-p cut
and a fixed seed, scored by the story_scores metric (tsg/metrics/story_scores, an `evaluate` module):
eos_rate, mean_length, distinct_1/2/3, repeated_4gram_share and, with the training stories, copied_8gram_share.

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from tsg.data import story_text, story_token_ids
from tsg.files import UserError
from tsg.model import context_length

METRICS_DIR = Path(__file__).parent / "metrics"
STORY_SCORES = METRICS_DIR / "story_scores"
DEFAULT_PROMPTS = METRICS_DIR / "prompts.txt"
SCORE_KEYS = ("bits_per_byte", "eval_loss", "perplexity", "eos_rate", "mean_length", "distinct_1", "distinct_2",
              "distinct_3", "repeated_4gram_share", "copied_8gram_share")

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
                          "(train_data, same words) / all generated 8-grams; null without train_data",
}


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


def windows(length: int, context: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows over a story of `length` tokens whose tokens 1..length-1 (0-based) are scored
    from the tokens before them: each window is tokens[begin:end] and scores its last `scored` tokens. One window
    when the story fits the context; else windows of `context` tokens every context//2 tokens, each token scored
    once, in the first window that holds it, so from at least context - context//2 tokens before it."""
    if context is None or length <= context:
        return [(0, length, length - 1)]
    if context < 2:
        raise UserError(f"model: a context of {context} token cannot score a story")
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


# --- generation scores ---


def load_story_scores(**kwargs):
    """The story_scores metric (an `evaluate.Metric`), loaded by path: no network (kept in memory by default)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(STORY_SCORES), **kwargs)



def generation_scores(stories: list, train_texts: Iterable[str] | None = None) -> dict:
    """story_scores over the continuations of `stories` (tsg.generation.Story, as tell_stories tells them)."""
    return load_story_scores().compute(
        predictions=[s.continuation for s in stories], eos_reached=[s.ended for s in stories],
        lengths=[s.length for s in stories], train_texts=train_texts,
    )
