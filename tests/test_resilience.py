"""Nothing lost when a run dies: SIGKILL of the whole process group, half-written checkpoints, NaN losses."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, logged_losses, python_env, tiny_cli, train_with_callback
from tsg import train, trainer as training
from tsg.files import UserError

RUN = dict(max_steps=16, save_steps=4, logging_steps=1, learning_rate=3e-3, seed=3)

# Runs tsg.train.main in a child process whose callback SIGKILLs the child's whole process group mid-run,
# between two checkpoints (step 10; checkpoints at 4 and 8).
KILLER = train_with_callback("""
class Callback(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 10:
            os.killpg(os.getpgrp(), signal.SIGKILL)
""")


def test_sigkilled_run_resumes_to_the_same_end(tmp_path, small_txt):
    straight = tmp_path / "straight"
    train.main(tiny_cli(small_txt, straight, **RUN))
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLER, *tiny_cli(small_txt, killed, **RUN)], cwd=REPO,
                           env=python_env(), capture_output=True, text=True, start_new_session=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not (killed / "model.safetensors").exists()  # it really died before the end
    # a checkpoint that was being written when the process died: folder there, trainer_state.json not yet
    partial = killed / "checkpoint-12"
    shutil.copytree(killed / "checkpoint-8", partial)
    (partial / "trainer_state.json").unlink()

    train.main(tiny_cli(small_txt, killed, "--resume_from_checkpoint", "true", **RUN))

    resumed, reference = logged_losses(killed), logged_losses(straight)
    assert max(resumed) == max(reference) == 16
    for step in range(9, 17):  # the steps trained after the resume, from checkpoint-8 (not the partial 12)
        assert math.isclose(resumed[step], reference[step], rel_tol=1e-4), (step, resumed[step], reference[step])
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 16


def test_resume_true_skips_a_checkpoint_cut_short(tmp_path, small_txt):
    out = tmp_path / "out"
    train.main(tiny_cli(small_txt, out, max_steps=4, save_steps=2))
    broken = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-4", broken)
    (broken / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # half-written
    assert training.last_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert training.resolve_resume(_args(out, "true"), overwrite=False) == str(out / "checkpoint-4")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        training.resolve_resume(_args(out, str(broken)), overwrite=False)
    kept = shutil.copytree(out / "checkpoint-4", tmp_path / "kept-for-later")  # a complete checkpoint, renamed
    assert training.resolve_resume(_args(out, str(kept)), overwrite=False) == str(kept)


def _args(output_dir, resume):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), resume_from_checkpoint=resume, use_cpu=True, report_to=[])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, small_txt, monkeypatch, capsys):
    compute_loss = training.StoryTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if self.state.global_step >= 5:  # steps 1-5 are fine; step 6 goes bad
            loss = loss * torch.tensor(float("nan"))
        return loss

    monkeypatch.setattr(training.StoryTrainer, "compute_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_cli(small_txt, out, max_steps=10, save_steps=2))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tsg train: error: the training loss is nan at step 6")
    assert str(out / "checkpoint-4") in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert training.is_complete_checkpoint(out / "checkpoint-4")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-4" / "model.safetensors").values())
