"""Options of every tsg command: typed dataclasses, filled from a config file and the command line.

    tsg train configs/tiny_cpu.json --learning_rate 1e-3 --max_steps 20
    tsg generate -c generate.toml --temperature 0.7 -q "Once upon a time"

A command's options are the fields of its dataclasses (for `tsg train`, `StoryArguments` below beside
`transformers.TrainingArguments`), parsed by one `HfArgumentParser`. The config file, given first or with
`-c`/`--config`, is a JSON, YAML or TOML object of those fields; a key that starts with `//` is a comment. The
command line overrides the file, the file the defaults. An unknown key (with a "did you mean"), a value of the wrong
type or an impossible combination stops the command before any work with a `UserError` that names the file or the
command line and the key.

The seed project tsg grew from has config files of its own (`dataprep.toml`, `model_finetune.toml`,
`model_inference.toml`): a command reads each of their keys as the tsg field it means (`Command.seed_keys`) and says
so once, e.g. `seed key 'lora_peft' read as use_peft`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import yaml
from transformers import HfArgumentParser, TrainingArguments

from tsg.files import UserError, check_weights, read_text, write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

COMMENT_PREFIX = "//"
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".toml")
DEFAULT_DATASET = "roneneldan/TinyStories"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

logger = logging.getLogger("tsg")


class RunError(RuntimeError):
    """A run that failed after its inputs were checked (a NaN loss): one line, exit code 1."""


def option(default, help: str, **metadata):
    """A command option as a dataclass field: its default and one line of help, both shown by `tsg <cmd> --help`
    (more metadata: HfArgumentParser's `aliases`, e.g. `aliases=["-n"]`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


# --- the seed project's keys ---

# Every key of the seed project's three config files: one given to a command that has no use for it is an error
# that says where it belongs.
SEED_FILES = {
    "dataprep.toml": ("ndata", "train_fraction", "split_random_seed", "input_name", "starter", "ender", "outname"),
    "model_finetune.toml": ("input_file", "lora_peft", "model_folder", "save_per_epoch", "max_seq_len", "model_name",
                            "device"),
    "model_inference.toml": ("output_file", "lora_peft", "model_folder", "model_name", "quantized", "device",
                             "starter", "ender", "max_new_tokens", "temperature", "top_k", "top_p",
                             "repetition_penalty", "length_penalty", "bad_words"),
}


@dataclass(frozen=True)
class SeedKey:
    """A key of the seed project's config files, read as the tsg field it means. `value` turns the seed's value into
    tsg's (None: the same value; a returned None drops the key, keeping tsg's default)."""

    field: str
    value: Optional[Callable[[Any], Any]] = None


def seed_bool(key: str, if_true, if_false) -> Callable[[Any], Any]:
    """A SeedKey value map for a seed key that holds true or false."""

    def convert(value):
        if not isinstance(value, bool):
            raise UserError(f"seed key {key} = {value!r}: expected true or false")
        return if_true if value else if_false

    return convert


def seed_device_to_use_cpu(value):
    """model_finetune.toml's `device`: cpu forces the CPU; cuda, gpu or auto let the Trainer take a GPU."""
    if isinstance(value, str) and re.fullmatch(r"cpu|auto|gpu|mps|cuda(:\d+)?", value.lower()):
        return value.lower() == "cpu"
    raise UserError(f"seed key device = {value!r}: expected cpu, cuda, cuda:N, gpu, mps or auto")


# --- commands ---


@dataclass(frozen=True)
class Command:
    """What `parse` needs to know of one tsg command."""

    name: str  # the subcommand: `tsg <name>`
    types: tuple  # the dataclasses of its options, filled in this order
    description: str = ""  # the command's docstring: what it does and examples, shown by --help
    positional: tuple[str, ...] = ()  # fields that the words before the first option fill, in order
    seed_keys: Mapping[str, SeedKey] = field(default_factory=dict)
    sections: tuple[str, ...] = ()  # tables whose keys count as top-level keys (the seed's [hyper-parameters])
    flags: Mapping[str, tuple[str, Any, str]] = field(default_factory=dict)  # "--greedy": (field, value, help)
    defaults: Optional[Callable[[Optional[str]], list[str]]] = None  # config path -> words before the file's
    adjust: Optional[Callable[[argparse.Namespace], list[str]]] = None  # parsed values -> words that override them
    check: Optional[Callable[..., None]] = None  # the parsed dataclasses -> a UserError for a bad value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default, and the description's lines as written."""


class _ArgumentError(UserError):
    """A value the parser could not read (wrong type, bad choice)."""


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are exceptions, not a usage screen and an exit."""

    def error(self, message):
        match = re.fullmatch(r"argument (?:-\w+, )?--([\w-]+)(?:/\S+)?: (.*)", message, flags=re.S)
        raise _ArgumentError(f"{match.group(1).replace('-', '_')}: {match.group(2)}" if match else message)


def build_parser(command: Command) -> _Parser:
    names = field_names(command)
    usage = " ".join(["tsg", command.name, *(f"[{name.upper()} ...]" if _is_list(names[name]) else name.upper()
                                             for name in command.positional), "[CONFIG]", "[--key value ...]"])
    description = re.sub(r"^`tsg \w+`: (\w)", lambda m: m.group(1).upper(), command.description.strip())
    parser = _Parser(command.types, prog=f"tsg {command.name}", usage=usage, description=description,
                     allow_abbrev=False, formatter_class=_HelpFormatter,
                     epilog="CONFIG: a JSON, YAML or TOML file of these options (keys without dashes; `//` keys are "
                     "comments), given first or with -c/--config; the command line overrides it.")
    parser.add_argument("-c", "--config", metavar="CONFIG", default=argparse.SUPPRESS,
                        help="the config file (JSON, YAML or TOML)")
    for flag, (name, value, help_text) in command.flags.items():
        parser.add_argument(flag, dest=name, action="store_const", const=value, default=argparse.SUPPRESS,
                            help=help_text)
    return parser


def field_names(command: Command) -> dict[str, Any]:
    return {f.name: f for cls in command.types for f in fields(cls) if f.init}


def _unknown_key(key: str, source: str, candidates) -> UserError:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return UserError(f"{source}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))


# --- the config file ---


def load_file(path: str | os.PathLike) -> dict:
    """The object in a JSON, YAML or TOML file, with `//` comment keys left out. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = read_text(path, "config file")
    except UserError as e:
        raise UserError(f"{e} (expected JSON, YAML or TOML)") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text)
            values = {} if values is None else values
        elif suffix == ".toml":
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected one object of keys and values, got {type(values).__name__}")
    return {k: v for k, v in values.items() if not (isinstance(k, str) and k.startswith(COMMENT_PREFIX))}


