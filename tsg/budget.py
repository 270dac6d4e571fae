"""Training for a time budget (`max_minutes`): a finished, evaluated, saved model when the minutes are up.

A run told its minutes, not its steps, cannot know where its learning rate should decay. It follows transformers'
warmup-stable-decay schedule (`get_wsd_schedule`): a warmup, then the peak rate for as long as the run goes, and
a decay over its last `decay_share` of steps. `TimeBudget` measures the seconds a step takes as the run goes
(the evaluations and checkpoints that recur among them included) and places the last step where it leaves time,
before the deadline, for that step's evaluation and checkpoint, the final evaluation and the final save: the
decay is placed from the measured speed.

It plans again every PLAN_EVERY steps, so a speed that drifts moves the end; once the decay has begun, the end can
only come earlier (the decay is shortened rather than the budget overrun). The budget counts from the start of
the process: loading, tokenizing and packing are inside it. Under several processes the main one plans and the
others take its plan, so that every process stops at the same step.

The plan lives in the scheduler's multiplier (`Plan`, whose numbers a checkpoint's scheduler.pt keeps): a run
resumed with `max_minutes` goes on with the plan it had, then plans again for its own minutes.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque

import psutil
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, get_wsd_schedule
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger(__name__)

PROVISIONAL_STEPS = 10**9  # max_steps and stable steps until the first plan: the Trainer wants a number
FIRST_PLAN = 5  # steps timed for the first plan (the run's first step, with its warm-up costs, is left out)
PLAN_EVERY = 10  # steps between plans: often enough to follow the speed, rare enough that the broadcast is free
RECENT_STEPS = 50  # the steps whose mean is the speed: recent enough to follow a drift, enough to average it
WARMUP_GUESS = 100  # warmup steps before the first plan, when warmup_steps is a share of a run not yet planned


def process_start() -> float:
    """time.time() when this process started: the budget counts the start-up too."""
    return psutil.Process().create_time()


@functools.lru_cache(maxsize=32)
def wsd_factor(warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str, min_lr_ratio: float):
    """transformers' warmup_stable_decay multiplier of the peak rate, step -> factor, for these phases (taken from
    a scheduler of a throwaway optimizer: get_wsd_schedule is its public form)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_wsd_schedule(probe, warmup, decay, num_stable_steps=stable, warmup_type=warmup_type,
                            decay_type=decay_type, min_lr_ratio=min_lr_ratio).lr_lambdas[0]


class Plan:
    """The schedule's phases in steps, and the LambdaLR multiplier they make. Only numbers and names in __dict__:
    LambdaLR saves a callable's __dict__ in its state_dict and puts it back on load."""

    def __init__(self, warmup: int, stable: int, decay: int, warmup_type: str = "linear", decay_type: str = "cosine",
                 min_lr_ratio: float = 0.0):
        self.warmup, self.stable, self.decay = warmup, stable, decay
        self.warmup_type, self.decay_type, self.min_lr_ratio = warmup_type, decay_type, min_lr_ratio

    @property
    def end(self) -> int:
        return self.warmup + self.stable + self.decay

    @property
    def decay_start(self) -> int:
        return self.warmup + self.stable

    def __call__(self, step: int) -> float:
        return wsd_factor(self.warmup, self.stable, self.decay, self.warmup_type, self.decay_type,
                          self.min_lr_ratio)(step)


