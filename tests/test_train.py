"""Training end to end through `tsg.train.main`: the saved folder, run_config.json, the loss, resuming, refusing to
clobber checkpoints, the shipped tiny config, and the script form under `accelerate launch`."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, VOCAB, accelerate_launch_cmd, error_line, python_env, tiny_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsg import train


def run_main(argv):
    """tsg.train.main(argv); returns the exit code (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def state(folder):
    return json.loads((folder / "trainer_state.json").read_text())


def losses(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def check_loads(folder, n_layer=2, n_embd=32, vocab=VOCAB, model_type="gpt2"):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == model_type
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (n_layer, n_embd)
    assert len(tokenizer) == vocab == model.config.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1] == tokenizer.eos_token_id
    return model, tokenizer


# --- one run, several checks ---

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_txt):
    """A tiny GPT-2 trained from scratch for 40 steps on 120 stories (10% held out), checkpoints every 20."""
    out = tmp_path_factory.mktemp("run") / "out"
    code = run_main(tiny_cli(small_txt, out, max_steps=STEPS, save_steps=20, validation_split_percentage=10,
                             per_device_train_batch_size=8, lr_scheduler_type="constant", learning_rate=5e-3,
                             eval_strategy="steps", eval_steps=20))
    assert code == 0
    return out


def test_saved_folder_loads_with_auto_classes(trained):
    check_loads(trained)
    assert (trained / "model.safetensors").is_file() and (trained / "tokenizer.json").is_file()


def test_run_config_records_versions_and_resolved_config(trained):
    import accelerate
    import datasets
    import peft
    import transformers

    import tsg

    record = json.loads((trained / "run_config.json").read_text())
    assert record["tsg_version"] == tsg.__version__
    assert record["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "peft": peft.__version__, "accelerate": accelerate.__version__,
                                  "datasets": datasets.__version__}
    config = record["config"]
    assert config["model_type"] == "gpt2" and config["hidden_size"] == 32 and config["block_size"] == 64
    assert config["max_steps"] == STEPS and config["learning_rate"] == 5e-3 and config["packing"] == "isolated"
    assert config["output_dir"] == str(trained) and config["validation_split_percentage"] == 10


