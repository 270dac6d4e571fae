"""The seed project's own config files (tests/seed/*.toml, written as its users have them) run unchanged through
`tsg prepare`, `tsg train` and `tsg generate`, each seed key read as the tsg field it means and said once.

The fine-tune names `distilgpt2`: a tiny local GPT-2 saved in a folder of that name in the working directory stands
in for it (transformers loads a local folder before it asks the hub), so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, error_line, run_tsg, write_txt
from transformers import AutoConfig, AutoModelForCausalLM

from tsg import cli

SEED_FILES = REPO / "tests" / "seed"
CONTEXT = 128
PROMPT = "Once upon a time, in a small house,"


@pytest.fixture(scope="module")
def seed_project(tmp_path_factory, sample_stories, tokenizer) -> Path:
    """A working directory as the seed's users have it: the raw stories, the three config files, and the local
    stand-in for distilgpt2."""
    root = tmp_path_factory.mktemp("seed_project")
    (root / "data" / "raw").mkdir(parents=True)
    write_txt(root / "data" / "raw" / "TinyStoriesV2-GPT4-train.txt", sample_stories)
    for name in ("dataprep.toml", "model_finetune.toml", "model_inference.toml"):
        shutil.copy(SEED_FILES / name, root / name)
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4,
                                  n_positions=CONTEXT, bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "distilgpt2")
    tokenizer.save_pretrained(root / "distilgpt2")
    return root


@pytest.fixture(scope="module")
def prepared_and_trained(seed_project):
    """prepare, then a 3-step fine-tune, each from the seed's file; returns what each printed on stderr."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(seed_project)  # the seed's relative paths resolve from the working directory
    printed = {}
    try:
        for name, argv in (("prepare", ["prepare", "-c", "dataprep.toml"]),
                           ("train", ["train", "-c", "model_finetune.toml", "--max_steps", "3", "--report_to", "none",
                                      "--disable_tqdm", "true"])):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                cli.main(argv)
            printed[name] = err.getvalue()
    finally:
        monkeypatch.undo()
    return printed


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_dataprep_toml_writes_the_seed_split_files(seed_project, prepared_and_trained):
    processed = seed_project / "data" / "processed"
    train_rows, test_rows = read_csv(processed / "stories_1000_train.csv"), read_csv(processed / "stories_1000_test.csv")
    assert (len(train_rows), len(test_rows)) == (900, 100)  # ndata 1000, train_fraction 0.9
    assert all(r["text"].startswith("<|startoftext|>") and r["text"].endswith("<|endoftext|>") for r in train_rows)
    err = prepared_and_trained["prepare"]
    for key, field in (("input_name", "input_file"), ("starter", "start_marker"), ("ender", "end_marker"),
                       ("outname", "output_file")):
        assert err.count(f"tsg prepare: note: seed key '{key}' read as {field}\n") == 1


def test_model_finetune_toml_trains_into_model_folder(seed_project, prepared_and_trained):
    out = seed_project / "models" / "distilgpt2-stories"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["train_file"] == "data/processed/stories_1000_test.csv"
    assert record["model_name_or_path"] == "distilgpt2" and record["use_peft"] is False
    assert record["block_size"] == CONTEXT  # max_seq_len -1: the model's context
    assert record["save_strategy"] == "epoch" and record["use_cpu"] is True
    err = prepared_and_trained["train"]
    assert err.count("tsg train: note: seed key 'lora_peft' read as use_peft\n") == 1
    assert "seed key 'device' read as use_cpu = True" in err and "seed key 'max_seq_len' read as block_size" in err
    assert AutoModelForCausalLM.from_pretrained(out).config.n_positions == CONTEXT


def test_model_inference_toml_writes_the_output_file(seed_project, prepared_and_trained, capsys, monkeypatch):
    monkeypatch.chdir(seed_project)
    argv = ["generate", "-c", "model_inference.toml", "-q", PROMPT, "-n", "1", "-rnd", "876543"]
    code, out, err = run_tsg(argv, capsys)
    assert code == 0, err
    [row] = read_csv(seed_project / "outputs" / "stories.csv")
    assert row["story"].startswith(PROMPT) and "<|" not in row["story"]
    assert (row["seed"], row["temperature"], row["top_p"], row["repetition_penalty"]) == ("876543", "0.8", "0.95",
                                                                                           "1.2")
    assert (row["banned_words"], row["start_marker"], row["quantization"]) == ("hate kill", "<|startoftext|>", "none")
    assert row["model"] == "models/distilgpt2-stories" and row["story"] in out
    assert "seed key 'model_folder' read as model" in err and "seed key 'quantized' read as quantization" in err
    assert run_tsg(argv, capsys)[0] == 0
    assert read_csv(seed_project / "outputs" / "stories.csv") == [row]  # the same seed tells the same story


@pytest.mark.parametrize("change, message", [
    (('quantized = false', 'quantized = "no"'), "seed key quantized = 'no': expected true or false"),
    (('lora_peft = false', 'lora_peft = true'), "use_peft is true, but the folder holds no adapter_config.json"),
    (('device = "cpu"', 'device = "tpu"'), "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (('[hyper-parameters]', '[hyper-parameters]\nbatch = 2'), "unknown key 'batch'"),
    (('quantized = false', 'ndata = 1000'), "seed key 'ndata' (of dataprep.toml) means nothing to tsg generate"),
    (('quantized = false', 'max_seq_len = -1'), "seed key 'max_seq_len' (of model_finetune.toml) means nothing"),
    (('quantized = false', 'temprature = 1'), "unknown key 'temprature' (did you mean 'temperature'?)"),
])
def test_a_seed_key_that_means_nothing_here_is_a_clear_error(seed_project, prepared_and_trained, change, message,
                                                            capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(seed_project)
    config = tmp_path / "model_inference.toml"
    config.write_text((seed_project / "model_inference.toml").read_text().replace(*change))
    output = tmp_path / "stories.csv"
    code, _, err = run_tsg(["generate", "-c", config, "-q", PROMPT, "--output", output], capsys)
    assert code == 2 and message in error_line(err, "generate") and not output.exists()


def test_a_bad_seed_value_in_the_fine_tune_is_named(seed_project, capsys, tmp_path):
    config = tmp_path / "model_finetune.toml"
    config.write_text((seed_project / "model_finetune.toml").read_text().replace('device = "cpu"', 'device = "tpu"'))
    code, _, err = run_tsg(["train", "-c", config], capsys)
    assert code == 2 and f"{config}: seed key device = 'tpu': expected cpu" in error_line(err, "train")
