"""The full offline TinyStories subset (../shared/data/tinystories next to the repository): loading, packing and a
short training. Skipped where the data is not there."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, tiny_cli

from tsg import data, train
from tsg.config import StoryArguments

TRAIN = SHARED_DATA / "train.txt"
VALID = SHARED_DATA / "valid.txt"
N_TRAIN, N_VALID = 5974, 1065  # the counts in SHARED_DATA/SOURCES.md

pytestmark = pytest.mark.skipif(not (TRAIN.is_file() and VALID.is_file()),
                                reason=f"the full TinyStories subset is not in {SHARED_DATA}")


@pytest.fixture(scope="module")
def full(tokenizer):
    args = StoryArguments(model_type="gpt2", train_file=str(TRAIN), validation_file=str(VALID), block_size=256)
    stories, counts = data.load_stories(args, seed=42)
    tokens = data.tokenize_stories(stories, tokenizer)
    blocks = data.pack_dataset(tokens, 256, "isolated", tokenizer.pad_token_id)
    return stories, counts, tokens, blocks


def test_story_counts_match_sources(full):
    stories, counts, _, _ = full
    assert counts == {"empty_stories_skipped": 0, "train_stories": N_TRAIN, "validation_stories": N_VALID}
    assert len(stories["train"]) == N_TRAIN and len(stories["validation"]) == N_VALID
    lengths = [len(s) for s in stories["validation"]["text"]]
    assert 200 < min(lengths) and max(lengths) < 5000  # whole stories, not lines or merged files
    assert not any("<|endoftext|>" in s for s in stories["validation"]["text"])


def test_isolated_packing_wastes_under_one_percent(full, tokenizer):
    stories, counts, tokens, blocks = full
    summary = data.describe(stories, tokens, blocks, counts, 256)
    for split, n in (("train", N_TRAIN), ("validation", N_VALID)):
        assert summary[split]["stories"] == n
        assert summary[split]["pad_share"] < 0.01, summary[split]
        # every story's EOS is in the blocks: count them among real tokens
        ids = blocks[split].with_format("numpy")[:]
        real = ids["attention_mask"] == 1
        assert int(((ids["input_ids"] == tokenizer.eos_token_id) & real).sum()) == n
    assert summary["train"]["tokens"] > 1_000_000


def test_short_training_on_the_full_subset(tmp_path):
    out = tmp_path / "out"
    train.main(tiny_cli(TRAIN, out, "--validation_file", str(VALID), max_steps=5, block_size=128,
                        per_device_train_batch_size=8, max_eval_samples=64))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert 0 < evaluation["eval_loss"] < 7.0
    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["train_file"] == str(TRAIN)