def file_values(command: Command, path: str) -> dict:
    """The config file's values as the command's fields: sections flattened, seed keys read as the fields they
    mean (each said once), unknown keys an error."""
    known = field_names(command)
    values = {}
    for key, value in load_file(path).items():
        if key in command.sections and isinstance(value, dict):
            items = [(k, v) for k, v in value.items() if not str(k).startswith(COMMENT_PREFIX)]
        else:
            items = [(key, value)]
        for name, item in items:
            name = str(name)  # YAML reads `4:` or `on:` as a number or a boolean
            if name in command.seed_keys and name not in known:
                name, item = _read_seed_key(command.seed_keys[name], name, item, path)
                if item is None:
                    continue
            elif f"--{name}" in command.flags and name not in known:  # `greedy: true` as the flag --greedy
                if not isinstance(item, bool):
                    raise UserError(f"{path}: {name}: expected true or false, got {item!r}")
                if not item:
                    continue
                name, item = command.flags[f"--{name}"][:2]
            if name not in known:
                raise _unknown_seed_key(name, path, command) or _unknown_key(
                    name, path, [*known, *command.seed_keys, *(f[2:] for f in command.flags)])
            values[name] = item
    return values


def _unknown_seed_key(key: str, path: str, command: Command) -> Optional[UserError]:
    files = [name for name, keys in SEED_FILES.items() if key in keys]
    if not files:
        return None
    return UserError(f"{path}: seed key '{key}' (of {' and '.join(files)}) means nothing to tsg {command.name}")


