"""Shared fixtures: offline environment, a small tokenizer trained once on the embedded sample, tiny models,
helpers that write story files and run `tsg.train.main` in-process.

Everything here runs with no network and no GPU: models are built from configs with random weights and the
tokenizer is trained locally on the embedded TinyStories sample.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before anything imports datasets / transformers / huggingface_hub: no network, no W&B, and a private
# datasets cache, so that cached tokenization from one test (or from a user's earlier runs) never leaks in.
_CACHE = tempfile.mkdtemp(prefix="tsg-tests-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads waiting for
# each other make every step many times slower.
torch.set_num_threads(1)

from tsg import data, model as models  # noqa: E402
from tsg.config import StoryArguments  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_FILE = REPO / "tsg" / "sample" / "tinystories_sample.txt"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
SEP = "<|endoftext|>"
VOCAB = 512


def write_txt(path: Path, stories: list[str]) -> Path:
    """A TinyStories-format .txt file: each story followed by a line that is exactly <|endoftext|>."""
    path.write_text("".join(f"{story}\n{SEP}\n" for story in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sample_stories() -> list[str]:
    """All stories of the embedded sample, in file order."""
    stories = list(data.read_tinystories_txt(str(SAMPLE_FILE)))
    assert len(stories) == 1127
    return stories


@pytest.fixture(scope="session")
def tokenizer(sample_stories):
    """A byte-level BPE tokenizer with a 512-token vocabulary, trained once on the embedded sample."""
    return models.train_tokenizer(sample_stories, VOCAB)


@pytest.fixture(scope="session")
def small_txt(tmp_path_factory, sample_stories) -> Path:
    """The first 120 sample stories as a .txt file of their own (fast to load, tokenize and train on)."""
    return write_txt(tmp_path_factory.mktemp("small") / "stories.txt", sample_stories[:120])


def tiny_args(**overrides) -> StoryArguments:
    """StoryArguments for a tiny from-scratch GPT-2 (2 layers, width 32, 4 heads, 64-token blocks)."""
    values = dict(model_type="gpt2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, block_size=64,
                  train_file="unused.txt", vocab_size=VOCAB)
    values.update(overrides)
    return StoryArguments(**values)


@pytest.fixture
def tiny_model():
    """Builder: a tiny random model via tsg.model.load_model, seeded, in eval mode."""

    def build(tokenizer, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return models.load_model(tiny_args(**overrides), tokenizer).eval()

    return build


def save_random_model(folder: Path, tokenizer, seed: int, context: int = 256, width: int = 64) -> Path:
    """A random 2-layer GPT-2 with the test tokenizer, as save_pretrained leaves it (it rarely ends a story)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=width, n_head=4, n_positions=context, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_evaluated_run(train_file, output_dir) -> Path:
    """A tiny `tsg train` run of 6 steps, evaluated every 3 (what loss.png and tsg play's Runs tab draw)."""
    from tsg import train

    train.main(tiny_cli(train_file, output_dir, max_steps=6, eval_strategy="steps", eval_steps=3,
                        validation_split_percentage=20))
    return Path(output_dir)


def tiny_cli(train_file, output_dir, *extra: str, **values) -> list[str]:
    """Command-line words for `tsg.train.main`: a tiny from-scratch GPT-2 trained for a few steps on the CPU."""
    options = dict(
        model_type="gpt2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
        block_size=64, train_file=str(train_file), output_dir=str(output_dir), max_steps=4,
        per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=3e-3,
        logging_steps=1, save_steps=1000, eval_strategy="no", use_cpu="true", report_to="none",
        dataloader_num_workers=0, disable_tqdm="true", seed=0,
    )
    options.update(values)
    words = []
    for key, value in options.items():
        if value is not None:
            words += [f"--{key}", str(value)]
    return words + list(extra)


def python_env() -> dict[str, str]:
    """Environment for subprocesses: offline, private caches, the repo importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_with_callback(callback: str, arguments: int = 0) -> str:
    """Source of a child process running tsg.train.main with one extra TrainerCallback: `callback` defines the class
    `Callback` (its source may read the names `os`, `signal`, `sys` and `TrainerCallback`, and the first `arguments`
    command-line words, `sys.argv[1:1 + arguments]`); the words after those are tsg train's command line."""
    return f"""
import os, signal, sys
from transformers import TrainerCallback
from tsg import train, trainer as training
{callback}
build = training.build_trainer
def build_with_callback(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(Callback())
    return trainer
training.build_trainer = build_with_callback
train.main(sys.argv[1 + {arguments}:])
"""


def logged_losses(folder: Path) -> dict[int, float]:
    """Step -> training loss, from a run folder's trainer_state.json."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def accelerate_launch_cmd() -> list[str]:
    sibling = Path(sys.executable).with_name("accelerate")
    if sibling.is_file():
        return [str(sibling), "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch"]


def run_tsg(argv, capsys) -> tuple[int, str, str]:
    """`tsg ARGV` in-process -> (exit code, stdout, stderr)."""
    from tsg import cli

    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(stderr: str, command: str) -> str:
    """The one error line a command printed, `tsg <command>: error: ...`, checked to be the last line of stderr,
    the only error line, and with no traceback before it (progress lines may precede it)."""
    lines = stderr.strip().splitlines()
    prefix = f"tsg {command}: error: "
    assert lines and lines[-1].startswith(prefix), stderr[-2000:]
    assert sum(line.startswith(prefix) for line in lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]
