"""Stories: loading every file format, the errors a user sees, tokenizing and the exact packed blocks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_FILE, SEP, tiny_args, write_txt
from datasets import Dataset, DatasetDict

from tsg import data
from tsg.files import UserError

IGNORE = -100
STORIES = [
    "Once upon a time, there was a cat.\nThe cat liked milk, \"a lot\", she said.",
    "Tom had a red ball. He threw it high.",
    "The sun was hot. Lily went to the park, and she played.\nThen she went home.",
    "A bird sang a song.",
    "Ben and Mia built a big tower of blocks. It fell down! They laughed.",
]


def load(train_file, **values):
    values.setdefault("validation_split_percentage", 0)
    return data.load_stories(tiny_args(train_file=str(train_file), **values), seed=0)


# --- reading story files ---


def test_read_tinystories_txt_splits_on_separator_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(f"First story\nsecond line\n{SEP}\n  {SEP}  \nSecond <|endoftext|> inline\n{SEP}\nTail story",
                    encoding="utf-8")
    assert list(data.read_tinystories_txt(str(path))) == [
        "First story\nsecond line", "", "Second <|endoftext|> inline", "Tail story"]


def test_sample_file_has_all_its_stories(sample_stories):
    assert data.SAMPLE_FILE == SAMPLE_FILE
    assert all(s.strip() and SEP not in s for s in sample_stories)


@pytest.fixture
def story_files(tmp_path):
    """The same stories as .txt, .csv, .json (list), .jsonl and .parquet."""
    files = {"txt": write_txt(tmp_path / "s.txt", STORIES)}
    with open(tmp_path / "s.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(STORIES))
    files["csv"] = tmp_path / "s.csv"
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": s, "n": i}) + "\n" for i, s in enumerate(STORIES)))
    files["jsonl"] = tmp_path / "s.jsonl"
    (tmp_path / "s.json").write_text(json.dumps([{"text": s} for s in STORIES]))
    files["json"] = tmp_path / "s.json"
    Dataset.from_dict({"text": STORIES, "n": list(range(len(STORIES)))}).to_parquet(str(tmp_path / "s.parquet"))
    files["parquet"] = tmp_path / "s.parquet"
    return files


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "json", "parquet"])
def test_every_format_loads_the_same_stories(story_files, fmt):
    dataset = data.load_story_file(str(story_files[fmt]))
    assert dataset.column_names == ["text"]
    assert dataset["text"] == STORIES


def test_text_column_is_renamed(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"story": s, "text": "decoy"}) + "\n" for s in STORIES))
    dataset = data.load_story_file(str(path), text_column="story")
    assert dataset.column_names == ["text"] and dataset["text"] == STORIES
    stories, counts = load(path, text_column="story")
    assert stories["train"]["text"] == STORIES and counts["train_stories"] == len(STORIES)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nothere\.txt"):
        load(tmp_path / "nothere.txt")


def test_unknown_extension(tmp_path):
    (tmp_path / "s.xml").write_text("<story/>")
    with pytest.raises(UserError, match=r"s\.xml.*'\.xml'"):
        data.load_story_file(str(tmp_path / "s.xml"))


def test_csv_without_text_column_names_file_and_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("title,body\na,b\nc,d\n")
    with pytest.raises(UserError) as err:
        load(path)
    assert str(path) in str(err.value) and "'text'" in str(err.value) and "body" in str(err.value)
    with pytest.raises(UserError, match="'story'"):
        load(path, text_column="story")


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"\n{oops\n')
    with pytest.raises(UserError, match=r"s\.jsonl"):
        load(path)


def test_all_blank_stories_is_an_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text(f"\n{SEP}\n   \n{SEP}\n\n{SEP}\n")
    with pytest.raises(UserError, match=r"blank\.txt: no stories"):
        load(path)


def test_csv_with_header_only_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text\n")
    with pytest.raises(UserError, match=r"empty\.csv"):
        load(path)


def test_csv_with_blank_cells_only_is_an_error(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text('text\n""\n"  "\n')
    with pytest.raises(UserError, match=r"blank\.csv"):
        load(path)


def test_empty_txt_file_is_a_config_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(UserError, match=r"empty\.txt"):
        load(path)


def test_blank_stories_are_skipped_and_counted(tmp_path):
    path = write_txt(tmp_path / "s.txt", [STORIES[0], "", STORIES[1], "   \n  ", STORIES[2]])
    stories, counts = load(path)
    assert stories["train"]["text"] == STORIES[:3]
    assert counts["empty_stories_skipped"] == 2 and counts["train_stories"] == 3
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(f'text\n"{STORIES[1]}"\n""\n"  "\n"{STORIES[3]}"\n')
    stories, counts = load(csv_path)
    assert stories["train"]["text"] == [STORIES[1], STORIES[3]] and counts["empty_stories_skipped"] == 2


def test_blank_validation_stories_are_counted_too(tmp_path):
    train = write_txt(tmp_path / "t.txt", STORIES[:3])
    valid = write_txt(tmp_path / "v.txt", ["", STORIES[3], " "])
    stories, counts = load(train, validation_file=str(valid))
    assert stories["validation"]["text"] == [STORIES[3]]
    assert counts == {"empty_stories_skipped": 2, "train_stories": 3, "validation_stories": 1}


def test_validation_split_by_percentage_is_reproducible(tmp_path, sample_stories):
    path = write_txt(tmp_path / "s.txt", sample_stories[:200])
    a, counts = load(path, validation_split_percentage=10)
    b, _ = load(path, validation_split_percentage=10)
    assert counts["train_stories"] == 180 and counts["validation_stories"] == 20
    assert a["train"]["text"] == b["train"]["text"] and a["validation"]["text"] == b["validation"]["text"]
    assert sorted(list(a["train"]["text"]) + list(a["validation"]["text"])) == sorted(sample_stories[:200])
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])
    c, _ = data.load_stories(tiny_args(train_file=str(path), validation_split_percentage=10), seed=1)
    assert list(c["validation"]["text"]) != list(a["validation"]["text"])  # the seed picks the held-out stories


def test_split_percentage_zero_means_no_validation(tmp_path):
    stories, counts = load(write_txt(tmp_path / "s.txt", STORIES))
    assert list(stories) == ["train"] and "validation_stories" not in counts


def test_one_story_cannot_be_split(tmp_path):
    with pytest.raises(UserError, match="one story"):
        load(write_txt(tmp_path / "s.txt", STORIES[:1]), validation_split_percentage=5)


def test_max_samples_limit_each_split(tmp_path, sample_stories):
    train = write_txt(tmp_path / "t.txt", sample_stories[:30])
    valid = write_txt(tmp_path / "v.txt", sample_stories[30:50])
    stories, counts = load(train, validation_file=str(valid), max_train_samples=7, max_eval_samples=3)
    assert stories["train"]["text"] == sample_stories[:7]
    assert stories["validation"]["text"] == sample_stories[30:33]
    assert counts["train_stories"] == 7 and counts["validation_stories"] == 3


def test_edited_txt_file_is_read_again(tmp_path):
    path = write_txt(tmp_path / "s.txt", STORIES[:2])
    assert load(path)[0]["train"]["text"] == STORIES[:2]
    write_txt(path, STORIES[2:])  # same path, new content: the datasets cache must not serve the old one
    assert load(path)[0]["train"]["text"] == STORIES[2:]


# --- tokenizing ---


def test_tokenize_appends_one_eos(tokenizer):
    stories = DatasetDict({"train": Dataset.from_dict({"text": STORIES[:2] + [STORIES[2] + SEP]})})
    tokens = data.tokenize_stories(stories, tokenizer)
    eos = tokenizer.eos_token_id
    ids = tokens["train"]["input_ids"]
    assert tokens["train"].column_names == ["input_ids"]
    for story, row in zip(STORIES[:3], ids):
        assert row == tokenizer(story, add_special_tokens=False)["input_ids"] + [eos]
        assert row.count(eos) == 1


def test_tokenizer_without_eos_is_refused(tokenizer):
    class NoEos:
        eos_token_id = None
        name_or_path = "no-eos"

    with pytest.raises(UserError, match="eos"):
        data.tokenize_stories(DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}), NoEos())


# --- packing: exact blocks ---

E, P = 99, 0  # EOS and pad ids, distinct here so that every position can be told apart
HAND = [[1, 2, 3, E], [4, 5, E], [6, 7, 8, 9, 10, 11, E]]  # the last is longer than the 5-token block


def test_pack_isolated_exact():
    rows = data.pack_stories(HAND, 5, "isolated", P)
    assert set(rows) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert rows["input_ids"].tolist() == [[1, 2, 3, E, 4], [5, E, 6, 7, 8], [9, 10, 11, E, P]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3, 0]]
    assert rows["labels"].tolist() == [[IGNORE, 2, 3, E, IGNORE], [IGNORE, E, IGNORE, 7, 8],
                                       [IGNORE, 10, 11, E, IGNORE]]


def test_pack_concat_exact():
    rows = data.pack_stories(HAND, 5, "concat", P)
    assert set(rows) == {"input_ids", "attention_mask", "labels"}
    assert rows["input_ids"].tolist() == [[1, 2, 3, E, 4], [5, E, 6, 7, 8], [9, 10, 11, E, P]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rows["labels"].tolist() == [[1, 2, 3, E, 4], [5, E, 6, 7, 8], [9, 10, 11, E, IGNORE]]


def test_pack_pad_exact():
    rows = data.pack_stories(HAND, 5, "pad", P)
    assert set(rows) == {"input_ids", "attention_mask", "labels"}
    assert rows["input_ids"].tolist() == [[1, 2, 3, E, P], [4, 5, E, P, P], [6, 7, 8, 9, 10], [11, E, P, P, P]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert rows["labels"].tolist() == [[1, 2, 3, E, IGNORE], [4, 5, E, IGNORE, IGNORE], [6, 7, 8, 9, 10],
                                       [11, E, IGNORE, IGNORE, IGNORE]]


def test_pack_exact_fit_has_no_padding_row():
    for packing in ("isolated", "concat"):
        rows = data.pack_stories([[1, 2, E], [3, E]], 5, packing, P)
        assert rows["input_ids"].tolist() == [[1, 2, E, 3, E]] and rows["attention_mask"].all()
    rows = data.pack_stories([[1, 2, E], [3, E]], 5, "isolated", P)
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert rows["labels"].tolist() == [[IGNORE, 2, E, IGNORE, E]]


def test_pack_pad_equal_to_eos_keeps_eos_labels():
    """In real runs pad == EOS: the EOS of a story still has its label, the pad after it does not."""
    rows = data.pack_stories([[1, 2, E], [3, E]], 4, "isolated", E)
    assert rows["input_ids"].tolist() == [[1, 2, E, 3], [E, E, E, E]]
    assert rows["labels"].tolist() == [[IGNORE, 2, E, IGNORE], [IGNORE] * 4]  # [E] starts the 2nd row: a new piece
    rows = data.pack_stories([[1, 2, E], [3, E]], 3, "pad", E)
    assert rows["labels"].tolist() == [[1, 2, E], [3, E, IGNORE]]


def test_pack_unknown_mode():
    with pytest.raises(ValueError, match="packing"):
        data.pack_stories(HAND, 5, "stuffed", P)


def test_pack_no_stories():
    for packing in ("isolated", "concat", "pad"):
        rows = data.pack_stories([], 8, packing, P)
        assert rows["input_ids"].shape == (0, 8)


def _random_stories(rng, n, eos, low=1, high=40):
    return [list(rng.integers(1, eos, size=rng.integers(low, high))) + [eos] for _ in range(n)]


@pytest.mark.parametrize("packing", ["isolated", "concat", "pad"])
def test_every_token_kept_and_eos_labelled(packing):
    """No token is dropped; every story's EOS keeps its label (isolated: unless a piece starts with it)."""
    rng = np.random.default_rng(0)
    eos = 500
    stories = _random_stories(rng, 60, eos, high=70)
    block = 32
    rows = data.pack_stories(stories, block, packing, pad_token_id=eos)
    ids, mask, labels = rows["input_ids"], rows["attention_mask"].astype(bool), rows["labels"]
    assert ids.shape[1] == block and ids.dtype == np.int64
    flat = np.concatenate(stories)
    assert ids[mask].tolist() == flat.tolist()  # every token, in order
    assert (labels[~mask] == IGNORE).all()
    eos_at = mask & (ids == eos)
    assert eos_at.sum() == len(stories)
    if packing == "isolated":
        starts = rows["position_ids"] == 0
        assert (labels[eos_at & ~starts] == eos).all()
        assert (labels[eos_at & starts] == IGNORE).all()
        assert (eos_at & starts).sum() < len(stories)
        real_labels = labels[mask]
        assert (real_labels[~starts[mask]] == ids[mask][~starts[mask]]).all()
    else:
        assert (labels[eos_at] == eos).all()
        assert (labels[mask] == ids[mask]).all()
    if packing == "pad":  # one story per row: no row holds tokens of two stories
        for row, m in zip(ids, mask):
            assert (row[m][:-1] != eos).all()
    else:  # packed: only the last row has padding
        assert mask[:-1].all()


