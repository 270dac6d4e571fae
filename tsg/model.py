"""The tokenizer and the model: a pretrained causal LM to fine-tune (in full, with LoRA adapters, or
with adapters on 8-bit / 4-bit quantized weights: QLoRA), or a new one built from the config.

From scratch, as the TinyStories paper did: `model_type` (gpt2, gpt_neo, ...) with the shape given in
the config, randomly initialised, and a byte-level BPE tokenizer trained on the training stories
unless `tokenizer_name` names one.

QLoRA follows the known-good recipe: `BitsAndBytesConfig`, each process loading its copy on its own
device, `prepare_model_for_kbit_training` (input gradients on, non-reentrant checkpointing), then
`get_peft_model`. Adapters record their base model as an absolute path when it is a local folder, so
that `tsg.adapter` finds it from anywhere.

No Python code from a model folder runs unless `trust_remote_code` is on: a folder whose config names code of its
own (`auto_map`) is refused (check_remote_code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tsg.config import StoryArguments
from tsg.data import END_OF_STORY
from tsg.files import UserError, one_line

STORY_ATTENTION = "sdpa_by_story"  # the attention of `isolated` training on a CPU: see story_attention
REMOTE_CODE_OPTION = "--trust_remote_code true"
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_remote_code(name: str | None, allowed: bool, option: str | None = REMOTE_CODE_OPTION) -> None:
    """Refuse a local model folder that asks to run Python code of its own (an `auto_map` in its config.json or
    tokenizer_config.json) unless `allowed`: transformers would run that code, or, for a model type it knows, load its
    own class instead without a word. `option` is what turns it on (None: the command has none)."""
    if allowed or not name:
        return
    folder = Path(name).expanduser()
    for file in REMOTE_CODE_FILES:
        try:
            config = json.loads((folder / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no such file (a hub name), or one transformers will report
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            raise UserError(_remote_code_message(str(folder / file), option))


def refused_remote_code(error: Exception, name: str, option: str | None = REMOTE_CODE_OPTION) -> None:
    """transformers' refusal of a hub model's own code (trust_remote_code off) as tsg's one-line error."""
    if "trust_remote_code" in str(error):
        raise UserError(_remote_code_message(name, option)) from None


def _remote_code_message(where: str, option: str | None) -> str:
    return (f"{where}: the model asks to run Python code of its own (auto_map); "
            + (f"tsg runs a model folder's code only with {option}" if option else
               "this command never runs a model folder's code"))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, with `<|endoftext|>` as BOS/EOS/pad."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_STORY],
                            show_progress=sys.stderr.isatty())
    trained = json.loads(bpe._tokenizer.to_str())["model"]
    return GPT2TokenizerFast(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=END_OF_STORY,
        bos_token=END_OF_STORY,
        eos_token=END_OF_STORY,
        pad_token=END_OF_STORY,
    )


