"""The training run: stories -> tokenizer -> packed blocks -> model -> the Hugging Face Trainer under Accelerate ->
a saved model folder.

    args, training_args = tsg.config.parse_args(["configs/tiny_cpu.json", "--max_steps", "20"])
    train(args, training_args)

The output folder (`output_dir`) ends up holding a model and tokenizer that `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` load, `run_config.json` (the resolved config and the versions it ran with),
checkpoints and metrics. Nothing but a tokenizer trained here is written there before the config, the stories and
the model have loaded.

Nothing is lost when a run is cut short:

- SIGTERM (SLURM, spot machines, `kill`): the optimizer step under way ends, a checkpoint of it is saved, and the
  run exits with code 1 and one line naming the checkpoint; `--resume_from_checkpoint true` goes on from it.
- SIGKILL or a crash: `--resume_from_checkpoint true` goes on from the newest complete checkpoint (one cut short
  is skipped). In any epoch, the resumed run sees the batches the uninterrupted one would have: the Trainer's
  sampler is seeded by `data_seed` (or `seed`) and the epoch, and the batches of the epoch already trained are
  skipped.
- A full disk (ENOSPC, EDQUOT) while saving: one line, exit code 1; what was written of that checkpoint is
  removed, so the earlier complete ones are what resume finds.
- Resuming writes `run_config.resume-N.json` beside the first `run_config.json`, which stays as it was.
- Secrets: a `--hub_token` goes to the Hub client through the environment (`HF_TOKEN`) for the run, not into
  `training_args.bin`, and is blanked from `sys.argv` (which W&B records); tokens from the environment
  (`HF_TOKEN`, `WANDB_API_KEY`) are never written by tsg.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainingArguments, get_scheduler, set_seed
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType, get_last_checkpoint

from tsg import data, model as models, plots
from tsg.budget import PROVISIONAL_STEPS, TimeBudget
from tsg.callbacks import EvaluateLastStep, StopOnSignal
from tsg.config import RunError, StoryArguments, write_run_config
from tsg.files import UserError, check_weights, one_line
from tsg.optimizers import build_muon_with_adamw

logger = logging.getLogger(__name__)


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite; the run stopped before the optimizer step."""


class Interrupted(RunError):
    """A signal (SIGTERM) stopped the run after saving a checkpoint of its last optimizer step."""