def _read_seed_key(seed: SeedKey, key: str, value, path: str) -> tuple[str, Any]:
    try:
        converted = seed.value(value) if seed.value else value
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    said = f" = {converted!r}" if seed.value and converted is not None and converted != value else ""
    logger.info("note: seed key '%s' read as %s%s", key, seed.field, said)
    return seed.field, converted


def to_words(values: dict, source: str) -> list[str]:
    """Config values as command-line words, so that one parser types and checks both sources."""
    words = []
    for key, value in values.items():
        if value is None:  # null: keep the default
            continue
        if isinstance(value, list):
            if any(isinstance(v, (list, dict)) for v in value):
                raise UserError(f"{source}: {key}: expected a list of plain values, got {value!r}")
            words += [f"--{key}", *map(str, value)] if value else []
        elif isinstance(value, dict):
            words.append(f"--{key}={json.dumps(value)}")
        else:  # one word, so that a value starting with a dash is not read as an option
            words.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return words


# --- the command line ---


def split_command_line(command: Command, argv: list[str]) -> tuple[Optional[str], list[str]]:
    """(the config file, the option words): the file is -c/--config's value or the first word when it names a
    .json/.yaml/.yml/.toml file; the other words before the first option fill `command.positional`."""
    argv, config = list(argv), None
    for i, word in enumerate(argv):
        if word in ("-c", "--config") and i + 1 == len(argv):
            raise UserError(f"command line: {word} needs the name of a config file")
        if word in ("-c", "--config"):
            config = argv[i + 1]
            del argv[i:i + 2]
            break
        if word.startswith("--config="):
            config = word.split("=", 1)[1]
            del argv[i]
            break
    leading = []
    while argv and not argv[0].startswith("-"):
        leading.append(argv.pop(0))
    if leading and config is None and Path(leading[0]).suffix.lower() in CONFIG_SUFFIXES:
        config = leading.pop(0)
    names = list(command.positional)
    if names and _is_list(field_names(command)[names[-1]]):  # the last positional field, a list, takes the rest
        files = [i for i, word in enumerate(leading) if Path(word).suffix.lower() in CONFIG_SUFFIXES]
        names += [names[-1]] * max(0, (files[0] if files else len(leading)) - len(names))
    if len(leading) > len(names):
        extra = leading[len(names)]
        is_file = Path(extra).suffix.lower() in CONFIG_SUFFIXES
        if is_file and not config:
            raise UserError(f"command line: the config file '{extra}' comes first, before {leading[0]!r}")
        what = "a second config file" if is_file else "an unexpected word"
        hint = f" (options take two dashes: --{extra})" if extra in field_names(command) else ""
        raise UserError(f"command line: {what} '{extra}'{hint}")
    positional = []
    for name in dict.fromkeys(names):
        values = [value for field_name, value in zip(names, leading) if field_name == name]
        positional += [f"--{name}", *values] if values else []
    return config, positional + argv


def _is_list(f) -> bool:
    """Whether a field's type (a string under `from __future__ import annotations`) is a list, or a list or None."""
    spelled = str(f.type).replace("typing.", "").replace("Optional[", "")
    return any(part.strip().startswith(("list", "List")) for part in spelled.split("|"))


