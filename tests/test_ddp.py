"""Two training processes on the CPU (DDP over gloo, launch/cpu_ddp.yaml), as `make train LAUNCH=cpu_ddp` runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, accelerate_launch_cmd, python_env, tiny_cli

# tsg.train.main with probes: what each process tokenized, which rows it trained on, and its final weights.
PROBE = """
import hashlib, json, os, sys
import torch
from transformers import PreTrainedTokenizerBase
from tsg import train, trainer as training

rank = int(os.environ.get("RANK", "0"))
calls = {"tokenize": 0, "batches": []}
encode = PreTrainedTokenizerBase.__call__
def counting(self, *a, **k):
    calls["tokenize"] += 1
    return encode(self, *a, **k)
PreTrainedTokenizerBase.__call__ = counting

step = training.StoryTrainer.training_step
def recording(self, model, inputs, *a, **k):
    calls["batches"].append([hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in inputs["input_ids"]])
    return step(self, model, inputs, *a, **k)
training.StoryTrainer.training_step = recording

save = training.save
def save_and_dump(trainer, result):
    save(trainer, result)
    weights = torch.cat([p.detach().flatten().double() for p in trainer.model.parameters()])
    calls["weights"] = hashlib.sha1(weights.numpy().tobytes()).hexdigest()
    calls["world_size"] = trainer.args.world_size
    with open(os.path.join(sys.argv[-1], f"probe-{rank}.json"), "w") as f:
        json.dump(calls, f)
training.save = save_and_dump
train.main(sys.argv[1:-1])
"""

STEPS = 6


def _run(command: list[str], argv: list[str], out) -> None:
    """command runs the probe script; its last argument is where each process writes probe-RANK.json."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*command, *argv, str(out)], cwd=REPO, env=python_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_txt):
    """The same global batch of 8 rows: 2 processes x 4 rows, and 1 process x 8 rows."""
    base = tmp_path_factory.mktemp("ddp")
    probe = base / "probe.py"
    probe.write_text(PROBE)
    common = dict(max_steps=STEPS, logging_steps=1, learning_rate=3e-3, seed=1, save_steps=1000)
    two = base / "two"
    launch = [*accelerate_launch_cmd(), "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), str(probe)]
    _run(launch, tiny_cli(small_txt, two, per_device_train_batch_size=4, **common), two)
    one = base / "one"
    _run([sys.executable, str(probe)], tiny_cli(small_txt, one, per_device_train_batch_size=8, **common), one)
    return two, one


def test_both_processes_train_on_different_batches(runs):
    two, _ = runs
    probes = [json.loads((two / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2]
    assert [len(p["batches"]) for p in probes] == [STEPS, STEPS]
    rows = [{row for batch in p["batches"] for row in batch} for p in probes]
    assert not rows[0] & rows[1]  # no row trained on by both


def test_stories_are_tokenized_once_and_read_from_the_cache(runs):
    two, _ = runs
    probes = [json.loads((two / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert probes[0]["tokenize"] > 0 and probes[1]["tokenize"] == 0


def test_replicas_end_with_identical_weights_and_one_saved_model(runs):
    two, _ = runs
    probes = [json.loads((two / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert probes[0]["weights"] == probes[1]["weights"]
    assert (two / "model.safetensors").is_file()
    assert json.loads((two / "trainer_state.json").read_text())["global_step"] == STEPS


def test_loss_tracks_a_one_process_run_with_the_same_global_batch(runs):
    """Each step trains on the same 8 rows either way; the logged losses agree within 0.01 nats a step.

    They are not bit-equal: the 2-process loss is the mean of the two processes' token means, and the
    gradient all-reduce sums in another order.
    """
    two, one = runs
    steps_two = [json.loads((two / f"probe-{rank}.json").read_text())["batches"] for rank in (0, 1)]
    steps_one = json.loads((one / "probe-0.json").read_text())["batches"]
    for step in range(STEPS):
        assert sorted(steps_two[0][step] + steps_two[1][step]) == sorted(steps_one[step])
    assert len(_losses(two)) == len(_losses(one)) == STEPS
    for step, (a, b) in enumerate(zip(_losses(two), _losses(one)), start=1):
        assert abs(a - b) < 0.01, (step, a, b)


def test_qlora_trains_under_two_processes(tmp_path, small_txt, tokenizer):
    """4-bit QLoRA with each process loading its own quantized copy: one adapter saved, replicas equal."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=128)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "qlora"
    argv = tiny_cli(small_txt, out, "--load_in_4bit", "true", model_type=None, num_hidden_layers=None,
                    hidden_size=None, num_attention_heads=None, model_name_or_path=str(base), use_peft="true",
                    max_steps=3, per_device_train_batch_size=4)
    _run([*accelerate_launch_cmd(), "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), str(probe)], argv, out)
    probes = [json.loads((out / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2] and [len(p["batches"]) for p in probes] == [3, 3]
    assert probes[0]["weights"] == probes[1]["weights"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
