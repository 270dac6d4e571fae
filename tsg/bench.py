"""Benchmarks: what tsg's choices cost and save, each comparison measured side by side in one run (same
model, same data, same machine), written as raw figures and ratios.

    make bench                                         # DATA=stories.txt (default: the TinyStories sample)
    tsg bench --data stories.txt --output bench-results.json
    tsg bench --only generation                        # one section (the hardware section always runs)
    tsg bench --tiny                                   # every section on tiny sizes, in seconds (the tests run it)

Sections:
  hardware    CPU model, cores, torch threads, GPU name, and the measured matmul peak (fp32 on a CPU, bf16 on a GPU)
  packing     training throughput in real (non-pad) tokens/s of the packing modes isolated, concat, pad to the
              block and pad to the batch's longest story, and the pad share of each (a 1.38M GPT-2: tiny_cpu.json's
              model with block 512, batch 8)
  trainer     tsg's Trainer step against a plain PyTorch loop: same model, batches and optimizer
  mfu         training FLOP/s of configs/tiny_cpu.json (read through tsg.config, so edits to it flow in) over the
              measured peak, and the levers around it (fused optimizer, torch.compile, batch, threads)
  pipeline    tokenize-and-pack seconds per MB: cold and cached, num_proc 1 and 2; then, at scale, files of ~100 MB,
              ~500 MB and ~2 GB made by repeating the data (a temporary folder): MB/s of reading, tokenizing and
              packing as `tsg train` does (its default processes), the peak memory of the process and its workers
              (their own, not the page cache of the memory-mapped Arrow files), the cores used and the disk
              the cache takes (about 17 minutes and 17 GB of disk at these sizes; --scale_megabytes sets them)
  generation  tokens/s of 32 stories batched against one by one; fp32, 8-bit and 4-bit weights; time to first
              token; one story (greedy, KV cache, 256 new tokens): tsg's path against plain generate() and, with
              llama-cpp-python installed, llama.cpp on the model's GGUF, on the llama2.c stories15M shape and on
              tiny_cpu.json's model
  memory      peak memory of loading and of one training step: full fine-tuning, LoRA, 8-bit and 4-bit QLoRA of
              one model (a GPT-2 medium shape), and its weights in memory, fp32 against 4-bit
  gpu         only where torch sees a GPU: configs/xl_qlora.json on a GPT-2 XL shape (random weights): peak GPU
              memory, tokens/s, MFU, as configured and with one lever at a time

Models are built from configs with random weights (nothing is downloaded); the tokenizer is a byte-level BPE
trained on the stories. Each timed comparison alternates its variants `repeats` times and keeps each one's
best run, so that a burst of load from other processes does not decide a ratio. No test asserts a speed.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import Literal, Optional

# tsg first: its __init__ quiets a bitsandbytes import-time warning before transformers imports bitsandbytes
from tsg import __version__, data, generation, llamacpp, model as models  # isort: skip
from tsg.config import Command, StoryArguments, option, parse_args, run as run_command  # isort: skip
from tsg.files import UserError, existing_file, read_lines, write_text  # isort: skip
from tsg.model import build_config, context_length  # isort: skip
from tsg.scoring import DEFAULT_PROMPTS  # isort: skip
from tsg.trainer import build_trainer  # isort: skip
import datasets
import numpy as np
import psutil
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "configs" / "tiny_cpu.json"
SECTIONS = ("packing", "trainer", "mfu", "pipeline", "generation", "memory", "gpu")
PACKING_MODES = ("isolated", "concat", "pad_block", "pad_longest")
MEMORY_CASES = ("full", "lora", "8bit", "4bit")
FLOPS_COUNTING = (
    "training FLOPs per token = 6 x N + 12 x L x d x T (PaLM, Chowdhery et al. 2022, appendix B): N = weights of every "
    "matmul (each Linear/Conv1D layer, the LM head included even when tied to the embeddings; embedding lookups, "
    "norms and biases left out), L layers, width d, T = block size (the full T x T attention that the masked "
    "kernels compute); counted over every token processed, pad included. Adapter training on frozen weights (GPU "
    "section): 4 x N + 8 x L x d x T (no weight gradients for the frozen matmuls) plus 6 x the adapter weights."
)
# What the issue asks each ratio to show: (comparison, bound). None: reported, no target.
TARGETS = {
    "isolated_vs_concat": (">=", 1.0),
    "isolated_vs_pad_block": (">=", 2.5),
    "isolated_vs_pad_longest": (">=", 1.3),
    "isolated_pad_share": ("<", 0.01),
    "trainer_vs_plain_loop": (">=", 0.95),
    "mfu": (">=", 0.45),
    "cached_vs_cold_pipeline": ("<=", 0.05),
    "pipeline_scale_seconds_per_mb": ("<=", 1.2),
    "pipeline_scale_memory": ("<=", 1.5),
    "pipeline_scale_cores": None,
    "batched32_vs_single_generation": (">=", 8.0),
    "single_vs_hf_generate": (">=", 1.4),
    "single_vs_hf_generate_tiny_cpu": None,
    "llama_cpp_vs_tsg_single": None,
    "llama_cpp_vs_tsg_single_tiny_cpu": None,
    "weights_4bit_vs_fp32": ("<=", 0.3),
}


@dataclass(frozen=True)
class Sizes:
    """How much each section runs: `FULL` for `make bench` (~30 min on 2 cores, half of it the pipeline at scale),
    `TINY` for the tests (seconds)."""

    max_stories: int | None  # training stories read from the data file (None: all)
    warmup_steps: int  # training steps before the clock starts (first-step allocations, torch.compile)
    timed_steps: int
    repeats: int  # each timed comparison alternates its variants this many times, keeping each one's best run
    packing_block: int  # the packing section's model: tiny_cpu.json's with this block and batch
    packing_batch: int
    lever_batch: int  # the larger batch tried as an MFU lever
    compile: bool  # torch.compile levers (tens of seconds of compiling on a CPU)
    peak_size: int  # n of the n x n matmul that measures the peak
    single_new_tokens: int  # one story: new tokens
    batched_new_tokens: int  # 32 stories: new tokens each
    llama: dict = field(default_factory=dict)  # the single-stream llama shape
    memory_model: dict = field(default_factory=dict)  # the memory section's GPT-2 shape
    memory_tokens: int = 128  # tokens of the memory section's training step
    scale_megabytes: tuple = (100, 500, 2000)  # the pipeline section's files made by repeating the data
    gpu_model: dict = field(default_factory=dict)


FULL = Sizes(
    max_stories=None, warmup_steps=3, timed_steps=20, repeats=3, packing_block=512, packing_batch=8, lever_batch=64,
    compile=True, peak_size=2048, single_new_tokens=256, batched_new_tokens=128,
    # llama2.c stories15M: dim 288, 6 layers, 6 heads, hidden 768, vocab 32000, shared classifier, context 256
    llama=dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=6, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True),
    memory_model=dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),  # gpt2-medium
    gpu_model=dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),  # gpt2-xl
)
TINY = Sizes(
    max_stories=120, warmup_steps=1, timed_steps=2, repeats=1, packing_block=64, packing_batch=4, lever_batch=8,
    compile=False, peak_size=256, single_new_tokens=8, batched_new_tokens=4,
    llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=4096, max_position_embeddings=64, tie_word_embeddings=True),
    memory_model=dict(n_layer=2, n_embd=64, n_head=4, vocab_size=4096, n_positions=128),
    memory_tokens=32, scale_megabytes=(1, 3),
    gpu_model=dict(n_layer=2, n_embd=64, n_head=4, vocab_size=4096, n_positions=512),
)


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


@contextlib.contextmanager
def quiet():
    """Builds say what they built (tsg's start-up lines, the Trainer's output): not in the bench's progress."""
    tsg_logger = logging.getLogger("tsg")
    level = tsg_logger.level
    tsg_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tsg_logger.setLevel(level)