def test_isolated_positions_restart_per_story_and_row():
    rng = np.random.default_rng(1)
    stories = _random_stories(rng, 40, 300, high=50)
    block = 16
    rows = data.pack_stories(stories, block, "isolated", 0)
    pos = rows["position_ids"].reshape(-1)
    real = rows["attention_mask"].reshape(-1).astype(bool)
    expected = []
    for story in stories:
        expected += list(range(len(story)))
    # positions restart at every story start and at every row start
    flat_index = np.arange(len(expected))
    offsets = np.zeros(len(expected), dtype=int)
    starts = {0} | set(np.cumsum([len(s) for s in stories])[:-1].tolist())
    last = 0
    for i in flat_index:
        if i in starts or i % block == 0:
            last = i
        offsets[i] = i - last
    assert pos[real].tolist() == offsets.tolist()
    assert (pos[~real] == 0).all()


def test_pack_dataset_and_describe(tokenizer, sample_stories):
    stories = DatasetDict({"train": Dataset.from_dict({"text": sample_stories[:50]}),
                           "validation": Dataset.from_dict({"text": sample_stories[50:60]})})
    tokens = data.tokenize_stories(stories, tokenizer)
    blocks = data.pack_dataset(tokens, 64, "isolated", tokenizer.pad_token_id)
    assert set(blocks["train"].column_names) == {"input_ids", "attention_mask", "labels", "position_ids"}
    n_tokens = sum(len(x) for x in tokens["train"]["input_ids"])
    assert len(blocks["train"]) == -(-n_tokens // 64)
    summary = data.describe(stories, tokens, blocks, {"empty_stories_skipped": 3}, 64)
    assert summary["empty_stories_skipped"] == 3
    assert summary["train"]["stories"] == 50 and summary["train"]["tokens"] == n_tokens
    assert summary["train"]["blocks"] == len(blocks["train"])
    assert summary["train"]["pad_share"] == pytest.approx(1 - n_tokens / (len(blocks["train"]) * 64))
    assert 0 <= summary["train"]["pad_share"] < 64 / n_tokens * 1.01
    assert summary["validation"]["stories"] == 10
    pad_blocks = data.pack_dataset(tokens, 64, "pad", tokenizer.pad_token_id)
    assert data.describe(stories, tokens, pad_blocks, {"empty_stories_skipped": 0}, 64)["train"]["pad_share"] > \
        summary["train"]["pad_share"]


# --- the collator and its mask ---


def test_block_causal_mask_exact():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = data.block_causal_mask(pos, additive=False)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    additive = data.block_causal_mask(pos, additive=True, dtype=torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive[0, 0] == 0, expected)
    assert (additive[0, 0][~expected] == torch.finfo(torch.float32).min).all()


def test_block_collator_modes():
    rows = data.pack_stories(HAND, 5, "isolated", P)
    batch_rows = [{k: v[i].tolist() for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    sdpa = data.BlockCollator("sdpa")(batch_rows)
    assert sdpa["attention_mask"].shape == (3, 1, 5, 5) and sdpa["attention_mask"].dtype == torch.bool
    assert torch.equal(sdpa["input_ids"], torch.tensor(rows["input_ids"]))
    assert torch.equal(sdpa["position_ids"], torch.tensor(rows["position_ids"]))
    assert torch.equal(sdpa["labels"], torch.tensor(rows["labels"]))
    # row 0 = story 1 (4 tokens) + first token of story 2: that token sees only itself
    assert sdpa["attention_mask"][0, 0, 4].tolist() == [False, False, False, False, True]
    eager = data.BlockCollator("eager")(batch_rows)
    assert eager["attention_mask"].dtype == torch.float32
    assert torch.equal(eager["attention_mask"] == 0, sdpa["attention_mask"])
    # flash attention separates stories by position ids only in a single row: the batch is flattened
    flash = data.BlockCollator("flash_attention_2")(batch_rows)
    assert "attention_mask" not in flash
    assert flash["input_ids"].shape == (1, 15) and torch.equal(flash["input_ids"][0], sdpa["input_ids"].flatten())
    assert torch.equal(flash["position_ids"][0], sdpa["position_ids"].flatten())
    assert torch.equal(flash["labels"][0], sdpa["labels"].flatten())
    concat = data.pack_stories(HAND, 5, "concat", P)
    concat_rows = [{k: v[i].tolist() for k, v in concat.items()} for i in range(3)]
    batch = data.BlockCollator("sdpa")(concat_rows)
    assert batch["attention_mask"].shape == (3, 5) and "position_ids" not in batch


def test_counts_for_bits_per_byte_respect_the_split():
    """UTF-8 bytes of a split's stories only (a split is a view on a bigger table), and labelled tokens."""
    from datasets import Dataset

    parts = Dataset.from_dict({"text": ["héllo", "ab", "xyz"]}).train_test_split(test_size=1, seed=0)
    held_out = parts["test"]["text"][0]
    assert data.count_bytes(parts["test"]) == len(held_out.encode("utf-8"))
    assert data.count_bytes(parts["train"]) == 11 - len(held_out.encode("utf-8"))  # é is two bytes
    rows = data.pack_stories([[5, 6, 7], [8, 9]], 4, "isolated", 0)
    blocks = Dataset.from_dict({key: value.tolist() for key, value in rows.items()})
    assert data.count_labels(blocks) == int((rows["labels"] != -100).sum()) == 2  # 6 and 7


def test_large_story_files_tokenize_on_every_core(monkeypatch):
    """tsg train's default processes for tokenizing and packing: one per usable core once the story text is large
    enough to pay for starting them, one (in the process) below that."""
    stories = DatasetDict({"train": Dataset.from_dict({"text": ["Once upon a time. " * 50] * 40})})
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert data.default_num_proc(stories) is None  # ~36 kB
    monkeypatch.setattr(data, "PARALLEL_BYTES", 10_000)
    assert data.default_num_proc(stories) == 3
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0})
    assert data.default_num_proc(stories) is None
