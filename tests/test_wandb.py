"""W&B tracking: one short offline training run through `tsg.train.main`, read back from the run's own
transaction log (`wandb/offline-run-*/run-*.wandb`): the config, the history (losses, perplexity, learning rate,
tokens seen and per second) and the cumulative table of sample stories; the `wandb sync` hint printed without
an API key; and the story callback's promises (random state, train mode, a PeftModel).

Nothing here reaches a server: runs are offline (WANDB_MODE=offline), with no API key, and wandb's home
folders point into the test's temporary folder.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cli

from tsg import train, trainer as training
from tsg.callbacks import DEFAULT_SAMPLE_PROMPTS, SAMPLE_COLUMNS, SAMPLES_KEY, SampleStoriesCallback

STEPS, SAMPLE_STEPS, ROWS_PER_STEP, BLOCK = 4, 2, 4, 64  # tiny_cli: 4 rows of 64 tokens per optimizer step


# --- reading a .wandb file: the leveldb log format (32 KiB blocks of checksummed fragments) of wandb Records ---

LOG_BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every wandb.proto Record in a run's transaction log (`run-<id>.wandb`), in the order written."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb transaction log (version 0)"
    payloads, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        if LOG_BLOCK - pos % LOG_BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += LOG_BLOCK - pos % LOG_BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding (preallocated end)
            continue
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {pos}"
        if kind == FULL:
            payloads.append(data)
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            payloads.append(pending + data)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@dataclass
class OfflineRun:
    output_dir: Path
    run_dir: Path  # output_dir/wandb/offline-run-<time>-<id>
    config: dict  # every config update, merged
    history: list[dict]  # one dict per wandb.log row

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]

    def table(self, row: dict) -> dict:
        """The table JSON file a history row of the samples key points at."""
        return json.loads((self.run_dir / "files" / row[f"{SAMPLES_KEY}/path"]).read_text(encoding="utf-8"))


def read_offline_run(output_dir: Path) -> OfflineRun:
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {output_dir / 'wandb'}, found {runs}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, f"expected one run-*.wandb in {runs[0]}, found {logs}"
    config, history = {}, []
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update(_items(record.config.update))
        elif kind == "run":
            config.update(_items(record.run.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
    return OfflineRun(output_dir, runs[0], config, history)


# --- the environment: offline, no key, wandb's folders in tmp; os.environ restored afterwards ---


@contextmanager
def wandb_environment(root: Path, **values: str):
    """No API key and no netrc (HOME in `root`), wandb's cache/config/data folders in `root`, `values` set;
    os.environ comes back as it was (setup_wandb sets WANDB_PROJECT, WANDB_DIR and WANDB_MODE itself)."""
    saved = dict(os.environ)
    try:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
            os.environ.pop(name, None)
        home = root / "home"
        home.mkdir(exist_ok=True)
        os.environ.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                          WANDB_DATA_DIR=str(home / "data"), WANDB_SILENT="true", **values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_args(small_txt, out: Path, **values) -> list[str]:
    return tiny_cli(small_txt, out, max_steps=STEPS, report_to="wandb", sample_steps=SAMPLE_STEPS,
                    sample_max_new_tokens=8, eval_strategy="steps", eval_steps=2, validation_split_percentage=10,
                    logging_steps=1, **values)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, small_txt) -> OfflineRun:
    """A 4-step run with report_to wandb, offline, evaluated and sampled every 2 steps, read back from disk."""
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    out = root / "out"
    with wandb_environment(root, WANDB_MODE="offline"):
        try:
            train.main(run_args(small_txt, out))
        finally:
            wandb.finish()  # tsg leaves the run open for the final evaluation; a process exit would close it
    return read_offline_run(out)


# --- the run, read back ---


def test_config_holds_tsg_and_trainer_fields(offline_run):
    config = offline_run.config
    assert config["learning_rate"] == pytest.approx(3e-3)  # TrainingArguments, from transformers' WandbCallback
    assert config["max_steps"] == STEPS
    assert config["n_layer"] == 2  # the model config
    missing = [k for k in ("block_size", "packing", "sample_steps", "sample_prompts", "tsg_version") if k not in config]
    assert not missing, (f"tsg's fields {missing} are not in the W&B config: build_trainer must register "
                         "tsg.callbacks.WandbConfigCallback(args) when report_to holds wandb")
    assert config["block_size"] == BLOCK
    assert config["packing"] == "isolated"
    assert config["sample_steps"] == SAMPLE_STEPS
    assert config["sample_max_new_tokens"] == 8
    assert config["sample_prompts"] is None  # the default five
    assert "tsg/vocab_size" not in config  # the model's vocab_size is the one tsg asked for


def test_history_has_losses_perplexity_rate_and_tokens(offline_run):
    train_rows = offline_run.rows_with("train/loss")
    assert [row["train/global_step"] for row in train_rows] == [1, 2, 3, 4]  # logging_steps=1
    for row in train_rows:
        assert math.isfinite(row["train/loss"])
        assert row["train/learning_rate"] > 0
        # include_num_input_tokens_seen (tsg's default): every row of 4 x 64 tokens counts
        assert row["train/num_input_tokens_seen"] == row["train/global_step"] * ROWS_PER_STEP * BLOCK
        # the Trainer's own throughput (speed_metrics), logged on each training log: no second metric needed
        assert row["train/train_tokens_per_second"] > 0
    assert "train/tokens_per_second" not in {key for row in offline_run.history for key in row}
    eval_rows = offline_run.rows_with("eval/loss")
    assert [row["train/global_step"] for row in eval_rows][:2] == [2, 4]  # eval_steps=2 (then save() evaluates)
    for row in eval_rows:
        assert row["eval/perplexity"] == pytest.approx(math.exp(row["eval/loss"]))
        assert row["train/num_input_tokens_seen"] == row["train/global_step"] * ROWS_PER_STEP * BLOCK


def test_samples_table_is_logged_every_sample_steps_and_cumulative(offline_run):
    rows = offline_run.rows_with(f"{SAMPLES_KEY}/_type")
    assert rows, f"no '{SAMPLES_KEY}' table in the W&B history: is SampleStoriesCallback registered?"
    assert [row["train/global_step"] for row in rows] == [2, 4]  # every 2 steps; the end (step 4) not twice
    assert all(row[f"{SAMPLES_KEY}/_type"] == "table-file" for row in rows)
    tables = [offline_run.table(row) for row in rows]
    prompts = list(DEFAULT_SAMPLE_PROMPTS)
    for table, step in zip(tables, (2, 4)):
        assert table["columns"] == list(SAMPLE_COLUMNS)
        expected = [[s, p] for s in range(SAMPLE_STEPS, step + 1, SAMPLE_STEPS) for p in prompts]
        assert [row[:2] for row in table["data"]] == expected  # every step so far, one row per prompt
        for _, prompt, story in table["data"]:
            assert story.startswith(prompt) and len(story) > len(prompt)
    assert tables[1]["data"][:len(prompts)] == tables[0]["data"]  # the step-2 rows again, unchanged
    # the generation scores of tsg.scoring's story_scores metric, over the stories of that step
    for row in rows:
        assert 0 <= row[f"{SAMPLES_KEY}/eos_rate"] <= 1 and 0 < row[f"{SAMPLES_KEY}/mean_length"] <= 8
        assert 0 < row[f"{SAMPLES_KEY}/distinct_1"] <= 1


def test_offline_hint_without_api_key(offline_run, capsys, tmp_path):
    """Without a key (nor WANDB_MODE), tsg goes offline and prints the `wandb sync` command for output_dir."""
    from tsg.config import log_to_stderr, parse_args

    with wandb_environment(tmp_path):
        _, training_args = parse_args(run_args("stories.txt", offline_run.output_dir))
        log_to_stderr("train")
        training.setup_wandb(training_args, "out")
        mode, wandb_dir = os.environ.get("WANDB_MODE"), os.environ.get("WANDB_DIR")
    printed = capsys.readouterr().err
    assert mode == "offline"
    assert wandb_dir == str(offline_run.output_dir)
    pattern = f"{offline_run.output_dir}/wandb/offline-run-*"
    assert f"wandb sync {pattern}" in printed
    assert glob.glob(pattern) == [str(offline_run.run_dir)]  # the hint names the folder the run was written to


def test_no_hint_with_api_key(capsys, tmp_path):
    from tsg.config import log_to_stderr, parse_args

    with wandb_environment(tmp_path, WANDB_API_KEY="0" * 40):
        _, training_args = parse_args(run_args("stories.txt", tmp_path / "out"))
        log_to_stderr("train")
        training.setup_wandb(training_args, "out")
        mode = os.environ.get("WANDB_MODE")
    assert mode is None
    assert "wandb sync" not in capsys.readouterr().err


# --- the story callback on its own ---


def _random_draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _tell_and_check(callback, model):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = _random_draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    model.train()
    stories = callback.tell(model)
    assert model.training, "the model must be back in train mode"
    assert _random_draws() == expected, "telling stories must leave the random generators as they were"
    assert [s.prompt for s in stories] == list(DEFAULT_SAMPLE_PROMPTS)
    assert all(s.text.startswith(s.prompt) for s in stories)
    return [s.text for s in stories]


def test_tell_keeps_random_state_and_train_mode(tokenizer, tiny_model):
    callback = SampleStoriesCallback(tokenizer, None, every=2, max_new_tokens=6)
    model = tiny_model(tokenizer)
    first = _tell_and_check(callback, model)
    assert _tell_and_check(callback, model) == first  # greedy: same weights, same stories


def test_tell_with_a_peft_model(tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              fan_in_fan_out=True, task_type="CAUSAL_LM"))
    _tell_and_check(SampleStoriesCallback(tokenizer, None, every=2, max_new_tokens=6), model)


def test_bad_prompts_and_steps_are_refused(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        SampleStoriesCallback(tokenizer, ["Once", " "], every=2)
    with pytest.raises(ValueError, match="every"):
        SampleStoriesCallback(tokenizer, None, every=0)


def test_sampling_steps_end_of_training_and_main_process_only(tokenizer, tiny_model):
    """Every `every` steps, and at the end when the last step was not one of them; other processes tell nothing."""
    from transformers import TrainerControl, TrainerState

    model = tiny_model(tokenizer)
    main = SampleStoriesCallback(tokenizer, ["Once"], every=2, max_new_tokens=3)
    other = SampleStoriesCallback(tokenizer, ["Once"], every=2, max_new_tokens=3)
    for callback, is_main in ((main, True), (other, False)):
        state = TrainerState(is_world_process_zero=is_main)
        callback.on_train_begin(None, state, TrainerControl(), model=model)
        for step in range(1, 6):
            state.global_step = step
            callback.on_step_end(None, state, TrainerControl(), model=model)
        callback.on_train_end(None, state, TrainerControl(), model=model)
    assert [row[0] for row in main.rows] == [2, 4, 5]  # no W&B run here: the rows are kept, nothing is logged
    assert other.rows == [] and other.last_step is None