class DiskFull(RunError):
    """No space left on the device (or over quota) while saving; what was written of the save is removed."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StoryTrainer(Trainer):
    """The HF Trainer, logging perplexity and bits per byte beside every eval loss, and stopping on a NaN or
    infinite loss.

    `eval_bits_per_byte` = eval loss x (predicted tokens / UTF-8 bytes of the validation stories) / ln 2:
    comparable across tokenizers; approximate, as the Trainer averages the loss over batches
    (`tsg evaluate` computes it exactly, story by story).
    """

    eval_tokens_per_byte: float | None = None
    time_budget: TimeBudget | None = None  # max_minutes: its warmup-stable-decay schedule, placed as the run goes
    use_muon: bool = False  # Muon on the weight matrices, the optim's AdamW on the rest
    muon_learning_rate: float | None = None  # Muon's peak rate (None: the run's learning_rate)
    decay_share: float = 0.2  # warmup_stable_decay without its num_decay_steps: the last share of the steps

    def create_optimizer(self, model=None):
        if not self.use_muon or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        adamw_class, adamw_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = build_muon_with_adamw(model, adamw_class, adamw_kwargs, self.args.learning_rate,
                                               self.args.weight_decay, set(self.get_decay_parameter_names(model)),
                                               muon_learning_rate=self.muon_learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        kwargs = self.args.lr_scheduler_kwargs or {}
        if self.time_budget is not None:
            self.lr_scheduler = self.time_budget.scheduler(optimizer or self.optimizer)
        elif self.args.lr_scheduler_type == SchedulerType.WARMUP_STABLE_DECAY and "num_decay_steps" not in kwargs:
            # transformers asks for the decay in steps, which a config counted in epochs cannot know ahead
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type, optimizer=optimizer or self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps), num_training_steps=num_training_steps,
                scheduler_specific_kwargs={**kwargs, "num_decay_steps": math.ceil(self.decay_share * num_training_steps)})
        else:
            return super().create_scheduler(num_training_steps, optimizer)
        self._created_lr_scheduler = True  # a second train() makes it anew, as the Trainer's own
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.time_budget is not None and "train_runtime" in logs and "train_loss" in logs:
            # the Trainer's end-of-training speeds count the provisional max_steps: these count the steps made
            steps = self.state.global_step - self.time_budget.started_at_step
            rows = steps * self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            logs["train_samples_per_second"] = round(rows / logs["train_runtime"], 3)
            logs["train_steps_per_second"] = round(steps / logs["train_runtime"], 3)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            if self.eval_tokens_per_byte:
                logs["eval_bits_per_byte"] = logs["eval_loss"] * self.eval_tokens_per_byte / math.log(2)
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # every process takes part in the check, so that all of them stop together (no rank left waiting)
        bad = self.accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), reduction="sum")
        if bad.item() > 0:
            last = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLoss(
                f"the training loss is {loss.item()} at step {self.state.global_step + 1}; stopped before the "
                f"optimizer step. The last good checkpoint is {last or 'none (no checkpoint was saved yet)'}: "
                "resume from it with a lower learning_rate (or max_grad_norm, warmup_steps)"
            )
        return loss

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's warnings after loading a checkpoint (the best model at the end, a resume), less the
        output layer of tied embeddings: save_pretrained leaves a tied weight out of the file, and loading its
        source loads it too, so it is not missing."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        if not tied or not hasattr(load_result, "_replace"):
            return super()._issue_warnings_after_load(load_result)
        missing = [key for key in load_result.missing_keys
                   if not (key in tied and tied[key] not in load_result.missing_keys and self._shares(key, tied[key]))]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _shares(self, name: str, source: str) -> bool:
        """Whether the model's parameters `name` and `source` are one tensor (tied in fact, not only in the config)."""
        try:
            return self.model.get_parameter(name) is self.model.get_parameter(source)
        except AttributeError:
            return False

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint; on a full disk, the half-written folder removed (so that no resume can take
        it) and a DiskFull naming the last complete checkpoint."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise disk_full(e, f"checkpoint {folder} (removed what was written of it)", self.args.output_dir) from e


def disk_full(error: OSError, what: str, output_dir: str) -> DiskFull:
    last = last_complete_checkpoint(output_dir)
    return DiskFull(f"{os.strerror(error.errno).lower()} while saving {what}. The last complete checkpoint is "
                    f"{last or 'none (no checkpoint was saved yet)'}: free some space, then run the same command "
                    "with --resume_from_checkpoint true")


def checkpoint_step(folder: str | Path) -> int | None:
    """The step a checkpoint holds, from its trainer_state.json; None when it has no readable one. The Trainer
    writes that file last, so a checkpoint cut short by a crash has none, or half of one."""
    try:
        step = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def is_complete_checkpoint(folder: str | Path) -> bool:
    return checkpoint_step(folder) is not None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N in output_dir that was written to the end (its trainer_state.json is at step N)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_step(folder) == int(folder.name.split("-")[-1]):
            return str(folder)
    return None


def resolve_resume(training_args: TrainingArguments, overwrite: bool) -> str | None:
    """The checkpoint to resume from (`resume_from_checkpoint`: true = the newest complete one, or a path)."""
    value = training_args.resume_from_checkpoint
    output = Path(training_args.output_dir)
    existing = get_last_checkpoint(str(output)) if output.is_dir() else None
    if value is None or str(value).lower() == "false":
        if existing and not overwrite:
            raise UserError(
                f"output_dir={str(output)!r} already holds checkpoints: resume with --resume_from_checkpoint true, "
                "start over with --overwrite_output_dir true, or choose another output_dir"
            )
        return None
    if str(value).lower() == "true":
        complete = last_complete_checkpoint(output) if output.is_dir() else None
        if complete is None:
            raise UserError(f"resume_from_checkpoint=true but output_dir={str(output)!r} holds no complete checkpoint")
        if existing != complete:
            logger.info(f"{existing} was cut short (no complete trainer_state.json): resuming from {complete}")
        check_weights(complete)  # weights cut short: one line now, not a traceback when the Trainer loads them
        return complete
    if not is_complete_checkpoint(value):
        raise UserError(f"resume_from_checkpoint={value!r} is not a complete checkpoint folder "
                          "(no readable trainer_state.json for its step)")
    check_weights(value)
    return value