def load_tokenizer(args: StoryArguments) -> PreTrainedTokenizerBase:
    """The named tokenizer (tokenizer_name, else the model's own), with a pad token (EOS when it has none)."""
    name = args.tokenizer_name or args.model_name_or_path
    check_remote_code(name, args.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        refused_remote_code(e, name)
        key = "tokenizer_name" if args.tokenizer_name else "model_name_or_path"
        raise UserError(f"{key}={name!r}: no tokenizer could be loaded ({one_line(e, 200)})") from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_config(args: StoryArguments, tokenizer: PreTrainedTokenizerBase):
    """The model config for a from-scratch run: model_type with the config's shape and the tokenizer's ids."""
    if args.model_type not in CONFIG_MAPPING:
        raise UserError(
            f"model_type={args.model_type!r} is not a transformers architecture (e.g. gpt2, gpt_neo, llama)"
        )
    shape = {
        "num_hidden_layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "max_position_embeddings": args.max_position_embeddings or args.block_size,
    }
    overrides = dict(args.config_overrides or {})
    defaults = CONFIG_MAPPING[args.model_type]()
    if hasattr(defaults, "attention_types") and args.num_hidden_layers and "attention_types" not in overrides:
        # GPT-Neo: alternate global and local attention over the layers asked for, as the TinyStories models do
        n = args.num_hidden_layers
        overrides["attention_types"] = [[["global", "local"], n // 2]] if n % 2 == 0 else [[["global"], n]]
    for key in overrides:
        if not hasattr(defaults, key):
            raise UserError(f"config_overrides: {args.model_type} has no config field {key!r}")
    try:
        config = AutoConfig.for_model(
            args.model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **{key: value for key, value in shape.items() if value is not None},
            **overrides,
        )
    except Exception as e:  # transformers' config validation raises several error types
        raise UserError(f"model_type={args.model_type!r}: {one_line(e)}") from None
    return config


QUANTIZATION_FIELDS = ("load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                       "bnb_4bit_compute_dtype")


def quantization_config(on_cpu: bool, load_in_8bit: bool = False, load_in_4bit: bool = False,
                        bnb_4bit_quant_type: str = "nf4", bnb_4bit_use_double_quant: bool = True,
                        bnb_4bit_compute_dtype: str | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for 8-bit or 4-bit weights (StoryArguments' field names); None for full precision.
    The 4-bit matmuls run in bfloat16 on a GPU and float32 on a CPU unless told otherwise."""
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_in_4bit:
        dtype = bnb_4bit_compute_dtype or ("float32" if on_cpu else "bfloat16")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    return None


def training_quantization(args: StoryArguments, on_cpu: bool) -> BitsAndBytesConfig | None:
    return quantization_config(on_cpu, **{name: getattr(args, name) for name in QUANTIZATION_FIELDS})


def lora_config(args: StoryArguments):
    """The LoRA adapters: rank, alpha, dropout, and every linear layer but the output unless told otherwise."""
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def load_pretrained(args: StoryArguments, on_cpu: bool, process_index: int = 0) -> PreTrainedModel:
    """The model_name_or_path weights, quantized on load when the config asks for it."""
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    quantization = training_quantization(args, on_cpu)
    if quantization is not None:
        # each process loads its own copy on its own device (under DDP, or all copies land on GPU 0)
        kwargs.update(quantization_config=quantization, device_map={"": "cpu" if on_cpu else process_index})
        if args.load_in_4bit:
            kwargs["dtype"] = quantization.bnb_4bit_compute_dtype
    check_remote_code(args.model_name_or_path, args.trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                                    **kwargs)
    except (OSError, ValueError) as e:
        refused_remote_code(e, args.model_name_or_path)
        raise UserError(
            f"model_name_or_path={args.model_name_or_path!r}: no causal LM could be loaded "
            f"({one_line(e, 200)})"
        ) from None


def add_adapters(model: PreTrainedModel, args: StoryArguments, activation_checkpointing: bool):
    """LoRA adapters on a frozen (possibly quantized) model."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        keep_standard_4bit_layout(model)
    if args.quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        model = get_peft_model(model, lora_config(args))
    except ValueError as e:
        raise UserError(f"lora_target_modules: {one_line(e)}") from None
    base = Path(args.model_name_or_path)
    if base.is_dir():
        model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    return model


def keep_standard_4bit_layout(model: PreTrainedModel, unpackable_only: bool = False) -> None:
    """Keep 4-bit weights in bitsandbytes' standard layout and kernel.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster inference kernel the first time
    it runs in eval mode, and never packs it back. Training keeps the standard layout throughout (the layout that
    has a backward pass: else the steps after the first evaluation fail). For inference, `unpackable_only` keeps
    it only where the repacking fails: layers whose input width is not a multiple of the quantization block size
    (64: e.g. a width of 160).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (
                not unpackable_only or module.in_features % module.weight.quant_state.blocksize):
            module.support_avx512bf16_for_cpu = False


def story_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """sdpa one story at a time inside each packed row, where that pays: training on a CPU, uncompiled.

    An `isolated` row holds several stories; the collator's boolean 4-D mask keeps them apart, but sdpa with a
    mask still computes the whole block x block product. A story starts wherever a token may not see the token
    before it; story by story with `is_causal`, attention costs the sum of the stories' squared lengths instead:
    a third as much for ~180-token stories in 512-token blocks, and the same outputs (tested). Everywhere else
    (evaluation, generation with its KV cache, a GPU, torch.compile, no boolean 4-D mask) this is transformers'
    sdpa with the mask it is given."""
    length = query.shape[2]
    causal = kwargs.pop("is_causal", None) is not False
    if (not module.training or not causal or query.device.type != "cpu" or key.shape[2] != length
            or attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool
            or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    sees_previous = attention_mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1).expand(query.shape[0], -1)
    breaks = [[] for _ in range(query.shape[0])]
    for row, index in torch.nonzero(~sees_previous).tolist():
        breaks[row].append(index + 1)
    rows = []  # split, not sliced: the backward of a split is one concatenation, of a slice a zero-filled copy
    for starts, *qkv in zip(breaks, query.split(1), key.split(1), value.split(1)):
        bounds = [0, *starts, length]
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        rows.append(torch.cat([
            sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
            for q, k, v in zip(*(tensor.split(sizes, dim=2) for tensor in qkv))], dim=1))
    return torch.cat(rows), None


ALL_ATTENTION_FUNCTIONS.register(STORY_ATTENTION, story_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(STORY_ATTENTION, sdpa_mask)


def load_model(args: StoryArguments, tokenizer: PreTrainedTokenizerBase,
               training_args: TrainingArguments | None = None) -> PreTrainedModel:
    """A pretrained model (model_name_or_path), with adapters when use_peft, or a new one (model_type)."""
    on_cpu = not torch.cuda.is_available() or bool(training_args and training_args.use_cpu)
    if args.from_scratch:
        kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        config = build_config(args, tokenizer)
        try:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        except (ValueError, ImportError) as e:
            raise UserError(f"attn_implementation={args.attn_implementation!r}: {one_line(e)}") from None
    else:
        model = load_pretrained(args, on_cpu, training_args.local_process_index if training_args else 0)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    context = context_length(model.config)
    if context is not None and args.block_size > context:
        raise UserError(f"block_size={args.block_size} is longer than the model's context of {context} tokens")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    keep_transformers4_keys(model.config)  # in every folder the run saves: checkpoints and the final model
    if (args.packing == "isolated" and on_cpu and model.config._attn_implementation == "sdpa"
            and model.is_backend_compatible()):
        model.set_attn_implementation(STORY_ATTENTION)  # not saved: config.json keeps the model's default
    if args.use_peft:
        checkpointing = bool(training_args and training_args.activation_checkpointing)
        model = add_adapters(model, args, checkpointing)
    return model


def keep_transformers4_keys(config) -> None:
    """Have `config` also save the RoPE keys transformers 4.x reads: `rope_theta`, `partial_rotary_factor` and, for
    a RoPE type other than the default, `rope_scaling` (the rest of the dict), beside transformers 5's
    `rope_parameters`.

    transformers 5 moved them into `rope_parameters`, a key 4.x ignores: there the model would load with a theta of
    10,000 and no scaling and tell other stories, without a warning. transformers 5 reads the 4.x keys back into the
    same `rope_parameters`, so it loads the folder as before. A `rope_parameters` nested by layer type has no 4.x
    form and is left as it is."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # no RoPE, or one dict per layer type
        return
    config.rope_theta = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        config.partial_rotary_factor = rope["partial_rotary_factor"]
    scaling = {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default":
        # transformers 5's `rope_scaling` is a deprecated property over rope_parameters (its setter replaces them);
        # its config.json is the instance's __dict__, so the 4.x key goes there
        config.__dict__["rope_scaling"] = scaling


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, key, None):
            return getattr(config, key)
    return None


def resolve_block_size(args: StoryArguments) -> int:
    """block_size, with -1 read as the model's context: max_position_embeddings from scratch, else the pretrained
    model's own."""
    if args.block_size != -1:
        return args.block_size
    if args.from_scratch:
        return args.max_position_embeddings
    check_remote_code(args.model_name_or_path, args.trust_remote_code)
    try:
        context = context_length(AutoConfig.from_pretrained(args.model_name_or_path,
                                                            trust_remote_code=args.trust_remote_code))
    except (OSError, ValueError) as e:
        refused_remote_code(e, args.model_name_or_path)
        raise UserError(f"model_name_or_path={args.model_name_or_path!r}: no model config could be loaded "
                        f"({one_line(e, 200)})") from None
    if context is None:
        raise UserError(f"block_size=-1: the config of {args.model_name_or_path!r} states no context length; "
                        "set block_size")
    return context