class TimeBudget(TrainerCallback):
    """Ends training on the step that leaves time for the last evaluation and save within `minutes` of `started`
    (time.time(); default: when the process started), with the learning rate's decay over its last `decay_share`.

    `scheduler(optimizer)` is the run's LR scheduler (StoryTrainer.create_scheduler). `warmup_steps` is
    TrainingArguments' (steps, or below 1 a share of the planned steps); `max_steps`, when set, caps the plan;
    `scheduler_kwargs` are warmup_stable_decay's warmup_type, decay_type and min_lr_ratio; `eval_rows` the size of
    the evaluation set. `clock` is for tests."""

    def __init__(self, minutes: float, decay_share: float = 0.2, warmup_steps: float = 0, max_steps: int | None = None,
                 scheduler_kwargs: dict | None = None, eval_rows: int = 0, started: float | None = None,
                 clock=time.time):
        self.minutes, self.decay_share, self.warmup_steps, self.max_steps = minutes, decay_share, warmup_steps, max_steps
        self.clock = clock
        self.eval_rows = eval_rows  # rows of the evaluation set: its cost is estimated from them until one is timed
        self.deadline = (process_start() if started is None else started) + minutes * 60
        warmup = int(warmup_steps) if warmup_steps >= 1 else WARMUP_GUESS if warmup_steps else 0
        self.plan = Plan(warmup, PROVISIONAL_STEPS, 0, **(scheduler_kwargs or {}))
        self.plans = 0  # plans made in this process
        self.step_seconds: deque[float] = deque(maxlen=RECENT_STEPS)  # training alone, without evaluations or saves
        self.mark = 0.0  # when the step's own work ended: an evaluation or a save after it is timed from here
        self.eval_seconds: float | None = None  # the last evaluation's
        self.save_seconds: float | None = None  # the last checkpoint's
        self.started_at_step = 0
        self.progress: ProgressCallback | None = None

    def scheduler(self, optimizer) -> LambdaLR:
        return LambdaLR(optimizer, self.plan)

    # --- the callback ---

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at_step = state.global_step  # a resumed run times its own steps
        self.mark = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        step = state.global_step
        if step > self.started_at_step + 1:  # the first step of a process pays for warming up: left out
            self.step_seconds.append(now - self.mark)
        if not self.plans:  # before the first plan, only max_steps or a spent budget end the run
            due = len(self.step_seconds) >= FIRST_PLAN or bool(self.max_steps and step >= self.max_steps) or \
                self._agreed(int(now >= self.deadline), args) > 0
        else:
            due = (step - self.started_at_step) % PLAN_EVERY == 0
        if due:
            self.replan(args, state, now, kwargs)
        if step >= self.plan.end:  # the last step: evaluated and saved, whatever the intervals say (an epoch
            control.should_training_stop = True  # strategy does both at the end of the epoch the stop ends)
            control.should_evaluate = control.should_evaluate or args.eval_strategy == "steps"
            control.should_save = control.should_save or args.save_strategy == "steps"
        self.mark = self.clock()
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        now = self.clock()
        self.eval_seconds, self.mark = now - self.mark, now

    def on_save(self, args, state, control, **kwargs):
        now = self.clock()
        self.save_seconds, self.mark = now - self.mark, now

    # --- the plan ---

    def costs(self, args, kwargs) -> tuple[float, float, float]:
        """Seconds of (a training step, an evaluation, a checkpoint): the steps of late (a speed that drifts is
        followed), the last evaluation and checkpoint, or estimates from the step's speed before there was one."""
        step = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else self.clock() - self.mark
        evaluation = self.eval_seconds
        if evaluation is None:
            rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            evaluation = 0.0 if args.eval_strategy == "no" else \
                self.eval_rows / rows_per_step * step / 2  # a forward pass is about a third of a step
        saving = self.save_seconds
        if saving is None:
            model = kwargs.get("model")
            size = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
            saving = 1.0 + 3 * size / 100e6  # weights and the optimizer's two moments, at 100 MB/s
        return step, evaluation, saving

    def replan(self, args, state, now: float, kwargs) -> None:
        """Place the end of the run (and so the decay) from the speed measured so far."""
        step = state.global_step
        step_seconds, eval_seconds, save_seconds = self.costs(args, kwargs)
        # every step to come, with its share of the evaluations and checkpoints that recur among them
        per_step = step_seconds + (eval_seconds / state.eval_steps if args.eval_strategy == "steps" else 0.0) \
            + (save_seconds / state.save_steps if args.save_strategy == "steps" else 0.0)
        # after the last: its evaluation and checkpoint, the final save, and a margin
        reserve = eval_seconds + 2 * save_seconds + max(5.0, 0.01 * self.minutes * 60)
        end = step + max(0, math.floor((self.deadline - now - reserve) / per_step))
        end = max(step, self._agreed(min(end, self.max_steps) if self.max_steps else end, args))
        plan = self.plan
        if plan.stable < PROVISIONAL_STEPS and step >= plan.decay_start:  # decaying: only shortened, not moved
            plan.decay = min(plan.decay, max(0, end - plan.decay_start))
        else:  # the decay starts decay_share before the end, or now if that is past
            decay_start = max(step, end - math.ceil(self.decay_share * end))
            warmup = plan.warmup  # kept once passed, so that the rate never falls back into a warmup
            if self.warmup_steps < 1 and step < plan.warmup:
                warmup = max(step, math.ceil(self.warmup_steps * end))
            warmup = min(warmup, decay_start)
            plan.warmup, plan.stable, plan.decay = warmup, decay_start - warmup, end - decay_start
        self.plans += 1
        state.max_steps = max(plan.end, step)
        self._show_total(state.max_steps)
        if self.plans == 1 and state.is_world_process_zero:
            logger.info(f"max_minutes={self.minutes:g}: {state.max_steps:,} steps planned, the learning rate "
                        f"decaying from step {plan.decay_start:,} ({step_seconds:.3g} s a step measured, "
                        f"{reserve:.0f} s kept for the last evaluation and save)")

    def _agreed(self, value: int, args) -> int:
        """The main process's `value`, on every process."""
        if args.world_size <= 1:
            return value
        from accelerate.utils import broadcast

        return int(broadcast(torch.tensor([value], dtype=torch.long, device=args.device), from_process=0).item())

    def _show_total(self, total: int) -> None:
        """The progress bar's total: the planned steps, not the provisional ones."""
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None and bar.total != total:
            bar.total = total
            bar.refresh()