def best(runs: list[dict], key: str) -> dict:
    """The run with the highest `key`, with every run's value beside it."""
    top = max(runs, key=lambda run: run[key])
    return {**top, f"runs_{key}": [round(run[key], 3) for run in runs]}


# --- hardware ---


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(n: int, dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """FLOP/s of the best of several timed rounds of n x n torch.mm (the machine's practical matmul peak)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(3 * 2 * n**3 / (time.perf_counter() - start))
    return max(rates)


def measure_hardware(sizes: Sizes) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = matmul_peak(sizes.peak_size, torch.float32, "cpu")
    say(f"fp32 matmul peak ({sizes.peak_size}^2, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    found = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "matmul_peak_fp32_flops": peak, "matmul_size": sizes.peak_size,
        "versions": {m.__name__: m.__version__ for m in (torch, datasets)} | {"python": platform.python_version()},
    }
    if gpu:
        found["matmul_peak_bf16_gpu_flops"] = matmul_peak(8192, torch.bfloat16, "cuda")
        say(f"bf16 matmul peak on {gpu}: {found['matmul_peak_bf16_gpu_flops'] / 1e12:.1f} TFLOP/s")
    return found


# --- training: the clock ---


class CountingCollator:
    """Wraps a collator and notes, batch by batch in the order they are made, its real (non-pad) and processed
    tokens. The rows' 2-D attention_mask (1 = real token) is read before the collator may replace it."""

    def __init__(self, collator):
        self.collator = collator
        self.counts: deque[tuple[int, int]] = deque()

    def __call__(self, rows):
        batch = self.collator(rows)
        self.counts.append((sum(int(np.sum(row["attention_mask"])) for row in rows), batch["input_ids"].numel()))
        return batch


class StepClock(TrainerCallback):
    """The time at the end of each optimizer step, with the tokens of the batch it trained on."""

    def __init__(self, counter: CountingCollator):
        self.counter = counter
        self.steps: list[tuple[float, int, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.clear()
        self.counter.counts.clear()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter(), *self.counter.counts.popleft()))


def throughput(steps: list[tuple[float, int, int]], warmup: int) -> dict:
    """Tokens/s from the end of the last warm-up step to the end of the last step."""
    timed = steps[warmup - 1:] if warmup else steps
    seconds = timed[-1][0] - timed[0][0]
    real = sum(s[1] for s in timed[1:])
    processed = sum(s[2] for s in timed[1:])
    return {"steps": len(timed) - 1, "seconds": seconds, "real_tokens_per_s": real / seconds,
            "tokens_per_s": processed / seconds, "pad_share_timed": 1 - real / processed}


def config_trainer(work: Path, name: str, data_file: str, tokenizer_dir: Path, sizes: Sizes, *overrides: str,
                   config: Path = TINY_CPU):
    """tsg's Trainer as `tsg.trainer.build_trainer` builds it from `config` (tiny_cpu.json), with the bench's overrides: the
    stories, the tokenizer trained once, no evaluation or checkpoints, and warmup + timed steps. Its collator
    counts tokens and a StepClock times the steps."""
    argv = [str(config), "--train_file", data_file, "--validation_file", "none", "--validation_split_percentage", "0",
            "--tokenizer_name", str(tokenizer_dir), "--output_dir", str(work / name), "--overwrite_output_dir", "true",
            "--max_steps", str(sizes.warmup_steps + sizes.timed_steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    if sizes.max_stories:
        argv += ["--max_train_samples", str(sizes.max_stories)]
    args, training_args = parse_args(argv + list(overrides))
    set_seed(training_args.seed)
    with quiet():
        trainer = build_trainer(args, training_args, resume=None)
    trainer.remove_callback(PrinterCallback)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(StepClock(counter))
    trainer.story_args = args
    return trainer


def clock_of(trainer) -> StepClock:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepClock))


def train_throughput(trainer, sizes: Sizes) -> dict:
    """Tokens/s of tsg's Trainer over `timed_steps` steps after `warmup_steps`."""
    trainer.train()
    return throughput(clock_of(trainer).steps, sizes.warmup_steps)


def epoch_pad_share(trainer) -> float:
    """Share of pad tokens over one epoch of the trainer's batches (collated, not trained)."""
    counter = trainer.data_collator
    counter.counts.clear()
    for _ in trainer.get_train_dataloader():
        pass
    real, processed = map(sum, zip(*counter.counts))
    counter.counts.clear()
    return 1 - real / processed


# --- packing ---


def measure_packing(work: Path, data_file: str, tokenizer_dir: Path, sizes: Sizes) -> dict:
    """Real-token throughput and pad share of each packing mode on the same model, stories and batch shape."""
    shape = ["--block_size", str(sizes.packing_block), "--per_device_train_batch_size", str(sizes.packing_batch)]
    packings = {"isolated": "isolated", "concat": "concat", "pad_block": "pad", "pad_longest": "pad"}
    trainers = {mode: config_trainer(work, f"packing-{mode}", data_file, tokenizer_dir, sizes, *shape,
                                     "--packing", packings[mode], "--torch_compile", "false")
                for mode in PACKING_MODES}
    trainers["pad_longest"].data_collator.collator.pad_to_longest = True
    runs = {mode: [] for mode in PACKING_MODES}
    for _ in range(sizes.repeats):
        for mode in PACKING_MODES:
            runs[mode].append(train_throughput(trainers[mode], sizes))
            say(f"packing {mode:<11}: {runs[mode][-1]['real_tokens_per_s']:,.0f} real tokens/s")
    found = {"block_size": sizes.packing_block, "batch_size": sizes.packing_batch,
             "parameters": trainers["isolated"].model.num_parameters()}
    for mode in PACKING_MODES:
        found[mode] = {**best(runs[mode], "real_tokens_per_s"), "pad_share": epoch_pad_share(trainers[mode])}
        say(f"packing {mode:<11}: pad share {found[mode]['pad_share']:.2%}")
    return found


# --- the Trainer against a plain loop ---


def plain_loop_throughput(trainer, sizes: Sizes) -> dict:
    """A minimal PyTorch loop on the Trainer's model, batches and optimizer (a new one, built as the Trainer builds
    its own: Muon + AdamW where the config says use_muon): forward, backward, gradient clipping, optimizer step."""
    model = trainer.model
    model.train()
    kept, trainer.optimizer = trainer.optimizer, None
    optimizer = trainer.create_optimizer()
    trainer.optimizer = kept
    counter = trainer.data_collator
    counter.counts.clear()
    steps = []
    for batch in islice(trainer.get_train_dataloader(), sizes.warmup_steps + sizes.timed_steps):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append((time.perf_counter(), *counter.counts.popleft()))
    return throughput(steps, sizes.warmup_steps)


def measure_trainer(work: Path, data_file: str, tokenizer_dir: Path, sizes: Sizes) -> dict:
    """tsg's Trainer against a plain loop: tiny_cpu.json's model and batches (torch.compile off for both)."""
    trainer = config_trainer(work, "trainer", data_file, tokenizer_dir, sizes, "--torch_compile", "false")
    runs = {"trainer": [], "plain_loop": []}
    for _ in range(sizes.repeats):
        runs["trainer"].append(train_throughput(trainer, sizes))
        runs["plain_loop"].append(plain_loop_throughput(trainer, sizes))
        say(f"trainer {runs['trainer'][-1]['tokens_per_s']:,.0f} tokens/s, plain loop "
            f"{runs['plain_loop'][-1]['tokens_per_s']:,.0f} tokens/s")
    return {"optimizer": trainer.args.optim.value, **{name: best(r, "tokens_per_s") for name, r in runs.items()}}


# --- MFU ---


def training_flops_per_token(model, seq_len: int) -> dict:
    """Training FLOPs per token (see FLOPS_COUNTING): full training, or adapters on frozen weights."""
    config = model.config
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.shape.numel() * (2 if module.weight.dtype == torch.uint8 else 1)
    layers, width = config.num_hidden_layers, config.hidden_size
    if frozen:  # adapters on a frozen (possibly 4-bit packed: two weights a byte) model
        flops = 4 * frozen + 6 * trainable + 8 * layers * width * seq_len
    else:
        flops = 6 * trainable + 12 * layers * width * seq_len
    return {"matmul_weights": frozen + trainable, "trainable_matmul_weights": trainable, "layers": layers,
            "width": width, "seq_len": seq_len, "flops_per_token": flops}


def mfu_run(trainer, sizes: Sizes, peak: float, threads: int | None = None) -> dict:
    """Throughput and MFU of one training configuration (with `threads` torch threads when given)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        run = train_throughput(trainer, sizes)
    finally:
        torch.set_num_threads(before)
    flops = training_flops_per_token(trainer.model, trainer.story_args.block_size)
    achieved = run["tokens_per_s"] * flops["flops_per_token"]
    return {**run, **flops, "threads": threads or before, "flops_per_s": achieved, "mfu": achieved / peak}


def dropouts_on(story_args: StoryArguments) -> dict:
    """The from-scratch architecture's dropouts that the config leaves above 0, set to 0 (with attention dropout,
    sdpa on a CPU leaves its fused kernel for the math path, which builds the whole attention matrix)."""
    config = build_config(story_args, AutoTokenizer.from_pretrained(story_args.tokenizer_name)).to_dict()
    return {key: 0.0 for key, value in config.items() if "drop" in key and isinstance(value, float) and value > 0}


def measure_mfu(work: Path, data_file: str, tokenizer_dir: Path, sizes: Sizes, peak: float) -> dict:
    """MFU of configs/tiny_cpu.json as it stands, then one lever at a time against it."""
    config_runs = []
    trainer = config_trainer(work, "mfu", data_file, tokenizer_dir, sizes)
    args = trainer.args
    other_optim = "adamw_torch" if args.optim == "adamw_torch_fused" else "adamw_torch_fused"
    levers = {  # name: (command-line overrides of the config, torch threads)
        f"optim {other_optim}": (["--optim", other_optim], None),
        f"batch {sizes.lever_batch}": (["--per_device_train_batch_size", str(sizes.lever_batch)], None),
        "1 torch thread": ([], 1),
    }
    dropouts = dropouts_on(trainer.story_args) if trainer.story_args.from_scratch else {}
    if dropouts:
        overrides = {**(trainer.story_args.config_overrides or {}), **dropouts}
        levers["dropout 0"] = (["--config_overrides", json.dumps(overrides)], None)
    if sizes.compile:
        levers[f"torch_compile {str(not args.torch_compile).lower()}"] = (
            ["--torch_compile", str(not args.torch_compile).lower()], None)
    found = {"config": str(TINY_CPU.relative_to(REPO)), "batch_size": args.per_device_train_batch_size,
             "block_size": trainer.story_args.block_size, "optim": args.optim.value,
             "torch_compile": args.torch_compile, "levers": {}}
    for _ in range(sizes.repeats):
        config_runs.append(mfu_run(trainer, sizes, peak))
        say(f"mfu tiny_cpu.json: {config_runs[-1]['tokens_per_s']:,.0f} tokens/s, MFU {config_runs[-1]['mfu']:.1%}")
    found["as_configured"] = best(config_runs, "mfu")
    for name, (overrides, threads) in levers.items():
        lever = config_trainer(work, "mfu-lever", data_file, tokenizer_dir, sizes, *overrides) if overrides else trainer
        found["levers"][name] = mfu_run(lever, sizes, peak, threads)
        say(f"mfu lever {name}: {found['levers'][name]['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {found['levers'][name]['mfu']:.1%}")
    return found


# --- data pipeline ---


def measure_pipeline(stories: datasets.DatasetDict, tokenizer, block_size: int) -> dict:
    """tokenize_stories + pack_dataset (isolated) seconds per MB of story text: cold (cache overwritten) and
    from the cache, with num_proc 1 and 2."""
    megabytes = data.count_bytes(stories["train"]) / 1e6
    found = {"megabytes": megabytes, "stories": len(stories["train"])}
    for num_proc in (1, 2):
        for run in ("cold", "cached"):
            start = time.perf_counter()
            with quiet():
                tokens = data.tokenize_stories(stories, tokenizer, num_proc, overwrite_cache=run == "cold")
                data.pack_dataset(tokens, block_size, "isolated", tokenizer.pad_token_id, num_proc,
                                  overwrite_cache=run == "cold")
            seconds = time.perf_counter() - start
            found[f"{run}_num_proc_{num_proc}"] = {"seconds": seconds, "seconds_per_mb": seconds / megabytes}
            say(f"pipeline {run} num_proc {num_proc}: {seconds / megabytes:.3f} s/MB")
    return found


def repeat_stories(source: str, megabytes: float, path: Path) -> None:
    """A TinyStories .txt file of at least `megabytes` MB: `source`'s stories over and over, each copy ending on a
    story's end."""
    text = Path(source).read_bytes().rstrip() + b"\n"
    end = (data.END_OF_STORY + "\n").encode()
    if not text.endswith(end):
        text += end
    with open(path, "wb") as f:
        for _ in range(math.ceil(megabytes * 1e6 / len(text))):
            f.write(text)


