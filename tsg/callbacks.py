"""Trainer callbacks: stopping cleanly on SIGTERM, an evaluation of the last step, and W&B extras for training runs (`--report_to wandb`).

`StopOnSignal` turns SIGTERM (what SLURM, Kubernetes and spot machines send before they kill) into a clean stop:
the optimizer step under way ends, a checkpoint of it is saved, and training stops; every process of a
distributed run stops at the same step, even when the signal reaches them at different times.

`EvaluateLastStep` evaluates the last step of a run evaluated every `eval_steps`, when the steps do not end on
a multiple of them. The Trainer saves that step but does not evaluate it, so under `load_best_model_at_end` the
best evaluated checkpoint, an earlier one, would replace the finished model and the run's last steps be lost.

`SampleStoriesCallback` tells one story per prompt every `sample_steps` optimizer steps and once more at the end
of training, and logs them to the active W&B run as a table under the key `samples` (columns step, prompt,
story). The table is cumulative: W&B tables cannot change once logged, so each log is a new table holding every
row so far, and the latest one shows how the stories changed from step to step. It grows with the number of
samplings (n samplings write about n^2/2 rows in all), so keep sample_steps at a hundredth of the run or more.
The stories are greedy (the likeliest token each time): the same prompt tells the same story until the
weights change, so the rows compare across steps. Telling them leaves every random generator as it was, so
sampling does not change the training run.

`WandbConfigCallback` adds tsg's own fields (block_size, packing, sample_prompts, ...) to the W&B run config,
beside the TrainingArguments and model config that transformers' WandbCallback logs.

Throughput needs no callback of its own: with `include_num_input_tokens_seen` (on in tsg), every training log
of the Trainer carries `num_input_tokens_seen` and `train_tokens_per_second` (tokens seen in this session over
the time since training began), which W&B shows as `train/num_input_tokens_seen` and
`train/train_tokens_per_second`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
from dataclasses import asdict, replace

import numpy as np
import torch
from transformers import TrainerCallback

from tsg.files import UserError
from tsg.generation import Settings, prompt_texts, tell_stories
from tsg.model import context_length
from tsg.scoring import generation_scores

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = (
    "Once upon a time",
    "Tom and Lily went to the park",
    "One day, a little girl named Lily found a",
    "The big dog was sad because",
    "Ben wanted to fly like a bird, so",
)
SAMPLES_KEY = "samples"
SAMPLE_COLUMNS = ("step", "prompt", "story")
STEP_METRIC = "train/global_step"  # the x axis transformers' WandbCallback defines for every metric


def _active_run():
    """The active W&B run, or None (wandb is imported only when a run may exist)."""
    import wandb

    return wandb.run


@contextlib.contextmanager
def _random_state_kept():
    """Python's, NumPy's and torch's (CPU and initialised CUDA) random generators as they were on entry.

    tell_stories seeds them all; the training run must go on drawing the numbers it would have drawn."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _sharded(model) -> bool:
    """Whether the weights are split across processes (DeepSpeed ZeRO-3, FSDP): then every process must take
    part in generate, which gathers them layer by layer."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return True
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = FullyShardedDataParallel
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


class SampleStoriesCallback(TrainerCallback):
    """Every `every` optimizer steps and at the end of training, one greedy story per prompt, logged to W&B as a
    cumulative table under `samples` (columns step, prompt, story). Only the main process logs.

    `prompts=None` takes DEFAULT_SAMPLE_PROMPTS. `settings` (tsg.generation.Settings) replaces the greedy
    decoding; its seed then makes sampled stories repeatable. Works with a plain model, a PeftModel and one
    wrapped for DDP; under FSDP or ZeRO-3 every process generates (the weights are sharded), the main one logs.
    """

    def __init__(self, tokenizer, prompts=None, every: int = 500, max_new_tokens: int = 128,
                 settings: Settings | None = None):
        if prompts is None:
            prompts = DEFAULT_SAMPLE_PROMPTS
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompt_texts(prompts, "")  # no prompts, or an empty one, stop here
        if every < 1:
            raise UserError(f"sample_steps: every must be a positive number of steps, got {every}")
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.every = every
        self.settings = replace(settings or Settings(do_sample=False), max_new_tokens=max_new_tokens)
        self.rows: list[list] = []  # every (step, prompt, story) logged so far
        self.last_step: int | None = None  # the step whose stories were told last
        self._warned_no_run = False

    # --- Trainer events ---

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.fit_to(model)

    def fit_to(self, model) -> None:
        """Stop on a prompt that fills the model's context; shorten the stories to fit it. tsg's trainer calls this
        as it builds the run, before anything is written."""
        context = context_length(model.config)
        if context is None:
            return
        start = self.settings.start_marker
        longest = max(len(ids) for ids in self.tokenizer(prompt_texts(self.prompts, start))["input_ids"])
        if longest >= context:
            raise UserError(f"sample_prompts: a prompt is {longest} tokens long, but the model's context is "
                             f"{context} tokens: shorten it")
        if longest + self.settings.max_new_tokens > context:
            logger.info("sample stories: max_new_tokens %d lowered to %d to fit the model's context of %d tokens",
                        self.settings.max_new_tokens, context - longest, context)
            self.settings = replace(self.settings, max_new_tokens=context - longest)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.sample(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.last_step:
            self.sample(state, model)

    # --- the work ---

    def tell(self, model) -> list:
        """One story per prompt from `model` as it is now (eval mode and no grad while telling; modes restored)."""
        from accelerate.utils import extract_model_from_parallel

        full_params = contextlib.nullcontext()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(model, FullyShardedDataParallel):  # FSDP1: gather the root's weights, as Seq2SeqTrainer does
                full_params = FullyShardedDataParallel.summon_full_params(model, writeback=False)
        inner = extract_model_from_parallel(model)  # DDP, DeepSpeed and FSDP1 wrappers off; a PeftModel stays
        was_training = inner.training
        inner.eval()
        try:
            with _random_state_kept(), full_params, torch.no_grad():
                return tell_stories(inner, self.tokenizer, self.prompts, self.settings)
        finally:
            inner.train(was_training)

    def sample(self, state, model) -> None:
        """Tell the stories at this step and log the cumulative table (main process)."""
        if model is None or not (state.is_world_process_zero or _sharded(model)):
            return
        told = self.tell(model)
        self.last_step = state.global_step
        if not state.is_world_process_zero:
            return
        self.rows += [[state.global_step, story.prompt, story.text] for story in told]
        run = _active_run()
        if run is None:
            if not self._warned_no_run:
                logger.warning("sample stories: no active W&B run to log them to (is report_to wandb?)")
                self._warned_no_run = True
            return
        import wandb

        table = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[list(row) for row in self.rows])
        scores = {f"{SAMPLES_KEY}/{name}": value for name, value in generation_scores(told).items() if value is not None}
        run.log({SAMPLES_KEY: table, **scores, STEP_METRIC: state.global_step})


class WandbConfigCallback(TrainerCallback):
    """Adds tsg's own fields (StoryArguments: block_size, packing, ...) and the tsg version to the W&B run config.

    A field whose name the config already holds (the model config's vocab_size, hidden_size, ...: the values the
    model was built with) keeps that value; tsg's, where it differs, goes in as `tsg/<name>`."""

    def __init__(self, story_args):
        self.values = asdict(story_args)
        self.done = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.update(state)

    def on_log(self, args, state, control, **kwargs):  # in case the run began after this callback's on_train_begin
        self.update(state)

    def update(self, state) -> None:
        if self.done or not state.is_world_process_zero:
            return
        run = _active_run()
        if run is None:
            return
        from tsg import __version__

        config = run.config
        values = {"tsg_version": __version__}
        for name, value in self.values.items():
            if name not in config:
                values[name] = value
            elif config[name] != value:
                values[f"tsg/{name}"] = value
        config.update(values, allow_val_change=True)
        self.done = True