def check_option_words(command: Command, words: list[str]) -> None:
    """Every option word names a field (or its `no_` form, an alias or a flag); values are not checked here."""
    known = field_names(command)
    names = set(known) | {f"no_{n}" for n, f in known.items() if f.type in (bool, "bool")} | {"help"}
    aliases = {a for f in known.values() for a in f.metadata.get("aliases", [])} | {"-h"}
    for word in words:
        if " " in word:  # a value (argparse reads a word with a space as one, dash or not: "- Mom, can I?")
            continue
        if word.startswith("--"):
            key = word[2:].split("=", 1)[0].replace("-", "_")
            if key not in names and word.split("=", 1)[0] not in command.flags:
                raise _unknown_key(key, "command line", known)
        elif word.startswith("-") and word not in aliases and not _is_number(word) and word != "-":
            raise UserError(f"command line: options take two dashes and a key, got '{word}'")


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def parse(command: Command, argv: list[str]) -> tuple:
    """The command's dataclasses from `[CONFIG] [POSITIONAL ...] [--key value ...]` (see the module doc)."""
    config, cli = split_command_line(command, argv)
    values = file_values(command, config) if config else {}
    file_words = to_words(values, config) if config else []
    check_option_words(command, cli)
    parser = build_parser(command)
    try:  # the file on its own first, so that its errors name the file
        parser.parse_known_args(file_words)
    except UserError as e:
        raise UserError(f"{config}: {e}") from None
    words = (command.defaults(config) if command.defaults else []) + file_words + cli
    try:
        if command.adjust:
            words += command.adjust(parser.parse_known_args(words)[0])
        options = parser.parse_args_into_dataclasses(args=words)
        if command.check:
            command.check(*options)
        return options
    except _ArgumentError as e:  # the file's words parsed on their own: this one is the command line's
        raise UserError(f"command line: {e}") from None
    except ValueError as e:  # a dataclass's own check (TrainingArguments.__post_init__) refuses a value
        message = " ".join(str(e).split())
        raise UserError(_blamed(command, message, cli, config) + message) from None


def _blamed(command: Command, message: str, cli: list[str], config: Optional[str]) -> str:
    """Where the value a check refused came from, as the start of its message: the command line when it set the key
    the message opens with, else the config file when there is one (a message about a file names it already)."""
    match = re.match(r"-*(\w+)", message)
    key = match.group(1) if match else None
    names = field_names(command)
    aliases = {alias: name for name, f in names.items() for alias in f.metadata.get("aliases", [])}
    aliases.update({flag: name for flag, (name, *_) in command.flags.items()})
    set_here = {aliases.get(word, word.split("=", 1)[0].lstrip("-").replace("-", "_")) for word in cli
                if word.startswith("-") and " " not in word}
    if key in names and (key in set_here or not config):
        return "command line: "
    return f"{config}: " if config else ""