class MemorySampler:
    """The peak over time of a process tree's own memory (RSS less its shared, file-backed pages: the page cache of
    memory-mapped Arrow files is the kernel's to drop) and of its RSS, sampled in a thread."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak_own, self.peak_rss = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            own = rss = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    memory = process.memory_info()
                    own, rss = own + memory.rss - memory.shared, rss + memory.rss
            self.peak_own, self.peak_rss = max(self.peak_own, own), max(self.peak_rss, rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def scale_case(path: str, tokenizer_dir: str, block_size: int, cache: str) -> dict:
    """In a fresh process (a cold cache of its own): `path` read, tokenized and packed (isolated) as `tsg train`
    does, each stage timed; the peak memory of the process and its workers, and the cores they used."""
    datasets.config.HF_DATASETS_CACHE = Path(cache)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    usage = lambda: sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime  # noqa: E731
                        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    seconds, cpu_before = {}, usage()
    with MemorySampler() as memory:
        start = time.perf_counter()
        stories, _ = data.load_stories(StoryArguments(model_type="gpt2", train_file=path,
                                                      validation_split_percentage=0), seed=0)
        seconds["read"] = time.perf_counter() - start
        num_proc = data.default_num_proc(stories)
        start = time.perf_counter()
        tokens = data.tokenize_stories(stories, tokenizer, num_proc)
        seconds["tokenize"] = time.perf_counter() - start
        start = time.perf_counter()
        blocks = data.pack_dataset(tokens, block_size, "isolated", tokenizer.pad_token_id, num_proc)
        seconds["pack"] = time.perf_counter() - start
    wall = sum(seconds.values())
    return {"seconds": seconds, "num_proc": num_proc, "stories": len(stories["train"]), "blocks": len(blocks["train"]),
            "peak_own_memory_bytes": memory.peak_own, "peak_rss_bytes": memory.peak_rss,
            "cores_used": (usage() - cpu_before) / wall, "cache_bytes": folder_bytes(Path(cache))}


def measure_pipeline_scale(work: Path, data_file: str, tokenizer_dir: Path, block_size: int,
                           megabytes: tuple) -> dict:
    """scale_case on files of each size in `megabytes` made from `data_file` (a TinyStories .txt), one at a time,
    each deleted with its cache before the next."""
    if Path(data_file).suffix.lower() != ".txt":
        return {"skipped": f"{data_file} is not a TinyStories .txt file to repeat"}
    found = {}
    for size in megabytes:
        folder = work / "scale"
        folder.mkdir()
        path = folder / f"stories_{size:g}MB.txt"
        repeat_stories(data_file, size, path)
        file_megabytes = path.stat().st_size / 1e6
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
            case = fresh_process.submit(scale_case, str(path), str(tokenizer_dir), block_size,
                                        str(folder / "cache")).result()
        shutil.rmtree(folder)
        wall = sum(case["seconds"].values())
        case |= {"megabytes": file_megabytes, "megabytes_per_s": file_megabytes / wall,
                 "tokenize_pack_megabytes_per_s": file_megabytes / (case["seconds"]["tokenize"] + case["seconds"]["pack"])}
        found[f"{size:g}MB"] = case
        say(scale_line(case))
    return found


def scale_line(case: dict) -> str:
    """One file of the pipeline at scale, as the progress line and the table show it."""
    seconds = case["seconds"]
    return (f"pipeline at scale, {case['megabytes']:,.0f} MB: {case['megabytes_per_s']:.2f} MB/s in all (read "
            f"{seconds['read']:.0f} s, tokenize {seconds['tokenize']:.0f} s, pack {seconds['pack']:.0f} s; "
            f"{case['num_proc'] or 1} processes, {case['cores_used']:.2f} cores used), peak memory "
            f"{case['peak_own_memory_bytes'] / 2**20:,.0f} MiB own ({case['peak_rss_bytes'] / 2**20:,.0f} MiB RSS), "
            f"cache {case['cache_bytes'] / 1e9:.2f} GB")


# --- generation ---


def build_tiny_cpu_model(tokenizer, tokenizer_dir: Path, folder: Path) -> Path:
    """tiny_cpu.json's model with random weights, saved with the tokenizer (what tsg.generation.load_model loads)."""
    args, _ = parse_args([str(TINY_CPU), "--tokenizer_name", str(tokenizer_dir), "--output_dir", str(folder)])
    torch.manual_seed(0)
    models.load_model(args, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_llama(tokenizer, shape: dict, folder: Path) -> Path:
    """A llama of the llama2.c stories15M shape (random weights), saved with the bench's tokenizer (its ids are
    a part of the model's vocabulary: ids past the tokenizer's decode to nothing)."""
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    """`n` story openings: the evaluation's default prompts, cycled."""
    return list(islice(cycle(read_lines(DEFAULT_PROMPTS, "prompts")), n))


def time_stories(model, tokenizer, texts: list[str], **settings) -> dict:
    """Tokens/s of tsg.generation.tell_stories (new tokens, end-of-story token included)."""
    start = time.perf_counter()
    stories = generation.tell_stories(model, tokenizer, texts, **settings)
    seconds = time.perf_counter() - start
    tokens = sum(story.tokens for story in stories)
    return {"stories": len(stories), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def time_first_token(model, tokenizer) -> float:
    """Seconds to the first new token of one story (the prompt's forward pass and one token), best of 3."""
    return min(time_stories(model, tokenizer, prompts(1), max_new_tokens=1)["seconds"] for _ in range(3))


def hf_generate(model, tokenizer, text: str, new_tokens: int) -> dict:
    """Plain `model.generate()`: greedy, its default (dynamic) KV cache, at most `new_tokens` tokens (it stops at
    the model's end-of-story token, as tsg does)."""
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    tokens = output.shape[1] - inputs["input_ids"].shape[1]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def time_llama_cpp(model, text: str, new_tokens: int) -> dict:
    """Tokens/s of tsg.llamacpp.tell_stories, greedy: llama.cpp on the model's f32 GGUF (new tokens, end-of-story
    token included)."""
    start = time.perf_counter()
    [story] = llamacpp.tell_stories(model, text, do_sample=False, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens": story.tokens, "seconds": seconds, "tokens_per_s": story.tokens / seconds}


def single_stream(folder: Path, sizes: Sizes, label: str) -> dict:
    """One story, greedy, `single_new_tokens` new tokens: plain generate() on the model as transformers loads it
    against tsg's path (tell_stories: the output layer in its decoding layout on a CPU, and a static KV cache and
    compiled decoding steps when `sizes.compile`) and, where llama-cpp-python is installed, llama.cpp on the model's
    f32 GGUF (`tsg generate --backend llama.cpp`), alternated."""
    model, tokenizer = generation.load_model(str(folder))
    text = prompts(1)[0]
    new_tokens = min(sizes.single_new_tokens, context_length(model.config) - len(tokenizer(text)["input_ids"]))
    settings = dict(do_sample=False, max_new_tokens=new_tokens, compile=sizes.compile)
    generation.tell_stories(model, tokenizer, text, **settings)  # compiles (when asked), allocates
    hf_generate(model, tokenizer, text, new_tokens)
    runs = {"hf_generate": [], "tsg": []}
    gguf_model, skipped = None, None
    try:
        with quiet():
            gguf_model = llamacpp.load_gguf_model(str(folder), device="cpu")
        time_llama_cpp(gguf_model, text, new_tokens)
        runs["llama_cpp"] = []
    except UserError as e:
        skipped = str(e)
        say(f"single stream {label}: llama.cpp skipped ({e})")
    try:
        for _ in range(max(2, sizes.repeats)):
            runs["hf_generate"].append(hf_generate(model, tokenizer, text, new_tokens))
            runs["tsg"].append(time_stories(model, tokenizer, [text], **settings))
            if gguf_model is not None:
                runs["llama_cpp"].append(time_llama_cpp(gguf_model, text, new_tokens))
    finally:
        if gguf_model is not None:
            gguf_model.close()
    found = {"parameters": model.num_parameters(), "compiled": sizes.compile, "max_new_tokens": new_tokens,
             **{name: best(r, "tokens_per_s") for name, r in runs.items()},
             **({"llama_cpp_skipped": skipped} if skipped else {})}
    say(f"single stream {label}: tsg {found['tsg']['tokens_per_s']:.0f} tokens/s, plain generate() "
        f"{found['hf_generate']['tokens_per_s']:.0f} tokens/s" + (
            f", llama.cpp {found['llama_cpp']['tokens_per_s']:.0f} tokens/s" if "llama_cpp" in found else ""))
    return found


def measure_generation(work: Path, tokenizer, tokenizer_dir: Path, sizes: Sizes) -> dict:
    """Batched against one by one, fp32 / 8-bit / 4-bit weights, time to first token (tiny_cpu.json's model);
    single stream on the stories15M shape and on tiny_cpu.json's model."""
    folder = build_tiny_cpu_model(tokenizer, tokenizer_dir, work / "gen-tiny_cpu")
    texts = prompts(32)
    settings = dict(max_new_tokens=sizes.batched_new_tokens, seed=0)
    found = {"model": "tiny_cpu.json, random weights", "new_tokens": sizes.batched_new_tokens, "weights": {}}
    for quantization in generation.QUANTIZATIONS:
        model, tok = generation.load_model(str(folder), quantization)
        if quantization == "none":  # the batched32 / one-by-one ratio: alternated, each one's best run
            runs = {"batched32": [], "one_by_one32": []}
            for _ in range(sizes.repeats):
                runs["batched32"].append(time_stories(model, tok, texts, batch_size=32, **settings))
                runs["one_by_one32"].append(time_stories(model, tok, texts, batch_size=1, **settings))
            batched = best(runs["batched32"], "tokens_per_s")
            found["one_by_one32"] = best(runs["one_by_one32"], "tokens_per_s")
        else:
            batched = time_stories(model, tok, texts, batch_size=32, **settings)
        found["weights"][quantization] = {"batched32": batched, "time_to_first_token_s": time_first_token(model, tok),
                                          "memory_footprint_bytes": model.get_memory_footprint()}
        say(f"generation {quantization}: 32 stories batched {batched['tokens_per_s']:,.0f} tokens/s, first token "
            f"{found['weights'][quantization]['time_to_first_token_s'] * 1e3:.1f} ms")
        if quantization == "none":
            say(f"generation 32 stories one by one: {found['one_by_one32']['tokens_per_s']:,.0f} tokens/s")
    found["single_stream_stories15m"] = single_stream(build_llama(tokenizer, sizes.llama, work / "gen-llama"),
                                                      sizes, "stories15M shape")
    found["single_stream_tiny_cpu"] = single_stream(folder, sizes, "tiny_cpu.json")
    return found


# --- memory ---


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def memory_case(model_dir: str, case: str, tokens: int) -> dict:
    """In a fresh process: peak RSS of loading the model for `case`, and of one training step (AdamW on the
    trainable weights) after it, over the process's RSS before loading (imports done). Where a GPU is visible
    every case trains there (quantized weights load onto it), and the peak GPU memory is recorded too."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = StoryArguments(model_name_or_path=model_dir, use_peft=case != "full", load_in_8bit=case == "8bit",
                          load_in_4bit=case == "4bit", block_size=tokens)
    on_gpu = torch.cuda.is_available()  # quantized weights load onto the GPU: every case then trains there
    before = psutil.Process().memory_info().rss
    model = models.load_model(args, tokenizer)
    if on_gpu and case in ("full", "lora"):
        model.to("cuda")
    gpu_loaded = torch.cuda.max_memory_allocated() if on_gpu else None
    loaded = peak_rss_bytes()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, len(tokenizer), (1, tokens), device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    found = {"load_peak_bytes": loaded - before, "step_peak_bytes": peak_rss_bytes() - before,
             "weights_bytes": model.get_memory_footprint(), "trainable": trainable, "parameters": total}
    if on_gpu:
        found |= {"gpu_load_peak_bytes": gpu_loaded, "gpu_step_peak_bytes": torch.cuda.max_memory_allocated()}
    return found


def measure_memory(work: Path, tokenizer, sizes: Sizes) -> dict:
    """Each case in a fresh process (peak RSS is per process): full fine-tuning, LoRA, 8-bit and 4-bit QLoRA of
    one saved GPT-2 (random weights), one training step of `memory_tokens` tokens."""
    folder = work / "memory-model"
    torch.manual_seed(0)
    config = GPT2Config(**sizes.memory_model, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    found = {"model": {**sizes.memory_model, "model_type": "gpt2"}, "tokens": sizes.memory_tokens}
    for case in MEMORY_CASES:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
            found[case] = fresh_process.submit(memory_case, str(folder), case, sizes.memory_tokens).result()
        say(f"memory {case}: load +{found[case]['load_peak_bytes'] / 2**20:,.0f} MiB, step "
            f"+{found[case]['step_peak_bytes'] / 2**20:,.0f} MiB, weights {found[case]['weights_bytes'] / 2**20:,.0f} MiB")
    return found


# --- GPU ---


def gpu_run(work: Path, data_file: str, tokenizer_dir: Path, sizes: Sizes, folder: Path, peak: float,
            *overrides: str) -> dict:
    """One configs/xl_qlora.json training run on the saved model (with `overrides`): tokens/s, MFU and the peak
    GPU memory of loading and training; the model is freed afterwards."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = config_trainer(work, "gpu", data_file, tokenizer_dir, sizes, "--model_name_or_path", str(folder),
                             "--gradient_accumulation_steps", "1", *overrides,
                             config=REPO / "configs" / "xl_qlora.json")
    run = mfu_run(trainer, sizes, peak)
    found = {"overrides": list(overrides), "parameters": trainer.model.num_parameters(),
             "block_size": trainer.story_args.block_size, "batch_size": trainer.args.per_device_train_batch_size,
             "activation_checkpointing": trainer.args.activation_checkpointing,
             "load_in_4bit": trainer.story_args.load_in_4bit,
             "peak_memory_bytes": torch.cuda.max_memory_allocated(), **run}
    del trainer
    gc.collect()
    return found


def measure_gpu(work: Path, data_file: str, tokenizer_dir: Path, tokenizer, sizes: Sizes, peak: float | None) -> dict:
    """configs/xl_qlora.json (GPT-2 XL, 4-bit nf4 QLoRA, bf16, block 512, activation checkpointing) on a GPT-2
    XL shape with random weights, saved in bf16, through tsg's Trainer, one batch a step; then one lever at a
    time against it (no activation checkpointing, twice the batch, bf16 LoRA without 4-bit weights)."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    folder = work / "gpu-model"
    config = GPT2Config(**sizes.gpu_model, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda"):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gc.collect()
    found = {"gpu": torch.cuda.get_device_name(0), "config": "configs/xl_qlora.json",
             "model": {**sizes.gpu_model, "model_type": "gpt2"}, "levers": {}}
    found["as_configured"] = run = gpu_run(work, data_file, tokenizer_dir, sizes, folder, peak)
    say(f"gpu {found['gpu']} xl_qlora.json: {run['tokens_per_s']:,.0f} tokens/s, MFU {run['mfu']:.1%}, peak memory "
        f"{run['peak_memory_bytes'] / 2**30:.1f} GiB")
    levers = {"activation_checkpointing false": ["--activation_checkpointing", "false"],
              f"batch {2 * run['batch_size']}": ["--per_device_train_batch_size", str(2 * run["batch_size"])],
              "bf16 LoRA (no 4-bit)": ["--load_in_4bit", "false"]}
    for name, overrides in levers.items():
        found["levers"][name] = lever = gpu_run(work, data_file, tokenizer_dir, sizes, folder, peak, *overrides)
        say(f"gpu lever {name}: {lever['tokens_per_s']:,.0f} tokens/s, MFU {lever['mfu']:.1%}, peak memory "
            f"{lever['peak_memory_bytes'] / 2**30:.1f} GiB")
    return found


# --- the report ---


def ratios_of(results: dict) -> dict:
    """The ratios the issue names, from whichever sections ran (None for a section that did not)."""
    ratios = dict.fromkeys(TARGETS)
    packing = results.get("packing")
    if packing:
        isolated = packing["isolated"]["real_tokens_per_s"]
        for other in ("concat", "pad_block", "pad_longest"):
            ratios[f"isolated_vs_{other}"] = isolated / packing[other]["real_tokens_per_s"]
        ratios["isolated_pad_share"] = packing["isolated"]["pad_share"]
    if results.get("trainer"):
        trainer = results["trainer"]
        ratios["trainer_vs_plain_loop"] = trainer["trainer"]["tokens_per_s"] / trainer["plain_loop"]["tokens_per_s"]
    if results.get("mfu"):
        ratios["mfu"] = results["mfu"]["as_configured"]["mfu"]
    if results.get("pipeline"):
        pipeline = results["pipeline"]
        ratios["cached_vs_cold_pipeline"] = pipeline["cached_num_proc_1"]["seconds"] / pipeline["cold_num_proc_1"]["seconds"]
        scale = [case for case in pipeline.get("scale", {}).values() if isinstance(case, dict)]
        if len(scale) >= 2:  # the largest file against the smallest
            small, large = scale[0], scale[-1]
            ratios["pipeline_scale_seconds_per_mb"] = small["megabytes_per_s"] / large["megabytes_per_s"]
            ratios["pipeline_scale_memory"] = large["peak_own_memory_bytes"] / small["peak_own_memory_bytes"]
            ratios["pipeline_scale_cores"] = large["cores_used"]
    gen = results.get("generation")
    if gen:
        ratios["batched32_vs_single_generation"] = (gen["weights"]["none"]["batched32"]["tokens_per_s"]
                                                    / gen["one_by_one32"]["tokens_per_s"])
        for key, section in (("single_vs_hf_generate", "single_stream_stories15m"),
                             ("single_vs_hf_generate_tiny_cpu", "single_stream_tiny_cpu")):
            ratios[key] = gen[section]["tsg"]["tokens_per_s"] / gen[section]["hf_generate"]["tokens_per_s"]
        for key, section in (("llama_cpp_vs_tsg_single", "single_stream_stories15m"),
                             ("llama_cpp_vs_tsg_single_tiny_cpu", "single_stream_tiny_cpu")):
            if "llama_cpp" in gen[section]:
                ratios[key] = gen[section]["llama_cpp"]["tokens_per_s"] / gen[section]["tsg"]["tokens_per_s"]
    if results.get("memory"):
        ratios["weights_4bit_vs_fp32"] = results["memory"]["4bit"]["weights_bytes"] / results["memory"]["full"]["weights_bytes"]
    return ratios


def target_met(name: str, value: float | None) -> bool | None:
    if value is None or TARGETS[name] is None:
        return None
    op, bound = TARGETS[name]
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


def table(results: dict) -> str:
    hw = results["hardware"]
    lines = [f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads, GPU: "
             f"{hw['gpu'] or 'none'}; fp32 matmul peak {hw['matmul_peak_fp32_flops'] / 1e9:.1f} GFLOP/s",
             "", f"| {'ratio':<32} | {'measured':>9} | {'target':>8} | met |", f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|-----|"]
    for name, value in results["ratios"].items():
        target = " ".join(map(str, TARGETS[name])) if TARGETS[name] else "-"
        met = results["targets_met"][name]
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"| {name:<32} | {shown:>9} | {target:>8} | {'-' if met is None else 'yes' if met else 'NO':<3} |")
    gen = results.get("generation")
    if gen:
        lines.append("")
        for section in ("single_stream_stories15m", "single_stream_tiny_cpu"):
            llama_cpp = gen[section].get("llama_cpp")
            lines.append(f"{section}: tsg {gen[section]['tsg']['tokens_per_s']:.0f} tokens/s, plain generate() "
                         f"{gen[section]['hf_generate']['tokens_per_s']:.0f} tokens/s, llama.cpp "
                         + (f"{llama_cpp['tokens_per_s']:.0f} tokens/s" if llama_cpp else
                            f"skipped ({gen[section].get('llama_cpp_skipped')})"))
    scale = (results.get("pipeline") or {}).get("scale", {})
    for name, case in scale.items():
        lines.append(f"pipeline at scale: skipped ({case})" if name == "skipped" else scale_line(case))
    if results.get("mfu"):
        mfu = results["mfu"]
        lines.append(f"mfu tiny_cpu.json as configured: {mfu['as_configured']['tokens_per_s']:,.0f} tokens/s, "
                     f"MFU {mfu['as_configured']['mfu']:.1%}")
        lines += [f"  lever {name}: {run['tokens_per_s']:,.0f} tokens/s, MFU {run['mfu']:.1%}"
                  for name, run in mfu["levers"].items()]
    gpu = results.get("gpu")
    if gpu and "skipped" not in gpu:
        lines.append(f"gpu {gpu['gpu']}, configs/xl_qlora.json on a GPT-2 XL shape: "
                     f"{gpu['as_configured']['tokens_per_s']:,.0f} tokens/s, MFU {gpu['as_configured']['mfu']:.1%} of "
                     f"{hw['matmul_peak_bf16_gpu_flops'] / 1e12:.0f} TFLOP/s bf16, peak memory "
                     f"{gpu['as_configured']['peak_memory_bytes'] / 2**30:.1f} GiB")
        lines += [f"  lever {name}: {run['tokens_per_s']:,.0f} tokens/s, MFU {run['mfu']:.1%}, peak memory "
                  f"{run['peak_memory_bytes'] / 2**30:.1f} GiB" for name, run in gpu["levers"].items()]
    return "\n".join(lines)


def run_bench(data_file: str, sizes: Sizes, only: str | None, work: Path,
              scale_megabytes: tuple | None = None) -> dict:
    started = time.perf_counter()
    datasets.config.HF_DATASETS_CACHE = work / "datasets"  # a private cache: cold runs stay cold, nothing left behind
    results: dict = {"tsg_version": __version__, "mode": "tiny" if sizes is TINY else "full",
                     "sizes": asdict(sizes), "flops_counting": FLOPS_COUNTING}
    results["hardware"] = measure_hardware(sizes)
    peak = results["hardware"]["matmul_peak_fp32_flops"]
    run = (lambda name: only in (None, name))
    with quiet():
        stories, _ = data.load_stories(StoryArguments(model_type="gpt2", train_file=data_file,
                                                      validation_split_percentage=0,
                                                      max_train_samples=sizes.max_stories), seed=0)
    args, _ = parse_args([str(TINY_CPU)])
    tokenizer = models.train_tokenizer((b["text"] for b in stories["train"].iter(batch_size=1000)), args.vocab_size)
    tokenizer_dir = work / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    results["data"] = {"file": data_file, "stories": len(stories["train"]),
                       "megabytes": data.count_bytes(stories["train"]) / 1e6, "tokenizer_vocab": len(tokenizer)}
    say(f"data: {len(stories['train']):,} stories ({results['data']['megabytes']:.2f} MB) from {data_file}; "
        f"tokenizer of {len(tokenizer):,} tokens")
    if run("packing"):
        results["packing"] = measure_packing(work, data_file, tokenizer_dir, sizes)
    if run("trainer"):
        results["trainer"] = measure_trainer(work, data_file, tokenizer_dir, sizes)
    if run("mfu"):
        results["mfu"] = measure_mfu(work, data_file, tokenizer_dir, sizes, peak)
    if run("pipeline"):
        results["pipeline"] = measure_pipeline(stories, tokenizer, args.block_size)
        if scale_megabytes:
            results["pipeline"]["scale"] = measure_pipeline_scale(work, data_file, tokenizer_dir, args.block_size,
                                                                  scale_megabytes)
    if run("generation"):
        results["generation"] = measure_generation(work, tokenizer, tokenizer_dir, sizes)
    if run("memory"):
        results["memory"] = measure_memory(work, tokenizer, sizes)
    if run("gpu"):
        results["gpu"] = measure_gpu(work, data_file, tokenizer_dir, tokenizer, sizes,
                                     results["hardware"].get("matmul_peak_bf16_gpu_flops"))
        if "skipped" in results["gpu"]:
            say(f"gpu: skipped ({results['gpu']['skipped']})")
    results["ratios"] = ratios_of(results)
    results["targets"] = {name: (" ".join(map(str, t)) if t else None) for name, t in TARGETS.items()}
    results["targets_met"] = {name: target_met(name, value) for name, value in results["ratios"].items()}
    results["seconds"] = time.perf_counter() - started
    return results


@dataclass
class BenchArguments:
    data: str = option(str(data.SAMPLE_FILE), "Story file (default: the embedded sample).")
    output: str = option("bench-results.json", "JSON file of the results.")
    tiny: bool = option(False, "Tiny sizes: every section in seconds (for the tests).")
    only: Optional[Literal[SECTIONS]] = option(None, "Run one section (the hardware section always runs).")
    scale_megabytes: Optional[list[float]] = option(None, "The pipeline section's repeated-data files, in MB "
                                                    "(default: 100 500 2000, or 1 3 with --tiny; 0 for none).")

    def __post_init__(self):
        existing_file(self.data, "data")


BENCH = Command(name="bench", types=(BenchArguments,), description=__doc__)


def bench(options: BenchArguments) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # and in spawned processes
        os.environ[name] = "1"
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    sizes = TINY if options.tiny else FULL
    with tempfile.TemporaryDirectory(prefix="tsg-bench-") as work:
        scale = sizes.scale_megabytes if options.scale_megabytes is None else \
            tuple(size for size in options.scale_megabytes if size > 0)
        results = run_bench(options.data, sizes, options.only, Path(work), scale)
    try:
        write_text(options.output, json.dumps(results, indent=2, default=str) + "\n")
    except OSError as e:
        raise UserError(f"output {options.output}: cannot write ({e.strerror or e})") from None
    print("\n" + table(results) + "\n", flush=True)
    say(f"wrote {options.output} ({results['seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> None:
    run_command(BENCH, bench, argv)


if __name__ == "__main__":
    main()