class EvaluateLastStep(TrainerCallback):
    """An evaluation at the last step of an `eval_strategy="steps"` run (see the module's text), before its save, so
    that the finished model takes part in choosing the best one."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


class StopOnSignal(TrainerCallback):
    """While `installed()`, SIGTERM (or the given signals) only raises a flag; at the end of the optimizer step under
    way the Trainer saves a checkpoint (`control.should_save`) and stops (`control.should_training_stop`).

    Under several processes the flag is summed over all of them at every step, so that all save the same step and
    stop together (no rank left waiting in a collective). `stopped_at` is the global step saved, or None; `signal_name`
    names the signal that came."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.stopped_at: int | None = None

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, frame) -> None:  # only a flag: the handler may run in the middle of anything
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        """The handlers in place for the block, the earlier ones restored after it. Python lets only the main thread
        set them: called from another thread, the block runs with the signals' usual handling."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _anyone_received(self, args) -> bool:
        if args.world_size <= 1:
            return self.received is not None
        from accelerate.utils import reduce

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=args.device)
        return reduce(flag, reduction="sum").item() > 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._anyone_received(args):
            if self.received is None:  # another process got it first
                self.received = self.signals[0]
            if state.is_world_process_zero:
                logger.warning("%s received: saving a checkpoint of step %d and stopping", self.signal_name,
                               state.global_step)
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