def build_tokenizer(args: StoryArguments, training_args: TrainingArguments, stories, resume: str | None):
    """The named tokenizer, or, from scratch, one trained on the training stories and saved in output_dir.

    A resumed run takes the tokenizer saved in its checkpoint. Every process, rank 0 included, then
    loads the saved files, so that all of them fingerprint the same tokenizer and share one
    tokenization cache.
    """
    if args.tokenizer_name or not args.from_scratch:
        return models.load_tokenizer(args)
    if resume and (Path(resume) / "tokenizer.json").is_file():
        return models.with_pad_token(AutoTokenizer.from_pretrained(resume))
    saved = Path(training_args.output_dir)
    with training_args.main_process_first(local=False, desc="train tokenizer"):
        if training_args.process_index == 0:
            logger.info(f"training a byte-level BPE tokenizer ({args.vocab_size} tokens) on the training stories")
            texts = (batch["text"] for batch in stories["train"].iter(batch_size=1000))
            tokenizer = models.train_tokenizer(texts, args.vocab_size)
            tokenizer.model_max_length = args.max_position_embeddings or args.block_size
            tokenizer.save_pretrained(saved)
        return models.with_pad_token(AutoTokenizer.from_pretrained(saved))


def build_blocks(args: StoryArguments, training_args: TrainingArguments, stories, tokenizer: PreTrainedTokenizerBase):
    """Tokenized, packed blocks (rank 0 first, the other processes read its cache)."""
    num_proc = args.preprocessing_num_workers or data.default_num_proc(stories)
    with training_args.main_process_first(desc="tokenize and pack"):
        tokens = data.tokenize_stories(stories, tokenizer, num_proc, args.overwrite_cache)
        blocks = data.pack_dataset(tokens, args.block_size, args.packing, tokenizer.pad_token_id, num_proc,
                                   args.overwrite_cache)
    return tokens, blocks


def report_start(args, training_args, summary, model, blocks) -> None:
    """The derived numbers a user checks before waiting for a run."""
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    if not total:  # DeepSpeed ZeRO-3 leaves each parameter an empty placeholder; ds_numel is its full size
        trainable = sum(p.ds_numel for p in model.parameters() if p.requires_grad)
        total = sum(p.ds_numel for p in model.parameters())
    world = training_args.world_size
    rows_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    batches = math.ceil(len(blocks["train"]) / (training_args.per_device_train_batch_size * world))
    steps_per_epoch = max(1, math.ceil(batches / training_args.gradient_accumulation_steps))
    total_steps = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
        steps_per_epoch * training_args.num_train_epochs)
    for split in ("train", "validation"):
        if split in summary:
            s = summary[split]
            logger.info(f"{split} split: {s['stories']:,} stories, {s['tokens']:,} tokens, {s['blocks']:,} blocks of "
                               f"{args.block_size} ({args.packing} packing), pad share {s['pad_share']:.2%}")
    if summary["empty_stories_skipped"]:
        logger.info(f"skipped {summary['empty_stories_skipped']:,} empty stories")
    source = f"from scratch: {args.model_type}" if args.from_scratch else args.model_name_or_path
    if args.use_peft:
        bits = "4-bit " + args.bnb_4bit_quant_type if args.load_in_4bit else "8-bit" if args.load_in_8bit else "full-precision"
        source += f", LoRA r={args.lora_r} alpha={args.lora_alpha} on {bits} weights"
    logger.info(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}); {source}")
    if model.config._attn_implementation == models.STORY_ATTENTION:
        logger.info("attention: sdpa story by story in training on the CPU (isolated packing), with the "
                           "block mask elsewhere")
    logger.info(f"tokens per optimizer step = {training_args.per_device_train_batch_size} rows x "
                       f"{training_args.gradient_accumulation_steps} accumulation x {world} processes x "
                       f"{args.block_size} tokens = {rows_per_step * args.block_size:,}")
    if args.max_minutes:
        logger.info(f"steps per epoch = {steps_per_epoch:,}; this run: {args.max_minutes:g} minutes, its steps "
                    "planned from the speed of the first ones")
    else:
        logger.info(f"steps per epoch = {steps_per_epoch:,}; this run: {total_steps:,} steps, "
                    f"{total_steps * rows_per_step * args.block_size:,} tokens")


