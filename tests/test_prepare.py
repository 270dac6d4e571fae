"""tsg prepare: TinyStories .txt -> train.csv / valid.csv (or the seed's X_train.csv / X_test.csv), and those CSV
files train."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import SEP, error_line, tiny_cli, write_txt
from datasets import DatasetDict

from tsg import cli, data, train

START = "<|startoftext|>"


@pytest.fixture
def source(tmp_path, sample_stories):
    """20 sample stories plus a blank one (skipped) and one with CSV-hostile characters."""
    stories = sample_stories[:10] + ["  "] + ['She said, "hi, you";\nthen left.'] + sample_stories[10:19]
    return write_txt(tmp_path / "in.txt", stories), [s for s in stories if s.strip()]


def read(path):
    return pd.read_csv(path, keep_default_na=False)


def prepare(input_path, output_dir, **options) -> dict[str, int]:
    """`tsg prepare INPUT OUTPUT_DIR --key value ...`; returns how many stories each CSV file holds (0: none)."""
    words = [w for key, value in options.items() for w in (f"--{key}", str(value))]
    cli.main(["prepare", str(input_path), str(output_dir), *words])
    files = {"train": Path(output_dir) / "train.csv", "valid": Path(output_dir) / "valid.csv"}
    return {name: len(read(path)) if path.exists() else 0 for name, path in files.items()}


def test_writes_train_and_valid_csv_with_wrapped_stories(tmp_path, source):
    path, stories = source
    counts = prepare(str(path), str(tmp_path / "out"), train_fraction=0.8)
    assert counts == {"train": 16, "valid": 4}
    train_df, valid_df = read(tmp_path / "out" / "train.csv"), read(tmp_path / "out" / "valid.csv")
    assert list(train_df.columns) == ["text"] and list(valid_df.columns) == ["text"]
    assert (len(train_df), len(valid_df)) == (16, 4)
    texts = list(train_df["text"]) + list(valid_df["text"])
    assert all(t.startswith(START) and t.endswith(SEP) for t in texts)
    unwrapped = [t[len(START): -len(SEP)] for t in texts]
    assert sorted(unwrapped) == sorted(stories)  # every story once, text intact (quotes, commas, new lines)
    assert not set(train_df["text"]) & set(valid_df["text"])
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))


def test_ndata_takes_the_first_stories(tmp_path, source):
    path, stories = source
    counts = prepare(str(path), str(tmp_path / "out"), ndata=10, train_fraction=0.5)
    assert counts == {"train": 5, "valid": 5}
    texts = list(read(tmp_path / "out" / "train.csv")["text"]) + list(read(tmp_path / "out" / "valid.csv")["text"])
    assert sorted(texts) == sorted(f"{START}{s}{SEP}" for s in stories[:10])


@pytest.mark.parametrize("fraction, n_train", [(0.9, 18), (0.5, 10), (0.26, 5)])
def test_split_sizes_follow_train_fraction(tmp_path, source, fraction, n_train):
    path, _ = source
    assert prepare(str(path), str(tmp_path / "out"), train_fraction=fraction) == \
        {"train": n_train, "valid": 20 - n_train}
    assert len(read(tmp_path / "out" / "train.csv")) == n_train


def test_split_is_deterministic_with_seed(tmp_path, source):
    path, _ = source
    prepare(str(path), str(tmp_path / "a"), split_random_seed=7)
    prepare(str(path), str(tmp_path / "b"), split_random_seed=7)
    prepare(str(path), str(tmp_path / "c"), split_random_seed=8)
    for name in ("train.csv", "valid.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_custom_markers(tmp_path, source):
    path, stories = source
    prepare(str(path), str(tmp_path / "out"), train_fraction=0.5, start_marker="", end_marker="\n<END>")
    texts = list(read(tmp_path / "out" / "train.csv")["text"]) + list(read(tmp_path / "out" / "valid.csv")["text"])
    assert sorted(texts) == sorted(f"{s}\n<END>" for s in stories)


@pytest.mark.parametrize("kwargs, n_train", [(dict(train_fraction=1.0), 20), (dict(ndata=1), 1)],
                         ids=["fraction-1", "ndata-1"])
def test_split_without_validation_stories(tmp_path, source, kwargs, n_train):
    path, _ = source
    assert prepare(str(path), str(tmp_path / "out"), **kwargs) == {"train": n_train, "valid": 0}
    assert len(read(tmp_path / "out" / "train.csv")) == n_train
    assert not (tmp_path / "out" / "valid.csv").exists()


def test_no_stale_valid_csv_when_everything_trains(tmp_path, source):
    path, _ = source
    assert prepare(str(path), str(tmp_path / "out"), train_fraction=0.5)["valid"] > 0
    assert (tmp_path / "out" / "valid.csv").exists()
    assert prepare(str(path), str(tmp_path / "out"), train_fraction=1.0)["valid"] == 0
    assert not (tmp_path / "out" / "valid.csv").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(ndata=0), "ndata"),
    (dict(train_fraction=0.0), "train_fraction"),
    (dict(train_fraction=1.5), "train_fraction"),
    (dict(train_fraction="most"), "train_fraction"),
])
def test_bad_arguments(tmp_path, source, kwargs, message, capsys):
    path, _ = source
    with pytest.raises(SystemExit) as exit_info:
        prepare(str(path), str(tmp_path / "out"), **kwargs)
    assert exit_info.value.code == 2 and message in error_line(capsys.readouterr().err, "prepare")
    assert not (tmp_path / "out").exists()


def test_missing_and_empty_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare(str(tmp_path / "nope.txt"), str(tmp_path / "out"))
    assert "nope.txt: no such file" in error_line(capsys.readouterr().err, "prepare")
    (tmp_path / "blank.txt").write_text(f"\n{SEP}\n \n{SEP}\n")
    with pytest.raises(SystemExit):
        prepare(str(tmp_path / "blank.txt"), str(tmp_path / "out"))
    assert "blank.txt: no stories" in error_line(capsys.readouterr().err, "prepare")
    assert not (tmp_path / "out").exists()


def test_python_m_form_prints_the_counts(tmp_path, source, capsys):
    from tsg import prepare as command

    path, _ = source
    command.main([str(path), str(tmp_path / "out"), "--ndata", "12", "--train_fraction", "0.75",
                  "--split_random_seed", "3"])
    assert "9 training and 3 held-out stories" in capsys.readouterr().err
    assert len(read(tmp_path / "out" / "valid.csv")) == 3


def test_seed_outname_writes_train_and_test_beside_it(tmp_path, source):
    path, stories = source
    cli.main(["prepare", "--input_file", str(path), "--output_file", str(tmp_path / "data" / "stories_20.csv"),
              "--train_fraction", "0.75"])
    train_df = read(tmp_path / "data" / "stories_20_train.csv")
    test_df = read(tmp_path / "data" / "stories_20_test.csv")
    assert (len(train_df), len(test_df)) == (15, 5)
    assert sorted(t[len(START): -len(SEP)] for t in [*train_df["text"], *test_df["text"]]) == sorted(stories)


def test_csv_loads_and_marker_is_not_doubled(tmp_path, source, tokenizer):
    path, stories = source
    prepare(str(path), str(tmp_path / "out"), train_fraction=0.8)
    train_set = data.load_story_file(str(tmp_path / "out" / "train.csv"))
    assert train_set.column_names == ["text"] and len(train_set) == 16
    tokens = data.tokenize_stories(DatasetDict({"train": train_set}), tokenizer)
    eos = tokenizer.eos_token_id
    for text, ids in zip(train_set["text"], tokens["train"]["input_ids"]):
        story = text[len(START): -len(SEP)]
        assert ids[-1] == eos and ids[-2] != eos  # one EOS, not the marker's and another
        assert ids.count(eos) == 1
        assert ids == tokenizer(START + story, add_special_tokens=False)["input_ids"] + [eos]


def test_prepared_csv_trains(tmp_path, source):
    path, _ = source
    prepare(str(path), str(tmp_path / "data"), train_fraction=0.8)
    out = tmp_path / "run"
    train.main(tiny_cli(tmp_path / "data" / "train.csv", out, "--validation_file",
                        str(tmp_path / "data" / "valid.csv"), max_steps=2, vocab_size=300))
    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["validation_file"].endswith("valid.csv")
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(AutoTokenizer.from_pretrained(out))
