"""story_scores: how varied, repetitive and copied a set of generated stories is, and how they end.

A self-contained `evaluate` metric module (it imports nothing from tsg), loaded by path, offline:

    import evaluate
    scores = evaluate.load("tsg/metrics/story_scores")          # or tsg.scoring.load_story_scores()
    scores.compute(predictions=["the cat sat on the mat", ...],
                   eos_reached=[True, ...], lengths=[7, ...], train_texts=["...", ...])

Words are the text lower-cased and split on whitespace (`text.lower().split()`): punctuation stays on its word,
so "mat." and "mat" differ. N-grams never cross from one story into another. Every share is pooled: a ratio of
sums over all the stories (long stories weigh more), and None where its denominator is 0.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated stories (tsg.scoring passes the continuations, prompts left out).
    references: not used (stories are scored on their own); accepted so that the usual call shape works.
    eos_reached (list of bool, optional): whether each story reached the end-of-story token within its budget.
    lengths (list of int, optional): the generated tokens of each story (tsg.scoring: tokens before the
        end-of-story token).
    train_texts (iterable of str, optional): the training stories, for copied_8gram_share; streamed once, so a
        generator over a large file works (only the generated stories' 8-grams are held in memory).
Returns:
    eos_rate: share of stories with eos_reached True (None without eos_reached).
    mean_length: mean of lengths (None without lengths).
    distinct_1, distinct_2, distinct_3: distinct word n-grams / all word n-grams, over all stories together.
    repeated_4gram_share: 4-grams that repeat an earlier 4-gram of the same story / all 4-grams, over all stories.
    copied_8gram_share: generated 8-grams (each occurrence) that occur verbatim in a training story / all
        generated 8-grams (None without train_texts).
Examples:
    >>> scores = evaluate.load("tsg/metrics/story_scores")
    >>> scores.compute(predictions=["a b a b a b"])["repeated_4gram_share"]
    0.3333333333333333
"""

_CITATION = """\
@article{eldan2023tinystories,
  title={TinyStories: How Small Can Language Models Be and Still Speak Coherent English?},
  author={Eldan, Ronen and Li, Yuanzhi}, journal={arXiv preprint arXiv:2305.07759}, year={2023}}
@inproceedings{li2016diversity,
  title={A Diversity-Promoting Objective Function for Neural Conversation Models},
  author={Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill}, booktitle={NAACL},
  year={2016}}
"""

DISTINCT_ORDERS = (1, 2, 3)
REPEAT_ORDER = 4
COPY_ORDER = 8


def words(text: str) -> list[str]:
    """The words n-grams are made of: lower-cased, split on whitespace."""
    return text.lower().split()


def ngrams(tokens: list[str], n: int):
    """The n-grams of a list of words, in order (an iterator of tuples)."""
    return zip(*(tokens[i:] for i in range(n)))


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def distinct(stories: list[list[str]], n: int) -> float | None:
    """Distinct n-grams / all n-grams, over all stories together."""
    counts = Counter(g for story in stories for g in ngrams(story, n))
    return share(len(counts), sum(counts.values()))


def repeated_share(stories: list[list[str]], n: int = REPEAT_ORDER) -> float | None:
    """n-grams that repeat an earlier n-gram of the same story / all n-grams (pooled over the stories)."""
    repeats = total = 0
    for story in stories:
        grams = list(ngrams(story, n))
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return share(repeats, total)


def copied_share(stories: list[list[str]], train_texts: Iterable[str], n: int = COPY_ORDER) -> float | None:
    """Generated n-grams (each occurrence) found verbatim in a training story / all generated n-grams."""
    counts = Counter(g for story in stories for g in ngrams(story, n))
    wanted, found = set(counts), set()
    for text in train_texts:
        if not wanted:
            break
        if isinstance(text, str):
            hits = wanted.intersection(ngrams(words(text), n))
            if hits:
                found |= hits
                wanted -= hits
    return share(sum(counts[g] for g in found), sum(counts.values()))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class StoryScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2305.07759"],
        )

    def _compute(self, predictions, references=None, eos_reached=None, lengths=None, train_texts=None):
        stories = [words(text) for text in predictions]
        for name, values in (("eos_reached", eos_reached), ("lengths", lengths)):
            if values is not None and len(values) != len(stories):
                raise ValueError(f"{name}: {len(values)} values for {len(stories)} predictions")
        scores = {
            "eos_rate": share(sum(map(bool, eos_reached)), len(eos_reached)) if eos_reached is not None else None,
            "mean_length": share(sum(lengths), len(lengths)) if lengths is not None else None,
        }
        scores.update({f"distinct_{n}": distinct(stories, n) for n in DISTINCT_ORDERS})
        scores["repeated_4gram_share"] = repeated_share(stories)
        scores["copied_8gram_share"] = copied_share(stories, train_texts) if train_texts is not None else None
        return scores
