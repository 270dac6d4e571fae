"""Nothing lost when a run is stopped or its disk fills, in any epoch, and no secret in what a run writes.

Each run trains a tiny model on 8 stories, 6 optimizer steps an epoch, for 16 steps (a little under 3 epochs),
saving every 5 steps; the faults fall in the second epoch, and every resumed run must log the same losses (to
1e-4) as one uninterrupted run, through the third epoch. Signals are real: a child process sends them to its own
process group, as SLURM and spot machines do.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, accelerate_launch_cmd, error_line, logged_losses, python_env, tiny_cli,
                      train_with_callback, write_txt)
from tsg import train, trainer as training

STEPS_PER_EPOCH = 6  # 41 blocks of 64 tokens from the first 8 sample stories, 8 rows a step
RUN = dict(max_steps=16, save_steps=5, logging_steps=1, per_device_train_batch_size=8, learning_rate=3e-3, seed=3,
           validation_split_percentage=0)

# tsg.train.main in a child process that sends the signal argv[1] to its own process group during optimizer step
# argv[2] (from that step's on_step_begin); argv[3:] is tsg train's command line.
CHILD = train_with_callback("""
name, step = sys.argv[1], int(sys.argv[2])

class Callback(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == step:
            os.killpg(os.getpgrp(), getattr(signal, name))
""", arguments=2)


def _assert_same_losses(resumed: Path, reference: dict[int, float], first: int) -> None:
    losses = logged_losses(resumed)
    assert max(losses) == max(reference) == RUN["max_steps"]
    for step in range(first, RUN["max_steps"] + 1):
        assert math.isclose(losses[step], reference[step], rel_tol=1e-4), (step, losses[step], reference[step])


def _checkpoints(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


@pytest.fixture(scope="module")
def stories(tmp_path_factory, sample_stories) -> Path:
    return write_txt(tmp_path_factory.mktemp("faults") / "stories.txt", sample_stories[:8])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stories) -> dict[int, float]:
    """The losses of the uninterrupted run, step by step."""
    out = tmp_path_factory.mktemp("straight") / "out"
    train.main(tiny_cli(stories, out, **RUN))
    return logged_losses(out)


def _child(signal_name: str, step: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, signal_name, str(step), *argv], cwd=REPO, env=python_env(),
                          capture_output=True, text=True, start_new_session=True, timeout=600)


def test_sigterm_saves_a_checkpoint_and_the_resume_goes_on_from_it(tmp_path, stories, reference):
    out = tmp_path / "out"
    child = _child("SIGTERM", 8, tiny_cli(stories, out, **RUN))  # step 8: the second of the second epoch
    assert child.returncode == 1, child.stderr[-2000:]
    line = error_line(child.stderr, "train")
    assert "SIGTERM" in line and str(out / "checkpoint-8") in line and "--resume_from_checkpoint true" in line
    assert _checkpoints(out) == ["checkpoint-5", "checkpoint-8"]  # step 8 saved although save_steps is 5
    assert training.checkpoint_step(out / "checkpoint-8") == 8
    assert not (out / "model.safetensors").exists()  # an interrupted run does not pose as a finished one
    first_record = (out / "run_config.json").read_bytes()

    train.main(tiny_cli(stories, out, "--resume_from_checkpoint", "true", **RUN))

    _assert_same_losses(out, reference, first=9)
    assert (out / "model.safetensors").is_file()
    # the resume is recorded beside the first run's record, which stays as it was
    assert (out / "run_config.json").read_bytes() == first_record
    assert json.loads(first_record)["resumed_from"] is None
    resume = json.loads((out / "run_config.resume-1.json").read_text())
    assert resume["resumed_from"] == str(out / "checkpoint-8")
    assert resume["config"]["resume_from_checkpoint"] == "true"


def test_sigkill_in_a_later_epoch_resumes_with_the_same_batches(tmp_path, stories, reference):
    out = tmp_path / "out"
    child = _child("SIGKILL", 12, tiny_cli(stories, out, **RUN))
    assert child.returncode == -9, child.stderr[-2000:]
    assert _checkpoints(out) == ["checkpoint-5", "checkpoint-10"]
    assert 10 // STEPS_PER_EPOCH == 1 and 10 % STEPS_PER_EPOCH  # checkpoint-10: mid-way through the second epoch

    train.main(tiny_cli(stories, out, "--resume_from_checkpoint", "true", **RUN))

    _assert_same_losses(out, reference, first=11)  # the rest of epoch 2, then epoch 3


def test_full_disk_keeps_the_last_complete_checkpoint(tmp_path, stories, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the disk fills while checkpoint-10 is being written
        if "checkpoint-10" in str(f):
            Path(f).write_bytes(b"\0" * 64)  # a file cut short
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_cli(stories, out, **RUN))
    assert exit_info.value.code == 1
    line = error_line(capsys.readouterr().err, "train")
    assert line.startswith("tsg train: error: no space left on device while saving checkpoint")
    assert str(out / "checkpoint-5") in line and "--resume_from_checkpoint true" in line
    assert _checkpoints(out) == ["checkpoint-5"]  # nothing half-written left for a resume to take
    assert training.checkpoint_step(out / "checkpoint-5") == 5
    monkeypatch.undo()

    train.main(tiny_cli(stories, out, "--resume_from_checkpoint", "true", **RUN))

    _assert_same_losses(out, reference, first=6)
    assert _checkpoints(out) == ["checkpoint-5", "checkpoint-10", "checkpoint-15", "checkpoint-16"]


# tsg.train.main in a child process that says whether the Hub client finds the --hub_token while the run trains.
TOKEN_CHILD = train_with_callback("""
import huggingface_hub

HUB_TOKEN = sys.argv[sys.argv.index("--hub_token") + 1]

class Callback(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        print("hub token usable:", huggingface_hub.get_token() == HUB_TOKEN, flush=True)
""")


def test_no_secret_reaches_a_saved_file(tmp_path, stories):
    secrets = {"--hub_token": "hf_cli_" + "q7" * 16, "HF_TOKEN": "hf_env_" + "z3" * 16,
               "WANDB_API_KEY": "k9" * 20}
    home = tmp_path / "home"
    env = dict(python_env(), HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
               WANDB_DATA_DIR=str(home / "data"), WANDB_MODE="offline", WANDB_SILENT="true",
               HF_TOKEN=secrets["HF_TOKEN"], WANDB_API_KEY=secrets["WANDB_API_KEY"])
    out = tmp_path / "out"
    argv = tiny_cli(stories, out, "--hub_token", secrets["--hub_token"], max_steps=2, save_steps=2,
                    report_to="wandb", sample_steps=2, sample_max_new_tokens=4)
    child = subprocess.run([sys.executable, "-c", TOKEN_CHILD, *argv], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "hub token usable: True" in child.stdout  # --hub_token, not HF_TOKEN, is what push_to_hub would use

    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"training_args.bin", "checkpoint-2/training_args.bin"} <= names
    assert any(name.startswith("wandb/offline-run-") and name.endswith(".wandb") for name in names), sorted(names)
    leaks = [(p.relative_to(out).as_posix(), name) for p in files for name, value in secrets.items()
             if value.encode() in p.read_bytes()]
    assert not leaks, leaks


# Under two processes (DDP over gloo), SIGTERM to rank 1 only, during optimizer step 4.
DDP_CHILD = train_with_callback("""
class Callback(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == 4 and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
""")


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path, stories):
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD)
    out = tmp_path / "out"
    launch = [*accelerate_launch_cmd(), "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), str(script)]
    argv = tiny_cli(stories, out, max_steps=8, save_steps=1000, per_device_train_batch_size=4)
    # a process that stops alone leaves the other waiting in the next all-reduce: a hang, ended here
    child = subprocess.Popen([*launch, *argv], cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail("the processes did not stop together (one was left waiting for the other)")
    assert child.returncode != 0
    assert f"saved checkpoint {out / 'checkpoint-4'}" in stderr, stderr[-3000:]
    assert _checkpoints(out) == ["checkpoint-4"] and training.checkpoint_step(out / "checkpoint-4") == 4
    assert not (out / "model.safetensors").exists()


def test_muon_state_is_checkpointed_and_a_resume_goes_on_as_if_uninterrupted(tmp_path, stories, reference):
    straight = tmp_path / "straight"
    train.main(tiny_cli(stories, straight, "--use_muon", "true", **RUN))
    muon_reference = logged_losses(straight)
    assert max(abs(muon_reference[step] / reference[step] - 1) for step in reference) > 1e-5  # not AdamW's run

    out = tmp_path / "out"
    child = _child("SIGTERM", 8, tiny_cli(stories, out, "--use_muon", "true", **RUN))
    assert child.returncode == 1, child.stderr[-2000:]
    state = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"] and state["adamw"]["state"]

    train.main(tiny_cli(stories, out, "--use_muon", "true", "--resume_from_checkpoint", "true", **RUN))

    _assert_same_losses(out, muon_reference, first=9)