def test_checkpoints_state_and_metrics(trained):
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert state(trained)["global_step"] == STEPS
    assert sorted(losses(state(trained)["log_history"])) == list(range(1, STEPS + 1))
    evaluation = json.loads((trained / "eval_results.json").read_text())
    assert evaluation["eval_perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=1e-6)
    logged = [e for e in state(trained)["log_history"] if "eval_loss" in e]
    assert logged and all(e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"])) for e in logged)
    assert AutoTokenizer.from_pretrained(trained).model_max_length == 64  # the context it was trained for


def test_loss_falls(trained):
    by_step = losses(state(trained)["log_history"])
    first = sum(by_step[s] for s in range(1, 6)) / 5
    last = sum(by_step[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert first > math.log(VOCAB) - 0.3  # a random model: about ln(vocab)
    assert last < first - 0.6, (first, last)
    evaluation = json.loads((trained / "eval_results.json").read_text())
    assert evaluation["eval_loss"] < math.log(VOCAB) - 0.6


# --- resume ---


def test_resume_continues_from_the_checkpoint(tmp_path, small_txt, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, max_steps=4, save_steps=2)) == 0
    assert state(out)["global_step"] == 4 and (out / "checkpoint-4").is_dir()
    # mark the checkpoint's history: a run that resumes from it carries the mark on
    checkpoint_state = out / "checkpoint-4" / "trainer_state.json"
    marked = json.loads(checkpoint_state.read_text())
    first = next(e for e in marked["log_history"] if e.get("step") == 1 and "loss" in e)
    first["loss"] = 123.0
    checkpoint_state.write_text(json.dumps(marked))
    capsys.readouterr()

    assert run_main(tiny_cli(small_txt, out, "--resume_from_checkpoint", "true", max_steps=8, save_steps=2)) == 0
    printed = capsys.readouterr().out
    resumed = state(out)
    assert resumed["global_step"] == 8
    by_step = losses(resumed["log_history"])
    assert sorted(by_step) == list(range(1, 9))  # each step once: steps 1-4 were not trained again
    assert by_step[1] == 123.0  # the history came from checkpoint-4
    assert printed.count("'loss'") == 4  # this run logged steps 5-8 only
    assert (out / "checkpoint-8").is_dir()
    check_loads(out)


def test_resume_errors(tmp_path, small_txt, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, "--resume_from_checkpoint", "true")) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert run_main(tiny_cli(small_txt, out, "--resume_from_checkpoint", str(tmp_path))) == 2
    assert "not a complete checkpoint folder" in capsys.readouterr().err


def test_rerun_into_checkpoints_is_refused_unless_overwrite(tmp_path, small_txt, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, max_steps=3, save_steps=3)) == 0
    record = (out / "run_config.json").read_text()
    capsys.readouterr()

    assert run_main(tiny_cli(small_txt, out, max_steps=2, save_steps=2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tsg train: error:")
    assert str(out) in err and "--resume_from_checkpoint true" in err and "--overwrite_output_dir true" in err
    assert (out / "run_config.json").read_text() == record  # nothing was touched
    assert (out / "checkpoint-3").is_dir()

    (out / "run_config.resume-1.json").write_text(record)  # as a resume of the old run would have left
    assert run_main(tiny_cli(small_txt, out, "--overwrite_output_dir", "true", max_steps=2, save_steps=2)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old one was deleted
    assert state(out)["global_step"] == 2
    # a new run: its record replaces the old run's, whose resume records go with it
    assert not (out / "run_config.resume-1.json").exists()
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 2


def test_overwrite_deletes_nothing_when_the_new_run_is_refused(tmp_path, small_txt, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, max_steps=2, save_steps=2)) == 0
    record = (out / "run_config.json").read_text()
    bad = tiny_cli(tmp_path / "missing.txt", out, "--overwrite_output_dir", "true", max_steps=2)
    assert run_main(bad) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    assert (out / "run_config.json").read_text() == record


def test_evaluation_without_validation_stories_is_refused_before_training(tmp_path, small_txt, capsys):
    argv = tiny_cli(small_txt, tmp_path / "out", validation_split_percentage=0, eval_strategy="steps", eval_steps=1)
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tsg train: error: eval_strategy='steps' needs validation stories") and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "run_config.json").exists()


# --- errors through main ---


def test_config_error_exits_2_with_one_line(tmp_path, small_txt, capsys):
    assert run_main(tiny_cli(small_txt, tmp_path / "out", "--learnin_rate", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("tsg train: error:") and "learning_rate" in err
    assert not (tmp_path / "out").exists()


def test_data_error_exits_2(tmp_path, capsys):
    assert run_main(tiny_cli(tmp_path / "missing.txt", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tsg train: error:") and "missing.txt" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra", [["--attn_implementation", "bogus"],
                                   ["--model_type", "gpt_neo", "--attn_implementation", "sdpa",
                                    "--config_overrides", '{"attention_types": [[["global", "local"], 1]]}']],
                         ids=["unknown-kernel", "gpt_neo-sdpa"])
def test_unusable_attn_implementation_exits_2(tmp_path, small_txt, capsys, extra):
    assert run_main(tiny_cli(small_txt, tmp_path / "out", *extra, max_steps=1)) == 2
    assert error_line(capsys.readouterr().err, "train")


# --- other packings train too ---


@pytest.mark.parametrize("packing", ["concat", "pad"])
def test_other_packings_train(tmp_path, small_txt, packing):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, max_steps=2, packing=packing, max_train_samples=40,
                             attn_implementation="eager")) == 0
    assert state(out)["global_step"] == 2
    assert json.loads((out / "run_config.json").read_text())["config"]["packing"] == packing


# --- the numbers printed before a run ---

SHORT = ["Tom had a red ball.", "The cat sat on a mat.", "Lily saw a big dog.", "Ben ate an apple.",
         "The sun was hot.", "Mia ran to the park.", "A bird sang.", "The boy was sad.", "They played all day."]


@pytest.mark.parametrize("accumulation", [
    1,
    2,
])
def test_printed_plan_matches_the_run(tmp_path, capsys, accumulation):
    """9 one-line stories, pad packing: 9 blocks, 5 batches of 2 per epoch."""
    from conftest import write_txt

    data_file = write_txt(tmp_path / "short.txt", SHORT)
    out = tmp_path / "out"
    code = run_main(tiny_cli(data_file, out, max_steps=-1, num_train_epochs=1, packing="pad",
                             validation_split_percentage=0, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, vocab_size=300))
    assert code == 0
    printed = capsys.readouterr().err
    assert "tsg train: train split: 9 stories, " in printed and "9 blocks of 64 (pad packing)" in printed
    assert f"= 2 rows x {accumulation} accumulation x 1 processes x 64 tokens = {2 * accumulation * 64:,}" in printed
    import re

    planned = int(re.search(r"this run: ([\d,]+) steps", printed).group(1).replace(",", ""))
    per_epoch = int(re.search(r"steps per epoch = ([\d,]+)", printed).group(1).replace(",", ""))
    assert planned == per_epoch == state(out)["global_step"]


# --- the shipped tiny config ---


def test_tiny_cpu_config_trains_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # its train_file is relative to the repository root
    out = tmp_path / "tiny"
    warnings = WarningsOf("transformers.trainer")
    with warnings:
        code = run_main(["configs/tiny_cpu.json", "--max_steps", "3", "--output_dir", str(out),
                         "--per_device_train_batch_size", "4", "--max_eval_samples", "8", "--disable_tqdm", "true"])
    assert code == 0
    # the best checkpoint is loaded at the end: its tied output layer, not in the file, is not reported missing
    assert not [m for m in warnings.messages if "missing keys" in m], warnings.messages
    raw = json.loads((REPO / "configs" / "tiny_cpu.json").read_text())
    check_loads(out, n_layer=raw["num_hidden_layers"], n_embd=raw["hidden_size"], vocab=raw["vocab_size"],
                model_type=raw["model_type"])
    assert state(out)["global_step"] == 3
    # its last step, off the eval_steps grid, is evaluated before it is saved: the model kept is step 3's
    assert [e["step"] for e in state(out)["log_history"] if "eval_loss" in e] == [3]
    assert state(out)["best_model_checkpoint"].endswith("checkpoint-3")
    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["block_size"] == raw["block_size"] and record["config"]["max_steps"] == 3


class WarningsOf(logging.Handler):
    """The warnings a logger (which may not propagate to pytest's caplog) logs while in a `with`."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


# --- the script form, in subprocesses ---


def _write_tiny_config(path, train_file, output_dir):
    words = tiny_cli(train_file, output_dir)
    values = dict(zip(words[0::2], words[1::2]))
    typed = {}
    for key, value in values.items():
        try:
            typed[key[2:]] = json.loads(value)
        except ValueError:
            typed[key[2:]] = value
    path.write_text(json.dumps(typed, indent=1))
    return path


def test_accelerate_launch_script(tmp_path, small_txt):
    out = tmp_path / "out"
    config = _write_tiny_config(tmp_path / "tiny.json", small_txt, tmp_path / "elsewhere")
    cmd = accelerate_launch_cmd() + [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tsg" / "train.py"), str(config), "--max_steps", "2", "--output_dir", str(out),
        "--max_train_samples", "40"]
    result = subprocess.run(cmd, cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tsg train: saved the model and tokenizer" in result.stderr
    assert not (tmp_path / "elsewhere").exists()  # the CLI output_dir overrode the file's
    check_loads(out)
    assert state(out)["global_step"] == 2


def _bad_key_run(cmd, tmp_path):
    return subprocess.run(cmd + ["--model_type", "gpt2", "--train_file", "x.txt", "--learnin_rate", "3"],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=120)


def test_bad_key_in_subprocess_exits_2_with_one_line(tmp_path):
    result = _bad_key_run([sys.executable, "-m", "tsg.train"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "tsg train: error: command line: unknown key 'learnin_rate' " \
                                    "(did you mean 'learning_rate'?)"
    assert not (tmp_path / "runs").exists()


def test_bad_key_in_script_form_exits_2_with_one_line(tmp_path):
    result = _bad_key_run([sys.executable, str(REPO / "tsg" / "train.py")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("tsg train: error: command line: unknown key 'learnin_rate'")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- the speed and memory levers are config fields that work ---


@pytest.mark.parametrize("levers", [
    ["--activation_checkpointing", "true", "--gradient_accumulation_steps", "2"],
    ["--torch_compile", "true"],
], ids=["checkpointing+accumulation", "torch_compile"])
def test_training_levers_train_and_save(tmp_path, small_txt, levers):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, *levers, max_steps=3, max_train_samples=60)) == 0
    assert state(out)["global_step"] == 3
    check_loads(out)
    config = json.loads((out / "run_config.json").read_text())["config"]
    for flag, value in zip(levers[::2], levers[1::2]):  # recorded as asked
        assert str(config[flag[2:]]).lower() == value


def test_bf16_on_a_cpu_trains_in_fp32_with_a_note(tmp_path, small_txt, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_cli(small_txt, out, "--bf16", "true", max_steps=1, max_train_samples=20)) == 0
    assert "bf16 asked for, but this run is on the CPU: it trains in fp32" in capsys.readouterr().err
    assert json.loads((out / "run_config.json").read_text())["config"]["bf16"] is False