def setup_wandb(training_args: TrainingArguments, run_name: str) -> None:
    """W&B runs are named from the config; without an API key they run offline into output_dir."""
    if "wandb" not in training_args.report_to:
        return
    os.environ.setdefault("WANDB_PROJECT", training_args.project if training_args.project != "huggingface" else "tsg")
    os.environ.setdefault("WANDB_DIR", training_args.output_dir)
    if training_args.run_name in (None, training_args.output_dir):
        training_args.run_name = run_name
    netrc = Path.home() / ".netrc"
    has_key = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    if not has_key and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        logger.info(f"W&B: no API key, logging offline; to upload later: "
                           f"wandb sync {training_args.output_dir}/wandb/offline-run-*")


def clear_output(output_dir: str) -> None:
    """--overwrite_output_dir: remove an earlier run's checkpoints, adapter and merged model."""
    output = Path(output_dir)
    for old in [*output.glob("checkpoint-*"), output / "merged"]:
        shutil.rmtree(old, ignore_errors=True)
    for old in output.glob("run_config.resume-*.json"):
        old.unlink(missing_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "trainer_state.json",
                 "loss.png"):
        (output / name).unlink(missing_ok=True)


def build_trainer(args: StoryArguments, training_args: TrainingArguments, resume: str | None) -> StoryTrainer:
    """Stories -> tokenizer -> packed blocks -> model -> Trainer, printing what was built."""
    args.block_size = models.resolve_block_size(args)
    stories, counts = data.load_stories(args, seed=training_args.data_seed or training_args.seed)
    if training_args.eval_strategy != "no" and "validation" not in stories:
        raise UserError(
            f"eval_strategy={training_args.eval_strategy.value!r} needs validation stories: set validation_file "
            "or validation_split_percentage > 0, or eval_strategy no"
        )
    tokenizer = build_tokenizer(args, training_args, stories, resume)
    tokens, blocks = build_blocks(args, training_args, stories, tokenizer)
    model = models.load_model(args, tokenizer, training_args)
    report_start(args, training_args, data.describe(stories, tokens, blocks, counts, args.block_size), model, blocks)
    trainer = StoryTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks.get("validation"),
        processing_class=tokenizer,
        data_collator=data.BlockCollator(model.config._attn_implementation or "eager"),
    )
    trainer.use_muon, trainer.muon_learning_rate = args.use_muon, args.muon_learning_rate
    trainer.decay_share = args.decay_share
    trainer.add_callback(EvaluateLastStep)
    if args.max_minutes:
        trainer.time_budget = time_budget(args, training_args, len(blocks["validation"]) if "validation" in blocks else 0)
        trainer.add_callback(trainer.time_budget)
        trainer.time_budget.progress = next((callback for callback in trainer.callback_handler.callbacks
                                             if isinstance(callback, ProgressCallback)), None)
    if args.use_peft:  # adapter_base.json beside each adapter saved: what merging checks the base against
        from tsg.adapter import RecordBaseCallback

        trainer.add_callback(RecordBaseCallback(args.model_name_or_path))
    if "validation" in blocks:
        trainer.eval_tokens_per_byte = data.count_labels(blocks["validation"]) / data.count_bytes(stories["validation"])
    if "wandb" in training_args.report_to:
        from tsg.callbacks import SampleStoriesCallback, WandbConfigCallback

        trainer.add_callback(WandbConfigCallback(args))
        if args.sample_steps:
            sampling = SampleStoriesCallback(tokenizer, args.sample_prompts, args.sample_steps,
                                             args.sample_max_new_tokens)
            sampling.fit_to(model)
            trainer.add_callback(sampling)
    return trainer


def time_budget(args: StoryArguments, training_args: TrainingArguments, eval_rows: int) -> TimeBudget:
    """The TimeBudget of `max_minutes`, with the run's warmup, decay shape and floor: a warmup_stable_decay schedule's
    own lr_scheduler_kwargs, or cosine_with_min_lr's min_lr_rate as the floor."""
    kwargs = dict(training_args.lr_scheduler_kwargs or {})
    scheduler = training_args.lr_scheduler_type.value
    if scheduler == "warmup_stable_decay":
        shape = {key: kwargs[key] for key in ("warmup_type", "decay_type", "min_lr_ratio") if key in kwargs}
    else:
        floor = kwargs["min_lr_rate"] if "min_lr_rate" in kwargs else \
            kwargs["min_lr"] / training_args.learning_rate if "min_lr" in kwargs else None
        shape = {} if floor is None else {"min_lr_ratio": floor}
        if training_args.process_index == 0:
            logger.info(f"max_minutes: the learning rate follows warmup_stable_decay in place of {scheduler}")
    return TimeBudget(args.max_minutes, args.decay_share, training_args.warmup_steps,
                      training_args.max_steps if training_args.max_steps > 0 else None, shape, eval_rows)


