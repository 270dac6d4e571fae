"""The benchmark runs end to end on tiny sizes and writes every field (no test asserts a speed); the pieces it
relies on: padding to the batch's longest story, token counts of told stories, compiled decoding telling the same
story, the FLOP count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAMPLE_FILE, python_env, tiny_args

from tsg import bench, data, generation, model as models

NUMBERS = (int, float)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """`python -m tsg.bench --tiny` on the embedded sample, in a subprocess (it spawns processes of its own)."""
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("bench") / "bench-results.json"
    done = subprocess.run([sys.executable, "-m", "tsg.bench", "--tiny", "--data", str(SAMPLE_FILE), "--output",
                           str(output)], env=python_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(output.read_text()), done.stdout


def is_number(value) -> bool:
    return isinstance(value, NUMBERS) and not isinstance(value, bool) and math.isfinite(value)


def test_every_ratio_is_a_number(results):
    found, _ = results
    assert set(bench.TARGETS) <= set(found["ratios"])
    generation = found["generation"]
    for name, value in found["ratios"].items():
        if name.startswith("llama_cpp") and any("llama_cpp_skipped" in generation[section] for section in
                                                 ("single_stream_stories15m", "single_stream_tiny_cpu")):
            assert value is None, (name, value)  # no llama-cpp-python: skipped, saying why
            continue
        assert is_number(value) and value >= 0, (name, value)
    assert 0 <= found["ratios"]["mfu"] < 1.5  # a fraction (tiny runs are noisy, never a percentage)
    assert 0 <= found["ratios"]["isolated_pad_share"] < 1
    assert set(found["targets_met"]) == set(found["ratios"])


def test_hardware_and_raw_figures(results):
    found, stdout = results
    hw = found["hardware"]
    assert isinstance(hw["cpu"], str) and hw["cpu"]
    assert isinstance(hw["cores"], int) and isinstance(hw["torch_threads"], int)
    assert is_number(hw["matmul_peak_fp32_flops"]) and hw["matmul_peak_fp32_flops"] > 0
    assert hw["gpu"] is None or isinstance(hw["gpu"], str)
    assert isinstance(found["flops_counting"], str)
    for mode in bench.PACKING_MODES:
        assert is_number(found["packing"][mode]["real_tokens_per_s"])
        assert 0 <= found["packing"][mode]["pad_share"] < 1
    assert found["packing"]["pad_block"]["pad_share"] >= found["packing"]["pad_longest"]["pad_share"]
    for name in ("trainer", "plain_loop"):
        assert is_number(found["trainer"][name]["tokens_per_s"])
    mfu = found["mfu"]
    assert mfu["config"] == "configs/tiny_cpu.json" and mfu["levers"]
    for run in (mfu["as_configured"], *mfu["levers"].values()):
        assert is_number(run["mfu"]) and run["flops_per_token"] > 0
    for key in ("cold_num_proc_1", "cached_num_proc_1", "cold_num_proc_2", "cached_num_proc_2"):
        assert is_number(found["pipeline"][key]["seconds_per_mb"])
    scale = found["pipeline"]["scale"]
    assert list(scale) == ["1MB", "3MB"]  # TINY's scale_megabytes, smallest first
    for case in scale.values():
        assert case["megabytes"] >= 1 and is_number(case["megabytes_per_s"]) and case["blocks"] > 0
        assert case["peak_own_memory_bytes"] > 0 and case["peak_rss_bytes"] >= case["peak_own_memory_bytes"]
        assert case["cache_bytes"] > 0 and is_number(case["cores_used"])
    # the 3 MB file is 4 copies of the 0.95 MB sample, the 1 MB file 2: twice the stories
    assert scale["3MB"]["stories"] == 2 * scale["1MB"]["stories"]
    gen = found["generation"]
    for quantization in generation.QUANTIZATIONS:
        weights = gen["weights"][quantization]
        assert weights["batched32"]["stories"] == 32 and weights["batched32"]["tokens"] > 0
        assert is_number(weights["time_to_first_token_s"]) and weights["memory_footprint_bytes"] > 0
    for section in ("single_stream_stories15m", "single_stream_tiny_cpu"):
        assert is_number(gen[section]["tsg"]["tokens_per_s"]) and is_number(gen[section]["hf_generate"]["tokens_per_s"])
    for case in bench.MEMORY_CASES:
        memory = found["memory"][case]
        assert memory["load_peak_bytes"] >= 0 and memory["step_peak_bytes"] >= memory["load_peak_bytes"]
        assert memory["weights_bytes"] > 0 and 0 < memory["trainable"] <= memory["parameters"]
    assert found["memory"]["lora"]["trainable"] < found["memory"]["full"]["trainable"]
    if not torch.cuda.is_available():
        assert found["gpu"] == {"skipped": "no GPU"}
    else:
        runs = (found["gpu"]["as_configured"], *found["gpu"]["levers"].values())
        assert {run["activation_checkpointing"] for run in runs} == {True, False}
        assert {run["load_in_4bit"] for run in runs} == {True, False}
        for run in runs:
            assert is_number(run["mfu"]) and run["peak_memory_bytes"] > 0 and run["tokens_per_s"] > 0
    assert "| isolated_vs_concat" in stdout and "hardware:" in stdout and "bench: packing isolated" in stdout


def test_pad_to_longest_cuts_only_padding(tokenizer, sample_stories):
    stories = [tokenizer(s)["input_ids"][:40] for s in sample_stories[:3]] + [[5, 6, 7]]
    rows = data.pack_stories(stories, 64, "pad", tokenizer.pad_token_id)
    rows = [{key: value[i] for key, value in rows.items()} for i in range(len(stories))]
    full = data.BlockCollator("sdpa")(rows)
    cut = data.BlockCollator("sdpa", pad_to_longest=True)(rows)
    longest = max(len(s) for s in stories)
    assert cut["input_ids"].shape == (4, longest)
    for key in full:
        assert torch.equal(cut[key], full[key][:, :longest])
    assert not full["attention_mask"][:, longest:].any()


def test_story_tokens_count_up_to_the_end_of_story():
    eos = 9
    new = torch.tensor([[1, 2, eos, eos, eos], [1, 2, 3, 4, 5], [eos, eos, eos, eos, eos]])
    assert generation.new_token_counts(new, [eos]) == [3, 5, 1]


def test_compiled_decoding_tells_the_same_greedy_story(tokenizer, tiny_model):
    model = tiny_model(tokenizer)
    plain = generation.tell_stories(model, tokenizer, "Once upon a time", do_sample=False, max_new_tokens=12)
    compiled = generation.tell_stories(model, tokenizer, "Once upon a time", do_sample=False, max_new_tokens=12,
                                     compile=True)
    assert compiled == plain and plain[0].tokens == 12
    config = generation.generation_config(model, tokenizer, generation.Settings(), compile=True)
    assert config.cache_implementation == "static" and config.compile_config.fullgraph


def test_training_flops_count_every_matmul(tokenizer):
    torch.manual_seed(0)
    model = models.load_model(tiny_args(), tokenizer)
    layers, width, vocab = 2, 32, len(tokenizer)
    matmuls = layers * 12 * width**2 + vocab * width  # attention 4 d^2, MLP 8 d^2 a layer; the (tied) LM head
    counted = bench.training_flops_per_token(model, 64)
    assert counted["matmul_weights"] == matmuls
    assert counted["flops_per_token"] == 6 * matmuls + 12 * layers * width * 64


def test_4bit_generation_on_the_cpu_with_a_width_bitsandbytes_cannot_repack(tmp_path, tokenizer):
    """A 4-bit layer whose input width is not a multiple of 64 (tiny_cpu.json's 160) keeps the standard layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=160, intermediate_size=432, num_hidden_layers=1, num_attention_heads=5,
                         num_key_value_heads=5, vocab_size=len(tokenizer), max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = generation.load_model(str(tmp_path), "4bit", "cpu")
    stories = generation.tell_stories(model, tok, ["Once upon a time", "Tom"], max_new_tokens=5)
    assert len(stories) == 2 and all(1 <= story.tokens <= 5 for story in stories)


def test_repeated_stories_are_whole_copies(tmp_path, small_txt):
    """The scale files of the pipeline section: the source's stories again and again, none run into the next."""
    source = list(data.read_tinystories_txt(str(small_txt)))
    size = small_txt.stat().st_size
    bench.repeat_stories(str(small_txt), 2.5 * size / 1e6, tmp_path / "big.txt")
    assert list(data.read_tinystories_txt(str(tmp_path / "big.txt"))) == source * 3
