"""The TinyStories presets (configs/tinystories_*.json): each builds the GPT-Neo shape of the released
roneneldan/TinyStories-* model, with the parameter counts its comments state, and trains under tsg.

Offline and fast: the model config is built with a stand-in for the GPT-Neo tokenizer (only its size and
special-token ids matter to the shape) and the model is instantiated on the meta device (no weights).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from tsg import model as models
from tsg import train
from tsg.config import parse_args, load_file

GPT_NEO_VOCAB = 50257  # the GPT-2 BPE that the GPT-Neo tokenizer (EleutherAI/gpt-neo-125M) is
END_OF_TEXT = 50256

# The released shapes: name -> (hidden_size, layers, heads, shape read from a copy of its config.json).
# 3M and 28M: width and depth inferred from the size of the released weights file, heads assumed.
RELEASED = {
    "1m": (64, 8, 16, True),
    "3m": (128, 8, 16, False),
    "8m": (256, 8, 16, True),
    "28m": (512, 8, 16, False),
    "33m": (768, 4, 16, True),
}
PRESETS = {name: REPO / "configs" / f"tinystories_{name}.json" for name in RELEASED}


class StandInTokenizer:
    """What build_config reads of the GPT-Neo tokenizer: its length and its <|endoftext|> ids."""

    bos_token_id = eos_token_id = pad_token_id = END_OF_TEXT

    def __len__(self):
        return GPT_NEO_VOCAB


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in {text!r}"
    return int(match.group(1).replace(",", ""))


def raw_config(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def build(path):
    story, _ = parse_args([str(path)])
    config = models.build_config(story, StandInTokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return story, config, model


def test_every_preset_is_shipped():
    assert all(path.is_file() for path in PRESETS.values()), [str(p) for p in PRESETS.values() if not p.is_file()]


@pytest.mark.parametrize("name", RELEASED)
def test_preset_builds_the_released_shape(name):
    story, config, model = build(PRESETS[name])
    hidden, layers, heads, _ = RELEASED[name]
    assert config.model_type == "gpt_neo"
    assert (config.hidden_size, config.num_layers, config.num_heads) == (hidden, layers, heads)
    assert config.vocab_size == GPT_NEO_VOCAB
    assert config.intermediate_size is None  # 4 x hidden
    assert config.max_position_embeddings == 2048 and config.window_size == 256
    assert config.attention_layers == ["global", "local"] * (layers // 2)
    assert story.config_overrides["attention_types"] == [[["global", "local"], layers // 2]]  # as released
    assert (config.bos_token_id, config.eos_token_id) == (END_OF_TEXT, END_OF_TEXT)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: the output layer adds no parameters


@pytest.mark.parametrize("name", RELEASED)
def test_parameter_counts_match_the_comment(name):
    raw = raw_config(PRESETS[name])
    _, config, model = build(PRESETS[name])
    stated = raw["// parameters"]
    total = sum(p.numel() for p in model.parameters())
    tokens = model.transformer.wte.weight.numel()
    positions = model.transformer.wpe.weight.numel()
    assert number(r"([\d,]+) total", stated) == total
    assert number(r"([\d,]+) token embeddings", stated) == tokens == GPT_NEO_VOCAB * config.hidden_size
    assert number(r"([\d,]+) positions", stated) == positions == 2048 * config.hidden_size
    assert number(r"([\d,]+) non-embedding", stated) == total - tokens - positions
    per_layer = number(r"layers x ([\d,]+)", stated)
    assert per_layer == sum(p.numel() for p in model.transformer.h[0].parameters())
    # the count with a 10K-token vocabulary trained on the stories, as the tokenizer comment states
    small = number(r"the model then has ([\d,]+) parameters", raw["// tokenizer"])
    assert small == total - tokens + 10000 * config.hidden_size


@pytest.mark.parametrize("name", RELEASED)
def test_preset_recipe_and_comments(name):
    path = PRESETS[name]
    raw = raw_config(path)
    story, training = parse_args([str(path)])
    assert raw["// run"].startswith(f"accelerate launch tsg/train.py configs/tinystories_{name}.json")
    assert raw["//"].startswith(f"TinyStories-{name.upper()} ")
    assert raw["// source"].startswith("verified" if RELEASED[name][3] else "partly verified")
    assert story.from_scratch and story.tokenizer_name == "EleutherAI/gpt-neo-125M"
    assert story.dataset_name == "roneneldan/TinyStories" and story.train_file is None
    assert (story.block_size, story.packing) == (512, "isolated")
    assert story.attn_implementation is None  # eager: GPT-Neo has no sdpa, and its flash path drops the window
    assert raw["bf16"] is True  # dropped by parse_args on a CPU-only machine
    assert training.report_to == ["wandb"] and training.project == "tsg"
    assert training.lr_scheduler_type.value == "cosine" and training.warmup_steps > 0
    assert training.eval_strategy.value == "steps" and training.save_steps % training.eval_steps == 0

    arithmetic = raw["// arithmetic"]
    rows, accumulation, block = (int(x) for x in re.search(r"(\d+) rows x (\d+) accumulation x (\d+) tokens",
                                                          arithmetic).groups())
    assert (rows, accumulation, block) == (training.per_device_train_batch_size,
                                           training.gradient_accumulation_steps, story.block_size)
    per_step = number(r"tokens = ([\d,]+) per GPU", arithmetic)
    assert per_step == rows * accumulation * block
    assert number(r"([\d,]+) steps =", arithmetic) == training.max_steps
    billions = float(re.search(r"steps = ([\d.]+)B tokens", arithmetic).group(1))
    assert billions == pytest.approx(training.max_steps * per_step / 1e9, abs=0.005)
    assert number(r"warmup (\d+) steps", arithmetic) == training.warmup_steps


def test_presets_read_as_flat_configs():
    for path in PRESETS.values():
        values = load_file(path)
        assert "model_type" in values and not any(key.startswith("//") for key in values)


def test_smallest_preset_trains_offline(tmp_path, small_txt):
    """The 1M preset through tsg.train.main for two steps on the CPU: its shape, window and packing as shipped;
    only the tokenizer (a small one trained on the stories, the hub being out of reach) and the run size differ."""
    out = tmp_path / "ts1m"
    argv = [str(PRESETS["1m"]), "--tokenizer_name", "none", "--vocab_size", "512", "--train_file", str(small_txt),
            "--max_train_samples", "40", "--max_eval_samples", "8", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_strategy", "no",
            "--sample_steps", "0", "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--output_dir", str(out)]
    try:
        train.main(argv)
    except SystemExit as e:
        assert e.code in (0, None)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gpt_neo" and (saved["hidden_size"], saved["num_layers"]) == (64, 8)
    assert saved["attention_layers"] == ["global", "local"] * 4 and saved["window_size"] == 256
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
