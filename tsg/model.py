"""The tokenizer and the model: a pretrained causal LM to fine-tune, or a new one built from the config.

From scratch, as the TinyStories paper did: `model_type` (gpt2, gpt_neo, ...) with the shape given in
the config, randomly initialised, and a byte-level BPE tokenizer trained on the training stories
unless `tokenizer_name` names one.
"""

from __future__ import annotations

import json
import sys
from typing import Iterable

from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tsg.config import ConfigError, StoryArguments

END_OF_STORY = "<|endoftext|>"


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        key = "tokenizer_name" if args.tokenizer_name else "model_name_or_path"
        raise ConfigError(f"{key}={name!r}: no tokenizer could be loaded ({' '.join(str(e).split())[:200]})") from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_config(args: StoryArguments, tokenizer: PreTrainedTokenizerBase):
    """The model config for a from-scratch run: model_type with the config's shape and the tokenizer's ids."""
    if args.model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"model_type={args.model_type!r} is not a transformers architecture (e.g. gpt2, gpt_neo, llama)"
        )
    shape = {
        "num_hidden_layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "max_position_embeddings": args.max_position_embeddings or args.block_size,
    }
    overrides = args.config_overrides or {}
    defaults = CONFIG_MAPPING[args.model_type]()
    for key in overrides:
        if not hasattr(defaults, key):
            raise ConfigError(f"config_overrides: {args.model_type} has no config field {key!r}")
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
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model_type={args.model_type!r}: {' '.join(str(e).split())[:300]}") from None
    return config


def load_model(args: StoryArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A pretrained model (model_name_or_path) or a new, randomly initialised one (model_type)."""
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.from_scratch:
        model = AutoModelForCausalLM.from_config(build_config(args, tokenizer), **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model_name_or_path={args.model_name_or_path!r}: no causal LM could be loaded "
                f"({' '.join(str(e).split())[:200]})"
            ) from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    context = context_length(model.config)
    if context is not None and args.block_size > context:
        raise ConfigError(f"block_size={args.block_size} is longer than the model's context of {context} tokens")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, key, None):
            return getattr(config, key)
    return None


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