def last_evaluation(trainer: StoryTrainer) -> dict | None:
    """The metrics of an evaluation of the model as it ends, when training made one at its last step (a time
    budget's end always does): the same numbers, without evaluating again."""
    state = trainer.state
    last = next((log for log in reversed(state.log_history) if "eval_loss" in log), None)
    if last is None or last.get("step") != state.global_step:
        return None
    # by the folder's name, which every process reads alike (a checkpoint's files may be on the main node only)
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint and \
            Path(state.best_model_checkpoint).name != f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}":
        return None  # the model now is an earlier checkpoint's
    return {key: value for key, value in last.items()
            if key.startswith("eval_") or key in ("epoch", "num_input_tokens_seen")}


def save(trainer: StoryTrainer, result) -> None:
    """The final model and tokenizer (or adapter), metrics, and a last evaluation."""
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if trainer.eval_dataset is not None:
        metrics = last_evaluation(trainer) or trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()  # after the last evaluation: its log_history has every point loss.png draws
    if trainer.is_world_process_zero():
        try:  # the curve for users without W&B; a run that trained and saved is not failed by its picture
            plots.write_loss_plot(trainer.args.output_dir)
        except Exception as e:  # noqa: BLE001 (matplotlib's errors are many)
            logger.warning(f"no loss.png: {one_line(e, 200)}")
    logger.info(f"saved the {'adapter' if hasattr(trainer.model, 'peft_config') else 'model'} "
                      f"and tokenizer in {trainer.args.output_dir}")



def set_log_levels(training_args: TrainingArguments) -> None:
    """tsg's, transformers' and datasets' log levels from TrainingArguments (log_level, log_level_replica), as the
    Hugging Face example scripts set them: tsg's start-up lines show on the main process unless log_level says
    otherwise, and replicas stay quiet."""
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    if training_args.should_log and training_args.log_level == "passive":
        level = logging.INFO
    logging.getLogger("tsg").setLevel(level)


@contextlib.contextmanager
def hub_token_in_environment(training_args: TrainingArguments):
    """`hub_token` moved out of TrainingArguments (which the Trainer pickles into every training_args.bin) into
    HF_TOKEN, where huggingface_hub finds it for push_to_hub, for the block; its value in sys.argv (which W&B
    records as the command line) is replaced by `<HUB_TOKEN>`."""
    token = training_args.hub_token
    if not token:
        yield
        return
    sys.argv[:] = [word.replace(token, "<HUB_TOKEN>") for word in sys.argv]
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    training_args.hub_token = None
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = saved


def train(args: StoryArguments, training_args: TrainingArguments) -> None:
    """The whole run: everything checked and built first, then the output folder written, trained and saved.

    SIGTERM while training saves a checkpoint and raises Interrupted; a full disk while saving raises DiskFull
    (both one line naming the checkpoint to resume from, exit code 1)."""
    set_log_levels(training_args)
    resume = resolve_resume(training_args, args.overwrite_output_dir)
    set_seed(training_args.seed)
    with hub_token_in_environment(training_args):
        setup_wandb(training_args, Path(training_args.output_dir).name)
        trainer = build_trainer(args, training_args, resume)
        stop = StopOnSignal()
        trainer.add_callback(stop)
        try:
            if training_args.process_index == 0:  # only now that everything was checked and built
                if args.overwrite_output_dir and not resume:
                    clear_output(training_args.output_dir)
                write_run_config(args, training_args, resume)
            if args.max_minutes:  # only now: run_config.json records the max_steps the user gave
                training_args.max_steps = PROVISIONAL_STEPS
            with stop.installed():
                result = trainer.train(resume_from_checkpoint=resume)
            if stop.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
                checkpoint = Path(training_args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at}"
                raise Interrupted(f"{stop.signal_name} received: stopped after step {stop.stopped_at} of "
                                  f"{trainer.state.max_steps} and saved checkpoint {checkpoint}: to go on, run the "
                                  "same command with --resume_from_checkpoint true")
            save(trainer, result)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            raise disk_full(e, f"in {training_args.output_dir}", training_args.output_dir) from e