# --- running a command ---


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to sys.stderr as it is at each message, not as it was when the handler was made
    (a caller may redirect it: a test's capture, a wrapping tool)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def log_to_stderr(command_name: str) -> None:
    """tsg's messages (`logging.getLogger("tsg")` and its children) as `tsg <cmd>: ...` lines on stderr, from the
    main process only (RANK 0 or unset) until the run sets its own level."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"tsg {command_name}: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def run(command: Command, function: Callable, argv: Optional[list[str]] = None):
    """Parse `argv` (default: sys.argv[1:]) into the command's options and call `function(*options)`. Bad input is
    one line `tsg <cmd>: error: ...` and exit code 2; a failed run (RunError) one line and exit code 1."""
    log_to_stderr(command.name)
    try:
        return function(*parse(command, sys.argv[1:] if argv is None else list(argv)))
    except (UserError, RunError) as e:
        print(f"tsg {command.name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, UserError) else 1)


# --- tsg train: the run config ---


@dataclass
class StoryArguments:
    """tsg's own fields: which model, which stories, how they are packed. TrainingArguments holds the rest."""

    # --- model: fine-tune a pretrained one, or build one from scratch ---
    model_name_or_path: Optional[str] = option(None, "Hub name or local folder of a causal LM to fine-tune (e.g. "
                                               "gpt2).")
    model_type: Optional[str] = option(None, "Architecture to train from scratch (gpt2, gpt_neo, ...), randomly "
                                       "initialised.")
    num_hidden_layers: Optional[int] = option(None, "From scratch: number of layers.")
    hidden_size: Optional[int] = option(None, "From scratch: model width.")
    num_attention_heads: Optional[int] = option(None, "From scratch: attention heads.")
    max_position_embeddings: Optional[int] = option(None, "From scratch: context length (default: block_size).")
    config_overrides: Union[dict, str, None] = option(None, "From scratch: other model config fields, as a JSON object "
                                                      "(e.g. GPT-Neo attention_types).")
    tokenizer_name: Optional[str] = option(None, "Hub name or folder of a tokenizer. From scratch without it, one is "
                                           "trained on the stories.")
    vocab_size: int = option(4096, "Vocabulary of the byte-level BPE tokenizer trained here.")
    attn_implementation: Optional[str] = option(None, "Attention kernel: sdpa, eager or flash_attention_2 (default: "
                                                "the model's).")
    trust_remote_code: bool = option(False, "Run Python code a model or tokenizer folder names (auto_map in its "
                                     "config); off: such a folder is refused.")

    # --- adapters and quantization (names as in TRL's ModelConfig and transformers' BitsAndBytesConfig) ---
    use_peft: bool = option(False, "Train LoRA adapters instead of every weight.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: Optional[list[str]] = option(None, "Modules that get adapters (default: all linear layers but "
                                                      "the output).")
    load_in_8bit: bool = option(False, "Load the base model in 8 bits (bitsandbytes).")
    load_in_4bit: bool = option(False, "Load the base model in 4 bits: QLoRA.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type.")
    bnb_4bit_use_double_quant: bool = option(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit a "
                                             "weight).")
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "dtype of the 4-bit "
                                                                                         "matmuls (default: bfloat16 "
                                                                                         "on GPU, float32 on CPU).")

    # --- data: where the stories come from ---
    dataset_name: Optional[str] = option(DEFAULT_DATASET, "Hub data set of stories, used when no train_file is given.")
    dataset_config_name: Optional[str] = option(None, "Configuration of the hub data set.")
    train_file: Optional[str] = option(None, "Stories to train on: TinyStories .txt, .csv, .json/.jsonl or .parquet.")
    validation_file: Optional[str] = option(None, "Held-out stories, same formats.")
    validation_split_percentage: float = option(5.0, "Without a validation file or split: percent of the training "
                                                "stories held out (seeded).")
    text_column: str = option("text", "Column that holds the story in CSV/JSON/parquet.")
    max_train_samples: Optional[int] = option(None, "Use at most this many training stories.")
    max_eval_samples: Optional[int] = option(None, "Use at most this many held-out stories.")

    # --- tokenize and pack ---
    block_size: int = option(512, "Tokens per training row (-1: the model's context).")
    packing: Literal["isolated", "concat", "pad"] = option(
        "isolated", "isolated: whole stories packed into blocks, each attending only to itself; concat: plain "
        "concatenation (run_clm); pad: one story per row, padded.")
    preprocessing_num_workers: Optional[int] = option(None, "Processes for tokenizing and packing (default: one per core "
                                                      "for story text over 50 MB, else one).")
    overwrite_cache: bool = option(False, "Tokenize again even if a cached result exists.")

    # --- the run ---
    sample_prompts: Optional[list[str]] = option(None, "Story openings sampled during training (default: a fixed set "
                                                 "of five).")
    sample_steps: int = option(0, "Every this many steps, tell stories from sample_prompts into W&B (0: never).")
    sample_max_new_tokens: int = option(128, "Length budget of those sample stories.")
    overwrite_output_dir: bool = option(False, "Start over in an output_dir that holds checkpoints (they are deleted).")
    max_minutes: Optional[float] = option(None, "Train for this many minutes of wall clock, start-up included, ending "
                                          "on an evaluated, saved model: the learning rate follows "
                                          "warmup_stable_decay, its decay placed from the measured speed (max_steps, "
                                          "if set, caps the steps).")
    decay_share: float = option(0.2, "With max_minutes, or warmup_stable_decay without its num_decay_steps: the "
                                "last share of the steps over which the learning rate decays.")
    use_muon: bool = option(False, "Muon (torch.optim.Muon) on the weight matrices, the optim's AdamW on embeddings, "
                            "the output layer, norms and biases; both at weight_decay, AdamW at learning_rate.")
    muon_learning_rate: Optional[float] = option(None, "With use_muon: Muon's peak learning rate, in AdamW's units "
                                                 "(its updates are scaled to an AdamW update's size; default: "
                                                 "learning_rate); the schedule scales it as it does learning_rate.")

    def __post_init__(self):
        for name in ("model_name_or_path", "model_type", "tokenizer_name", "attn_implementation", "dataset_name",
                     "dataset_config_name", "train_file", "validation_file"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("none", "null", ""):
                setattr(self, name, None)  # so that the command line can unset what a config file set
        if isinstance(self.config_overrides, str):
            try:
                self.config_overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as e:
                raise UserError(f"config_overrides: expected a JSON object, got {self.config_overrides!r} ({e})")
        if self.config_overrides is not None and not isinstance(self.config_overrides, dict):
            raise UserError(f"config_overrides: expected a JSON object, got {self.config_overrides!r}")
        self._check_model()
        self._check_numbers()
        self._check_adapters()
        self._check_data()

    def _check_model(self) -> None:
        architecture = [name for name in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "max_position_embeddings", "config_overrides")
                        if getattr(self, name) is not None]
        if self.model_name_or_path and self.model_type:
            raise UserError("model_name_or_path and model_type are both set: give model_name_or_path to fine-tune "
                            "or model_type to train from scratch")
        if not self.model_name_or_path and not self.model_type:
            raise UserError("neither model_name_or_path (to fine-tune) nor model_type (to train from scratch) is set")
        if self.model_name_or_path and architecture:
            raise UserError(f"{architecture[0]} shapes a model trained from scratch (model_type); "
                            f"it cannot change the pretrained model_name_or_path={self.model_name_or_path!r}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UserError(f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                            f"got {self.attn_implementation!r}")

    def _check_numbers(self) -> None:
        check_ranges(self)
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.block_size:
            raise UserError(f"block_size={self.block_size} is longer than "
                            f"max_position_embeddings={self.max_position_embeddings}")
        if self.from_scratch and self.block_size == -1 and self.max_position_embeddings is None:
            raise UserError("block_size=-1 (the model's context) needs max_position_embeddings for a model trained "
                            "from scratch")

    def _check_adapters(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise UserError("load_in_8bit and load_in_4bit are both set: choose one")
        if self.quantized and not self.use_peft:
            raise UserError(f"{'load_in_4bit' if self.load_in_4bit else 'load_in_8bit'} trains adapters on frozen "
                            "quantized weights: set use_peft true (quantized weights cannot be fine-tuned in full)")
        if self.use_peft and self.from_scratch:
            raise UserError("use_peft trains adapters on a pretrained model: set model_name_or_path, not model_type")
        if self.quantized and self.from_scratch:
            raise UserError("load_in_4bit/load_in_8bit quantize a pretrained model: set model_name_or_path, "
                            "not model_type")

    def _check_data(self) -> None:
        if self.validation_file and not self.train_file:
            raise UserError("validation_file is set but train_file is not: give both, or neither to use dataset_name")
        if not self.train_file and not self.dataset_name:
            raise UserError("no stories: set train_file (a local file) or dataset_name (a hub data set)")

    @property
    def from_scratch(self) -> bool:
        return self.model_type is not None

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


# Every number of the run config a user may set (tsg's fields and TrainingArguments'), with the values that make
# sense: checked before any work, so that a bad one is one line naming it, never a ZeroDivisionError mid-run after
# the output folder was written to. tests/test_config.py holds every int or float field of both to this table.
POSITIVE = ("a positive integer", lambda v: v >= 1)
AT_LEAST_0 = ("a number >= 0", lambda v: v >= 0)
ABOVE_0 = ("a number > 0", lambda v: v > 0)
STEPS = ("a number > 0 (steps, or below 1 a share of the run's steps)", lambda v: v > 0)
SEED = (f"an integer from 0 to {2**32 - 1}", lambda v: 0 <= v < 2**32)
SHARE = ("a number in [0, 1)", lambda v: 0 <= v < 1)
RANGES = {
    # tsg's fields
    "num_hidden_layers": POSITIVE, "hidden_size": POSITIVE, "num_attention_heads": POSITIVE,
    "max_position_embeddings": POSITIVE, "vocab_size": ("an integer >= 257 (the 256 bytes and the end-of-story token)",
                                                        lambda v: v >= 257),
    "max_train_samples": POSITIVE, "max_eval_samples": POSITIVE, "preprocessing_num_workers": POSITIVE,
    "lora_r": POSITIVE, "lora_alpha": ABOVE_0, "lora_dropout": SHARE, "sample_max_new_tokens": POSITIVE,
    "block_size": ("a positive integer, or -1 for the model's context", lambda v: v >= 1 or v == -1),
    "sample_steps": ("0 (never) or a positive number of steps", lambda v: v >= 0),
    "validation_split_percentage": ("a number in [0, 100)", lambda v: 0 <= v < 100),
    "max_minutes": ABOVE_0, "decay_share": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    # TrainingArguments'
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "eval_accumulation_steps": POSITIVE,
    "num_train_epochs": ABOVE_0, "max_steps": ("a positive integer, or -1 for num_train_epochs",
                                               lambda v: v >= 1 or v == -1),
    "learning_rate": ABOVE_0, "muon_learning_rate": ABOVE_0, "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
    "adam_beta1": SHARE, "adam_beta2": SHARE, "adam_epsilon": ABOVE_0, "max_grad_norm": AT_LEAST_0,
    "label_smoothing_factor": SHARE, "neftune_noise_alpha": ABOVE_0, "torch_empty_cache_steps": POSITIVE,
    "logging_steps": STEPS, "eval_steps": STEPS, "save_steps": STEPS, "eval_delay": AT_LEAST_0,
    "save_total_limit": POSITIVE, "seed": SEED, "data_seed": SEED, "dataloader_num_workers": AT_LEAST_0,
    "dataloader_prefetch_factor": POSITIVE, "ddp_bucket_cap_mb": POSITIVE, "ddp_timeout": POSITIVE,
    "local_rank": ("-1 or a process rank", lambda v: v >= -1),
}


def check_ranges(options) -> None:
    """A UserError naming the first field of `options` (a dataclass) whose number is outside RANGES."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            expected, ok = RANGES[f.name]
            if not ok(value):
                raise UserError(f"{f.name}: expected {expected}, got {value}")


def _check_training(story_args: "StoryArguments", training_args: TrainingArguments) -> None:
    check_ranges(training_args)
    if story_args.max_minutes:
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(training_args, name)
            if value is not None and 0 < value < 1:
                raise UserError(f"{name}={value} is a share of the run's steps, which max_minutes plans as the run "
                                "goes: give a number of steps")
    sharded = training_args.fsdp or training_args.deepspeed or any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("FSDP", "DEEPSPEED"))
    if story_args.use_muon and sharded:
        raise UserError("use_muon orthogonalises whole weight matrices: FSDP and DeepSpeed split them across "
                        "processes; use DDP (or AdamW)")
    if story_args.muon_learning_rate is not None and not story_args.use_muon:
        raise UserError(f"muon_learning_rate={story_args.muon_learning_rate} is Muon's rate: set use_muon true, "
                        "or leave muon_learning_rate out")
    if story_args.use_muon and not training_args.optim.value.startswith("adamw"):
        raise UserError(f"use_muon keeps embeddings, norms and biases on AdamW: optim must be an adamw_* optimizer, "
                        f"got {training_args.optim.value}")
    output = Path(training_args.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"output_dir {output}: is a file, not a folder")
    if story_args.model_name_or_path and Path(story_args.model_name_or_path).is_dir():
        check_weights(story_args.model_name_or_path)  # a model cut short fails here, not as a traceback mid-load


def _train_defaults(config: Optional[str]) -> list[str]:
    """TrainingArguments defaults that tsg changes (the file or the command line still override them): every
    parameter of a causal LM is used, so DDP needs no search for unused ones; count the tokens seen; and the
    output folder runs/<config name>."""
    name = Path(config).stem if config else "tsg"
    return ["--ddp_find_unused_parameters", "false", "--include_num_input_tokens_seen", "true",
            "--output_dir", str(Path("runs") / name)]


def _fp32_on_cpu(namespace: argparse.Namespace) -> list[str]:
    """bf16/fp16 asked for on a run that lands on the CPU: fp32 instead, with a note."""
    import torch

    half = [name for name in ("bf16", "fp16") if getattr(namespace, name)]
    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if half and (namespace.use_cpu or not accelerator):
        logger.info("note: %s asked for, but this run is on the CPU: it trains in fp32 (half-precision matmuls are "
                    "far slower than fp32 on CPUs)", " and ".join(half))
        return ["--bf16", "false", "--fp16", "false"]
    return []


TRAIN = Command(
    name="train",
    types=(StoryArguments, TrainingArguments),
    description="Train a causal LM on stories, or fine-tune one, with the Hugging Face Trainer under Accelerate.\n\n"
                "    tsg train configs/tiny_cpu.json --max_steps 20          # the command line overrides the file\n"
                "    accelerate launch tsg/train.py configs/tiny_cpu.json    # the same under any launcher\n"
                "    tsg train -c model_finetune.toml                        # a seed project config",
    seed_keys={
        "input_file": SeedKey("train_file"),
        "lora_peft": SeedKey("use_peft"),
        "model_folder": SeedKey("output_dir"),
        "model_name": SeedKey("model_name_or_path"),
        "max_seq_len": SeedKey("block_size"),
        "save_per_epoch": SeedKey("save_strategy", seed_bool("save_per_epoch", "epoch", None)),
        "device": SeedKey("use_cpu", seed_device_to_use_cpu),
    },
    defaults=_train_defaults,
    adjust=_fp32_on_cpu,
    check=_check_training,
)


def parse_args(argv: list[str]) -> tuple[StoryArguments, TrainingArguments]:
    """`tsg train`'s options: `[CONFIG_FILE] [--key value ...]`, the file setting values, the command line
    overriding them."""
    return parse(TRAIN, argv)


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


RESUME_RECORD = re.compile(r"run_config\.resume-(\d+)\.json")


def write_run_config(story_args: StoryArguments, training_args: TrainingArguments,
                     resumed_from: str | None = None) -> Path:
    """The run's record in output_dir: the resolved config, the tsg version, git commit and library versions, and
    `resumed_from` (the checkpoint folder it resumed from, or None); returns its path.

    The first run in output_dir writes `run_config.json`. A resumed run never replaces it: its own record goes
    beside it as `run_config.resume-N.json`, N = 1, 2, ... in the order of the resumes, so the folder keeps how the
    run began and every change made on resuming (a resume into an output_dir with no `run_config.json` writes
    that). Tokens (`hub_token`, ...) are recorded as `<HUB_TOKEN>`, never their values."""
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    from tsg import __version__

    record = {
        "tsg_version": __version__,
        "git_commit": _git_commit(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate, datasets)},
        "resumed_from": resumed_from,
        "config": {**asdict(story_args), **training_args.to_dict()},
    }
    output = Path(training_args.output_dir)
    path = output / "run_config.json"
    if resumed_from is not None and path.is_file():
        done = [int(m.group(1)) for p in output.glob("run_config.resume-*.json") if (m := RESUME_RECORD.fullmatch(p.name))]
        path = output / f"run_config.resume-{max(done, default=0) + 1}.json"
    return write_text(path, json.dumps(record, indent=2, default=str) + "\n")
