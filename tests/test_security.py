"""Nothing runs or loads unsafely: a model folder's own Python code runs only when the user turns it on
(trust_remote_code), and every weights file tsg saves is safetensors (never a pickle that runs code when loaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import dynamic_module_utils

from conftest import error_line, run_tsg, tiny_cli
from tsg import cli, train

# Pickled files the Trainer keeps beside the weights of a checkpoint or run: optimizer, scheduler and RNG state, and
# the TrainingArguments. None of them holds model weights.
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_txt) -> dict[str, Path]:
    """A full run from scratch, an adapter run on it (both with a checkpoint per step), and the adapter merged."""
    root = tmp_path_factory.mktemp("security")
    train.main(tiny_cli(small_txt, root / "full", max_steps=2, save_steps=1))
    train.main(tiny_cli(small_txt, root / "lora", model_type=None, num_hidden_layers=None, hidden_size=None,
                        num_attention_heads=None, model_name_or_path=str(root / "full"), use_peft="true", lora_r=4,
                        max_steps=2, save_steps=1))
    cli.main(["merge", str(root / "lora"), str(root / "merged")])
    return {"full": root / "full", "lora": root / "lora", "merged": root / "merged"}


def test_every_saved_weights_file_is_safetensors(runs):
    expected = {
        runs["full"]: "model.safetensors",
        runs["full"] / "checkpoint-2": "model.safetensors",
        runs["lora"]: "adapter_model.safetensors",
        runs["lora"] / "checkpoint-2": "adapter_model.safetensors",
        runs["merged"]: "model.safetensors",
    }
    for folder, weights in expected.items():
        names = {p.name for p in folder.iterdir() if p.is_file()}
        assert weights in names, (folder, sorted(names))
        pickles = {name for name in names if Path(name).suffix in PICKLE_SUFFIXES} - TRAINING_STATE
        assert not pickles, (folder, sorted(pickles))  # no pytorch_model.bin, adapter_model.bin, ...
    assert not any(p.suffix in PICKLE_SUFFIXES for p in runs["merged"].iterdir())


@pytest.fixture
def remote_code_folder(runs, tmp_path) -> tuple[Path, Path]:
    """(folder, marker): the full run's model, its config asking for code of its own that writes `marker` when run."""
    folder = shutil.copytree(runs["full"], tmp_path / "remote", ignore=shutil.ignore_patterns("checkpoint-*"))
    marker = tmp_path / "the folder's code ran"
    (folder / "story_model.py").write_text(
        "from pathlib import Path\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class StoryConfig(GPT2Config):\n    pass\n"
        "class StoryModel(GPT2LMHeadModel):\n    config_class = StoryConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "story_model.StoryConfig", "AutoModelForCausalLM": "story_model.StoryModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.mark.parametrize("command", ["generate", "evaluate", "train", "merge", "export"])
def test_a_folder_asking_to_run_its_code_is_refused_naming_the_option(command, remote_code_folder, runs, small_txt,
                                                                      tmp_path, capsys):
    folder, marker = remote_code_folder
    argv = {
        "generate": ["generate", "--model", folder, "--max_new_tokens", "3", "--device", "cpu"],
        "evaluate": ["evaluate", "--model", folder, "--data", small_txt, "--device", "cpu"],
        "train": ["train", *tiny_cli(small_txt, tmp_path / "run", model_type=None, num_hidden_layers=None,
                                     hidden_size=None, num_attention_heads=None, model_name_or_path=str(folder))],
        "merge": ["merge", runs["lora"], tmp_path / "merged", "--base_model", folder],
        "export": ["export", folder, "--output", tmp_path / "model.gguf"],
    }[command]
    code, _, err = run_tsg(argv, capsys)
    line = error_line(err, command)
    assert code == 2 and f"{folder / 'config.json'}: the model asks to run Python code of its own" in line, line
    if command == "export":
        assert "never runs" in line
    else:
        assert line.endswith("only with --trust_remote_code true"), line
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_trust_remote_code_true_runs_the_folders_code(remote_code_folder, tmp_path, monkeypatch, capsys):
    folder, marker = remote_code_folder
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    code, out, err = run_tsg(["generate", "--model", folder, "--max_new_tokens", "3", "--device", "cpu",
                              "--trust_remote_code", "true"], capsys)
    assert code == 0, err[-2000:]
    assert marker.read_text() == "ran" and out.startswith("Once upon a time")
