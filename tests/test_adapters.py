"""LoRA, 8-bit and 4-bit QLoRA training on the CPU, and merging adapters into a full-precision base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, python_env, tiny_cli
from tsg import adapter, cli, data, model as models, train, trainer as training
from tsg.config import parse_args
from tsg.files import UserError


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny 'pretrained' GPT-2 saved as a local folder (width 64: bitsandbytes quantizes in blocks of 64)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("base") / "tiny-gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def adapter_cli(base_dir, train_file, output_dir, *extra, **values):
    options = dict(model_type=None, num_hidden_layers=None, hidden_size=None, num_attention_heads=None,
                   model_name_or_path=str(base_dir), use_peft="true", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                   learning_rate=1e-2)
    options.update(values)
    return tiny_cli(train_file, output_dir, *extra, **options)


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("bits", ["none", "8bit", "4bit"])
def test_adapter_training_changes_only_adapters_and_loss_falls(bits, base_dir, small_txt, tmp_path):
    quantization = {"none": [], "8bit": ["--load_in_8bit", "true"], "4bit": ["--load_in_4bit", "true"]}[bits]
    args, training_args = parse_args(adapter_cli(base_dir, small_txt, tmp_path / "run", *quantization,
                                                 max_steps=12, per_device_train_batch_size=8))
    stories, _ = data.load_stories(args, seed=0)
    tokenizer = models.load_tokenizer(args)
    _, blocks = training.build_blocks(args, training_args, stories, tokenizer)
    model = models.load_model(args, tokenizer, training_args)
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    assert 0 < trainable < total / 5
    if bits == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    before = _parameters(model)
    trainer = training.StoryTrainer(model=model, args=training_args, train_dataset=blocks["train"],
                                    data_collator=data.BlockCollator(model.config._attn_implementation or "eager"))
    trainer.train()
    after = _parameters(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = {name for name in before if "lora_" in name}
    assert changed and changed <= lora, f"non-adapter weights changed: {sorted(changed - lora)[:3]}"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, base_dir, small_txt) -> Path:
    """A 4-bit QLoRA run trained through the command-line entry point."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    train.main(adapter_cli(base_dir, small_txt, out, "--load_in_4bit", "true", max_steps=10))
    return out


def test_qlora_run_folder_holds_adapter_tokenizer_and_config(qlora_run, base_dir):
    adapter_config = json.loads((qlora_run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (qlora_run / "adapter_model.safetensors").is_file()
    assert (qlora_run / "tokenizer.json").is_file()
    run_config = json.loads((qlora_run / "run_config.json").read_text())
    assert run_config["config"]["load_in_4bit"] is True and run_config["config"]["use_peft"] is True
    assert not (qlora_run / "model.safetensors").exists()  # the base is not copied


def _adapter_logits(run_dir: Path, base_dir: Path, ids):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir)).eval()
        return base_logits, adapted(input_ids=ids).logits


def test_merged_logits_equal_adapter_logits_on_a_full_precision_base(qlora_run, base_dir, tmp_path):
    report = adapter.merge(qlora_run, tmp_path / "merged")
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    base_logits, adapter_logits = _adapter_logits(qlora_run, base_dir, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter learned something: the check can fail
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.inference_mode():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    # never merged into quantized weights: plain fp32 layers, no quantization config
    assert merged.dtype == torch.float32
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    assert report["max_abs_logit_diff_vs_adapter"] <= report["tolerance"]
    assert report["trained_quantization"]["load_in_4bit"] is True
    assert report["max_abs_logit_diff_vs_quantized_training_model"] > 0  # the 4-bit error, reported


def test_merged_folder_loads_without_peft(qlora_run, tmp_path):
    cli.main(["merge", str(qlora_run), str(tmp_path / "merged")])
    code = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})\n"
        "print(type(m).__name__, t.eos_token)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GPT2LMHeadModel <|endoftext|>" in result.stdout


def test_failed_merge_check_writes_nothing(qlora_run, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="nothing written"):
        adapter.merge(qlora_run, tmp_path / "out" / "merged", atol=-1.0, rtol=0.0)
    assert not (tmp_path / "out" / "merged").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind


def test_merge_of_a_folder_without_adapter_is_a_clear_error(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(base_dir), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merged_model_dir_merges_once_and_reuses(qlora_run):
    first = adapter.merged_model_dir(qlora_run)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = adapter.merged_model_dir(qlora_run)
    assert first == second == qlora_run / "merged"
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp


def test_xl_qlora_config_builds_its_quantization_and_lora_configs():
    args, _ = parse_args([str(REPO / "configs" / "xl_qlora.json")])
    assert args.model_name_or_path == "gpt2-xl"
    quantization = models.training_quantization(args, on_cpu=False)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant and quantization.bnb_4bit_compute_dtype == torch.bfloat16
    lora = models.lora_config(args)
    assert (lora.r, lora.lora_alpha, lora.task_type) == (16, 32, "CAUSAL_LM")
    assert lora.target_modules == "all-linear"
    # on a CPU the 4-bit matmuls run in float32 unless the config says otherwise
    args.bnb_4bit_compute_dtype = None
    assert models.training_quantization(args, on_cpu=True).bnb_4bit_compute_dtype == torch.float32


@pytest.mark.parametrize(("extra", "message"), [
    (["--load_in_4bit", "true"], "set use_peft true"),
    (["--load_in_8bit", "true", "--load_in_4bit", "true", "--use_peft", "true"], "choose one"),
    (["--use_peft", "true", "--model_type", "gpt2", "--model_name_or_path", "none"], "use_peft trains adapters"),
    (["--use_peft", "true", "--lora_dropout", "1.5"], "lora_dropout"),
])
def test_bad_adapter_settings_are_refused(extra, message, tmp_path):
    with pytest.raises(UserError, match=message):
        parse_args(["--model_name_or_path", "gpt2", "--output_dir", str(tmp_path), *extra])
