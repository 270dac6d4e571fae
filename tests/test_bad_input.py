"""Bad input files, by rule: for each kind of file tsg reads (a config, stories in each format, prompts, banned
words, a model folder's weights), a missing, an empty, a binary and a truncated one. Each must stop the command with
exit code 2 and one line that names the file, no traceback, and nothing written where the output would go.
(Every number of the run config out of its range: tests/test_config.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_tsg, tiny_args, tiny_cli

from tsg import model as models

BINARY = bytes(range(256)) * 8  # not UTF-8, not JSON, not parquet, not safetensors


def spoil(path: Path, how: str, good: bytes) -> Path:
    """`path` made `how` bad from the good bytes of such a file: missing, empty, binary or truncated (cut inside a
    multi-byte character, as a copy that stopped short would be)."""
    if how == "missing":
        return path
    if how == "empty":
        path.write_bytes(b"")
    elif how == "binary":
        path.write_bytes(BINARY)
    else:
        cut = good[: len(good) // 2]
        path.write_bytes(cut if how == "truncated" else good)
    return path


def good_stories(suffix: str, stories: list[str], folder: Path) -> bytes:
    """The bytes of a good story file of this format (written once, read back)."""
    stories = [*stories, "A café ☕ story."]  # a multi-byte character near the end, to cut inside
    if suffix == ".txt":
        return "".join(f"{s}\n<|endoftext|>\n" for s in stories).encode()
    if suffix == ".jsonl":
        return "".join(json.dumps({"text": s}) + "\n" for s in stories).encode()
    import pandas

    frame = pandas.DataFrame({"text": stories})
    if suffix == ".csv":
        return frame.to_csv(index=False).encode()
    frame.to_parquet(folder / "good.parquet")
    return (folder / "good.parquet").read_bytes()


HOWS = ["missing", "empty", "binary", "truncated"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("how", HOWS)
def test_a_bad_story_file(suffix, how, tmp_path, sample_stories, capsys):
    good = good_stories(suffix, sample_stories[:40], tmp_path)
    stories = spoil(tmp_path / f"stories{suffix}", how, good)
    if how == "truncated" and suffix in (".txt", ".csv"):
        # text cut short is still stories; cut inside a character, it is not UTF-8 text any more
        stories.write_bytes(good[: good.rindex("☕".encode()) + 1])
    output = tmp_path / "run"
    code, _, err = run_tsg(["train", *tiny_cli(stories, output)], capsys)
    assert code == 2 and str(stories) in error_line(err, "train"), err[-2000:]
    assert not output.exists()


@pytest.mark.parametrize("how", HOWS)
def test_a_bad_config_file(how, tmp_path, capsys):
    good = json.dumps({"model_type": "gpt2", "train_file": "x.txt", "output_dir": str(tmp_path / "run")}).encode()
    config = spoil(tmp_path / "run.json", how, good)
    code, _, err = run_tsg(["train", config], capsys)
    assert code == 2 and str(config) in error_line(err, "train"), err[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model saved as tsg train saves one."""
    folder = tmp_path_factory.mktemp("model") / "run"
    torch.manual_seed(0)
    models.load_model(tiny_args(), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("option", ["--prompts_file", "--banned_words_file"])
@pytest.mark.parametrize("how", ["missing", "empty", "binary"])
def test_a_bad_prompts_or_banned_words_file(option, how, saved_model, tmp_path, capsys):
    words = spoil(tmp_path / "words.txt", how, b"")
    output = tmp_path / "stories.csv"
    code, _, err = run_tsg(["generate", "--model", saved_model, option, words, "--output", output], capsys)
    assert code == 2 and str(words) in error_line(err, "generate"), err[-2000:]
    assert not output.exists()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
def test_a_model_folder_with_bad_weights(how, command, saved_model, tmp_path, small_txt, capsys):
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if how == "missing":
        weights.unlink()
    else:
        spoil(weights, how, good)
    output = tmp_path / "out"
    argv = {"generate": ["generate", "--model", folder, "--output", output.with_suffix(".csv")],
            "evaluate": ["evaluate", "--model", folder, "--data", small_txt, "--output", output.with_suffix(".json")],
            "export": ["export", folder, "--output", output.with_suffix(".gguf")]}[command]
    code, _, err = run_tsg(argv, capsys)
    assert code == 2, err[-2000:]
    line = error_line(err, command)
    assert str(folder) in line, line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in saved_model.iterdir()
                                                              if how != "missing" or p.name != "model.safetensors")


@pytest.fixture(scope="module")
def adapter_run(saved_model, tmp_path_factory) -> Path:
    """A LoRA adapter on saved_model, saved as an adapter run (adapter_config.json names the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "lora_run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_model),
                           LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    model.save_pretrained(folder)
    shutil.copy(saved_model / "tokenizer.json", folder)
    return folder


@pytest.mark.parametrize("how", ["empty", "binary", "truncated"])
def test_an_adapter_run_with_bad_weights(how, adapter_run, tmp_path, capsys):
    folder = tmp_path / "lora_run"
    shutil.copytree(adapter_run, folder)
    weights = folder / "adapter_model.safetensors"
    spoil(weights, how, weights.read_bytes())
    output = tmp_path / "stories.csv"
    code, _, err = run_tsg(["generate", "--model", folder, "--output", output], capsys)
    assert code == 2 and str(weights) in error_line(err, "generate"), err[-2000:]
    assert not output.exists() and not (folder / "merged").exists()


@pytest.mark.parametrize("how", ["empty", "binary", "truncated"])
def test_resuming_from_a_checkpoint_with_bad_weights(how, tmp_path, small_txt, capsys):
    output = tmp_path / "run"
    assert run_tsg(["train", *tiny_cli(small_txt, output, max_steps=2, save_steps=2)], capsys)[0] == 0
    weights = output / "checkpoint-2" / "model.safetensors"
    spoil(weights, how, weights.read_bytes())
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    code, _, err = run_tsg(["train", *tiny_cli(small_txt, output, max_steps=4, save_steps=2),
                            "--resume_from_checkpoint", "true"], capsys)
    assert code == 2 and str(weights) in error_line(err, "train"), err[-2000:]
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before  # nothing written
