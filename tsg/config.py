"""The run config: tsg's own fields beside `transformers.TrainingArguments`, read from one flat JSON or
YAML file and overridden from the command line.

    python -m tsg.train configs/tiny_cpu.json --learning_rate 1e-3 --max_steps 20

Keys are the Hugging Face names (`model_name_or_path`, `block_size`, `learning_rate`, ...). A key that
starts with `//` is a comment. An unknown key, a value of the wrong type or an impossible combination
stops the run before any work with a `ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from transformers import HfArgumentParser, TrainingArguments

COMMENT_PREFIX = "//"
DEFAULT_DATASET = "roneneldan/TinyStories"
# TrainingArguments defaults that tsg changes (a config or the command line still overrides them): every
# parameter of a causal LM is used, so DDP needs no search for unused ones; count the tokens seen.
TSG_DEFAULTS = ["--ddp_find_unused_parameters", "false", "--include_num_input_tokens_seen", "true"]
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ConfigError(ValueError):
    """A bad config: the message is one line that names the file or key and what is expected."""


@dataclass
class StoryArguments:
    """tsg's own fields: which model, which stories, how they are packed. TrainingArguments holds the rest."""

    # --- model: fine-tune a pretrained one, or build one from scratch ---
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub name or local folder of a causal LM to fine-tune (e.g. gpt2)."}
    )
    model_type: Optional[str] = field(
        default=None, metadata={"help": "Architecture to train from scratch (gpt2, gpt_neo, ...), randomly initialised."}
    )
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "From scratch: number of layers."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "From scratch: model width."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "From scratch: attention heads."})
    max_position_embeddings: Optional[int] = field(
        default=None, metadata={"help": "From scratch: context length (default: block_size)."}
    )
    config_overrides: Union[dict, str, None] = field(
        default=None,
        metadata={"help": "From scratch: other model config fields, as a JSON object (e.g. GPT-Neo attention_types)."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub name or folder of a tokenizer. From scratch without it, one is trained on the stories."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the byte-level BPE tokenizer trained here."})
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager or flash_attention_2 (default: the model's)."}
    )

    # --- adapters and quantization (names as in TRL's ModelConfig and transformers' BitsAndBytesConfig) ---
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules that get adapters (default: all linear layers but the output)."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits: QLoRA."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (saves ~0.4 bit a weight)."}
    )
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = field(
        default=None, metadata={"help": "dtype of the 4-bit matmuls (default: bfloat16 on GPU, float32 on CPU)."}
    )

    # --- data: where the stories come from ---
    dataset_name: Optional[str] = field(
        default=DEFAULT_DATASET, metadata={"help": "Hub data set of stories, used when no train_file is given."}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of the hub data set."})
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Stories to train on: TinyStories .txt, .csv, .json/.jsonl or .parquet."}
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "Held-out stories, same formats."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Without a validation file or split: percent of the training stories held out (seeded)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column that holds the story in CSV/JSON/parquet."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training stories."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many held-out stories."})

    # --- tokenize and pack ---
    block_size: int = field(default=512, metadata={"help": "Tokens per training row."})
    packing: Literal["isolated", "concat", "pad"] = field(
        default="isolated",
        metadata={
            "help": "isolated: whole stories packed into blocks, each attending only to itself; "
            "concat: plain concatenation (run_clm); pad: one story per row, padded."
        },
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenizing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again even if a cached result exists."})

    # --- the run ---
    sample_prompts: Optional[list[str]] = field(
        default=None, metadata={"help": "Story openings sampled during training (default: a fixed set of five)."}
    )
    sample_steps: int = field(
        default=0, metadata={"help": "Every this many steps, tell stories from sample_prompts into W&B (0: never)."}
    )
    sample_max_new_tokens: int = field(default=128, metadata={"help": "Length budget of those sample stories."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that holds checkpoints (they are deleted)."}
    )

    def __post_init__(self):
        for name in ("model_name_or_path", "model_type", "tokenizer_name", "attn_implementation", "dataset_name",
                     "dataset_config_name", "train_file", "validation_file"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("none", "null", ""):
                setattr(self, name, None)  # so that the command line can unset what a config file set
        if isinstance(self.config_overrides, str):
            try:
                self.config_overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config_overrides: expected a JSON object, got {self.config_overrides!r} ({e})")
        if self.config_overrides is not None and not isinstance(self.config_overrides, dict):
            raise ConfigError(f"config_overrides: expected a JSON object, got {self.config_overrides!r}")
        architecture = [
            name
            for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                         "config_overrides")
            if getattr(self, name) is not None
        ]
        if self.model_name_or_path and self.model_type:
            raise ConfigError(
                "model_name_or_path and model_type are both set: give model_name_or_path to fine-tune "
                "or model_type to train from scratch"
            )
        if not self.model_name_or_path and not self.model_type:
            raise ConfigError("neither model_name_or_path (to fine-tune) nor model_type (to train from scratch) is set")
        if self.model_name_or_path and architecture:
            raise ConfigError(
                f"{architecture[0]} shapes a model trained from scratch (model_type); "
                f"it cannot change the pretrained model_name_or_path={self.model_name_or_path!r}"
            )
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                     "block_size", "vocab_size", "max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.block_size:
            raise ConfigError(
                f"block_size={self.block_size} is longer than max_position_embeddings={self.max_position_embeddings}"
            )
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}"
            )
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("load_in_8bit and load_in_4bit are both set: choose one")
        if self.quantized and not self.use_peft:
            raise ConfigError(
                f"{'load_in_4bit' if self.load_in_4bit else 'load_in_8bit'} trains adapters on frozen quantized "
                "weights: set use_peft true (quantized weights cannot be fine-tuned in full)"
            )
        if self.use_peft and self.from_scratch:
            raise ConfigError("use_peft trains adapters on a pretrained model: set model_name_or_path, not model_type")
        if self.quantized and self.from_scratch:
            raise ConfigError("load_in_4bit/load_in_8bit quantize a pretrained model: set model_name_or_path, not model_type")
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: expected a number in [0, 1), got {self.lora_dropout}")
        if self.sample_steps < 0 or self.sample_max_new_tokens <= 0:
            raise ConfigError("sample_steps must be >= 0 and sample_max_new_tokens > 0")
        if not 0 <= self.validation_split_percentage < 100:
            raise ConfigError(
                f"validation_split_percentage: expected a number in [0, 100), got {self.validation_split_percentage}"
            )
        if self.validation_file and not self.train_file:
            raise ConfigError("validation_file is set but train_file is not: give both, or neither to use dataset_name")
        if not self.train_file and not self.dataset_name:
            raise ConfigError("no stories: set train_file (a local file) or dataset_name (a hub data set)")

    @property
    def from_scratch(self) -> bool:
        return self.model_type is not None

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


class _ArgumentError(ConfigError):
    """A value the parser could not read (wrong type, bad choice)."""


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are exceptions instead of a usage screen and exit."""

    def error(self, message):
        raise _ArgumentError(message)


def _field_names() -> dict[str, type]:
    return {f.name: f for cls in (StoryArguments, TrainingArguments) for f in fields(cls) if f.init}


def _unknown_key(key: str, source: str) -> ConfigError:
    names = list(_field_names())
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a flat JSON or YAML config, without its `//` comment keys. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected one flat object of keys and values, got {type(values).__name__}")
    known = _field_names()
    for key in values:
        if not isinstance(key, str) or (not key.startswith(COMMENT_PREFIX) and key not in known):
            raise _unknown_key(str(key), str(path))
    return {k: v for k, v in values.items() if not k.startswith(COMMENT_PREFIX)}


def _to_argv(values: dict, source: str) -> list[str]:
    """Config values as command-line words, so that one parser types and checks both sources."""
    argv = []
    for key, value in values.items():
        if value is None:  # null: keep the default
            continue
        if isinstance(value, list):
            if not value:
                continue
            if any(isinstance(v, (list, dict)) for v in value):
                raise ConfigError(f"{source}: {key}: expected a list of plain values, got {value!r}")
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _check_cli_keys(argv: list[str]) -> None:
    known = _field_names()
    bools = {f"no_{name}" for name, f in known.items() if f.type in (bool, "bool")}
    for word in argv:
        if word.startswith("--"):
            key = word[2:].split("=", 1)[0].replace("-", "_")
            if key not in known and key not in bools:
                raise _unknown_key(key, "command line")
        elif word.startswith("-") and not _is_number(word) and word != "-":
            raise ConfigError(f"command line: options take two dashes and a config key, got '{word}'")


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _note(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"tsg: note: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> tuple[StoryArguments, TrainingArguments]:
    """`[CONFIG_FILE] [--key value ...]`: the file sets values, the command line overrides them."""
    config_path = argv[0] if argv and not argv[0].startswith("-") else None
    cli = argv[1:] if config_path else list(argv)
    file_values = read_config_file(config_path) if config_path else {}
    _check_cli_keys(cli)
    parser = _Parser((StoryArguments, TrainingArguments))
    source = config_path or "command line"
    file_argv = _to_argv(file_values, source)
    try:  # type-check the file on its own first, so that its errors name the file
        parser.parse_known_args(file_argv)
    except _ArgumentError as e:
        raise ConfigError(f"{source}: {e}") from None
    file_argv = TSG_DEFAULTS + file_argv
    if not any(w.split("=", 1)[0] in ("--output_dir", "--output-dir") for w in file_argv + cli):
        name = Path(config_path).stem if config_path else "tsg"
        file_argv = ["--output_dir", str(Path("runs") / name)] + file_argv
    argv = file_argv + cli
    try:
        namespace, _ = parser.parse_known_args(argv)
    except _ArgumentError as e:
        raise ConfigError(f"command line: {e}") from None
    half = [name for name in ("bf16", "fp16") if getattr(namespace, name)]
    if half and (namespace.use_cpu or not _has_accelerator()):
        _note(f"{' and '.join(half)} asked for, but this run is on the CPU: it trains in fp32 "
              "(half-precision matmuls are far slower than fp32 on CPUs)")
        argv += ["--bf16", "false", "--fp16", "false"]
    try:
        story_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except _ArgumentError as e:
        raise ConfigError(f"command line: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValueError as e:  # TrainingArguments.__post_init__ refuses a combination
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from None
    return story_args, training_args


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_run_config(story_args: StoryArguments, training_args: TrainingArguments) -> Path:
    """`run_config.json` in output_dir: the resolved config, the tsg version, git commit and library versions."""
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    from tsg import __version__

    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "tsg_version": __version__,
        "git_commit": _git_commit(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate, datasets)},
        "config": {**asdict(story_args), **training_args.to_dict()},
    }
    path = output / "run_config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
