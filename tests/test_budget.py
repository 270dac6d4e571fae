"""Training for a time budget (`--max_minutes`) and Muon (`--use_muon`): the run ends on an evaluated, saved model
within its minutes, its learning rate decayed over the last part of the run; Muon takes the weight matrices only."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState, TrainingArguments
from transformers.trainer_callback import TrainerControl

from conftest import REPO, error_line, python_env, run_tsg, tiny_cli
from tsg.budget import TimeBudget
from tsg.optimizers import MuonWithAdamW, build_muon_with_adamw, muon_parameters
from tsg.trainer import StoryTrainer


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulate(budget: TimeBudget, clock: Clock, args, seconds_per_step, evaluation=3.0, saving=1.0):
    """Drive `budget` as the Trainer does, with steps, evaluations and saves that take the given seconds; the
    (step, learning-rate factor) of every step and the time the run ends (its last evaluation and save done)."""
    state, control = TrainerState(eval_steps=args.eval_steps, save_steps=args.save_steps), TrainerControl()
    state.max_steps = 10**9
    budget.on_train_begin(args, state, control)
    factors = []
    while True:
        state.global_step += 1
        clock.now += seconds_per_step(state.global_step, budget)
        factors.append((state.global_step, budget.plan(state.global_step)))
        control = TrainerControl()
        if state.global_step % args.eval_steps == 0:
            control.should_evaluate = True
        if state.global_step % args.save_steps == 0:
            control.should_save = True
        control = budget.on_step_end(args, state, control)
        if control.should_evaluate:
            clock.now += evaluation
            budget.on_evaluate(args, state, control, metrics={})
        if control.should_save:
            clock.now += saving
            budget.on_save(args, state, control)
        if control.should_training_stop:
            return factors, clock.now + 2 * saving  # then the final save of the model


@pytest.fixture
def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=50, save_steps=100,
                             use_cpu=True, report_to="none")


def test_the_run_ends_within_its_minutes_with_the_decay_over_its_last_fifth(args):
    clock = Clock()
    budget = TimeBudget(10, decay_share=0.2, warmup_steps=0.05, scheduler_kwargs={"min_lr_ratio": 0.1},
                        started=clock.now, clock=clock)
    factors, ended = simulate(budget, clock, args, lambda step, budget: 0.5)
    last = factors[-1][0]
    assert budget.deadline - 20 <= ended <= budget.deadline  # the minutes are used, not overrun
    assert 1000 < last < 1200  # 600 s at 0.5 s a step, less the evaluations and saves
    decay_start = next(step for step, factor in factors if step > last / 2 and factor < 1)
    assert decay_start == pytest.approx(0.8 * last, abs=2)
    assert factors[-1][1] == pytest.approx(0.1, abs=0.01)  # down to min_lr_ratio at the end
    assert budget.plan.warmup == pytest.approx(0.05 * last, rel=0.2)  # planned on the run's first guess of its end
    assert all(factor == 1 for step, factor in factors if budget.plan.warmup <= step < decay_start)


def test_a_slowdown_during_the_decay_shortens_it_rather_than_overrun(args):
    clock = Clock()
    budget = TimeBudget(10, started=clock.now, clock=clock)

    def speed(step, budget):  # twice as slow once the decay has begun
        return 1.0 if step > budget.plan.decay_start else 0.5

    factors, ended = simulate(budget, clock, args, speed)
    assert ended <= budget.deadline
    assert factors[-1][1] < 0.05  # the decay still ends at the floor


def test_max_steps_below_the_first_plan_still_ends_the_run_there(args):
    clock = Clock()
    budget = TimeBudget(10, max_steps=3, started=clock.now, clock=clock)
    factors, ended = simulate(budget, clock, args, lambda step, budget: 0.5)
    assert factors[-1][0] == 3 and budget.plan.end == 3 and budget.plan.decay >= 0


def test_max_steps_caps_the_plan(args):
    clock = Clock()
    budget = TimeBudget(10, max_steps=300, started=clock.now, clock=clock)
    factors, ended = simulate(budget, clock, args, lambda step, budget: 0.5)
    assert factors[-1][0] == 300 and ended < budget.deadline - 300


def test_tsg_train_max_minutes_ends_on_an_evaluated_saved_model_in_time(tmp_path, small_txt):
    out, minutes = tmp_path / "out", 0.75
    argv = tiny_cli(small_txt, out, "--max_minutes", str(minutes), max_steps=None, eval_strategy="steps",
                    eval_steps=40, save_steps=40, logging_steps=1, validation_split_percentage=10,
                    warmup_steps=0.05, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs=json.dumps({"min_lr_rate": 0.1}))
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "tsg", "train", *argv], cwd=REPO, env=python_env(),
                         capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert elapsed <= minutes * 60 + 3, elapsed  # start-up to exit, within a second or so of the interpreter's
    assert "steps planned, the learning rate decaying from step" in run.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    end = state["global_step"]
    assert state["max_steps"] == end > 20
    evaluations = [log["step"] for log in state["log_history"] if "eval_loss" in log]
    assert evaluations[-1] == end and evaluations.count(end) == 1  # evaluated at its last step, once
    assert (out / f"checkpoint-{end}").is_dir() and (out / "model.safetensors").is_file()
    rates = [log["learning_rate"] for log in state["log_history"] if "learning_rate" in log]
    assert max(rates) == pytest.approx(3e-3) and rates[-1] < 0.2 * 3e-3  # decayed towards the floor (3e-4)
    speeds = json.loads((out / "train_results.json").read_text())
    assert speeds["train_steps_per_second"] == pytest.approx(end / speeds["train_runtime"], rel=0.01)


@pytest.mark.parametrize("words, message", [
    (["--max_minutes", "0"], "max_minutes: expected a number > 0"),
    (["--max_minutes", "5", "--eval_strategy", "steps", "--eval_steps", "0.1"], "eval_steps=0.1 is a share"),
    (["--decay_share", "1.5"], "decay_share: expected a number in (0, 1]"),
    (["--use_muon", "true", "--optim", "adafactor"], "optim must be an adamw_* optimizer, got adafactor"),
    (["--muon_learning_rate", "2e-3"], "muon_learning_rate=0.002 is Muon's rate: set use_muon true"),
])
def test_bad_budget_or_optimizer_is_one_line(tmp_path, small_txt, capsys, words, message):
    code, _, err = run_tsg(["train", *tiny_cli(small_txt, tmp_path / "out", *words)], capsys)
    assert code == 2 and message in error_line(err, "train")
    assert not (tmp_path / "out").exists()


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, tie_word_embeddings=False))


def test_muon_takes_the_weight_matrices_and_adamw_the_rest():
    model = tiny_llama()
    matrices, rest = muon_parameters(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in matrices} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}
    assert {names[id(p)] for p in rest} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert len(matrices) + len(rest) == len(list(model.parameters()))


def test_muon_with_adamw_steps_both_and_its_state_round_trips():
    model = tiny_llama()
    decay = {name for name, p in model.named_parameters() if p.ndim == 2}
    optimizer = build_muon_with_adamw(model, torch.optim.AdamW, {"betas": (0.9, 0.95)}, 1e-2, 0.1, decay)
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.optimizers["muon"], torch.optim.Muon)
    optimizer.load_state_dict(optimizer.state_dict())  # as Accelerate does: the two optimizers' groups are new dicts
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # reaches both optimizers' groups
    assert {group["lr"] for o in optimizer.optimizers.values() for group in o.param_groups} == {5e-3}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())  # every parameter moved
    copy = build_muon_with_adamw(tiny_llama(), torch.optim.AdamW, {"betas": (0.9, 0.95)}, 1e-2, 0.1, decay)
    copy.load_state_dict(optimizer.state_dict())
    assert len(copy.state) == len(optimizer.state) == len(list(model.parameters()))


def test_muon_learning_rate_is_muons_own_and_the_schedule_scales_both():
    model = tiny_llama()
    decay = {name for name, p in model.named_parameters() if p.ndim == 2}
    optimizer = build_muon_with_adamw(model, torch.optim.AdamW, {}, 1e-3, 0.1, decay, muon_learning_rate=8e-3)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    rates = {name: {group["lr"] for group in o.param_groups} for name, o in optimizer.optimizers.items()}
    assert rates == {"muon": {4e-3}, "adamw": {5e-4}}


@pytest.mark.parametrize("kwargs, decay", [({"decay_type": "1-sqrt", "min_lr_ratio": 0.0}, 20),
                                           ({"num_decay_steps": 50}, 50)])
def test_warmup_stable_decay_without_its_decay_steps_decays_over_the_last_decay_share(tmp_path, kwargs, decay):
    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="warmup_stable_decay",
                             lr_scheduler_kwargs=kwargs, warmup_steps=10, learning_rate=1e-2, use_cpu=True,
                             report_to="none")
    trainer = StoryTrainer(model=tiny_llama(), args=args)
    trainer.decay_share = 0.2
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    factor = trainer.lr_scheduler.lr_lambdas[0]
    assert factor(5) == pytest.approx(0.5) and factor(10) == factor(100 - decay) == 1.0
    assert factor(100 - decay + 1) < 1.0 and factor(100) == pytest.approx(kwargs.get("min_lr_ratio", 0.0))
