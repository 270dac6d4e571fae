"""LoRA, 8-bit and 4-bit QLoRA training on the CPU, and merging adapters into a full-precision base."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, error_line, python_env, run_tsg, tiny_cli
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


# --- an adapter knows its base; a full disk leaves nothing half-written ---


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, small_txt) -> tuple[Path, Path]:
    """(run, base): a full-precision LoRA run, with a checkpoint at each of its 2 steps, on a base of its own."""
    root = tmp_path_factory.mktemp("lora")
    base = shutil.copytree(base_dir, root / "base")
    train.main(adapter_cli(base, small_txt, root / "run", max_steps=2, save_steps=1))
    return root / "run", base


def test_training_records_the_base_beside_each_adapter(lora_run):
    run, base = lora_run
    weights = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    for folder in (run, run / "checkpoint-1", run / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file()
        record = json.loads((folder / adapter.BASE_RECORD).read_text())
        assert record["base_model"] == str(base.resolve())
        assert record["sha256"]["model.safetensors"] == weights and "config.json" in record["sha256"]


def test_merge_and_generate_refuse_a_retrained_base(lora_run, tmp_path, capsys):
    run, base = lora_run
    moved = shutil.copytree(base, tmp_path / "moved")  # the same weights elsewhere: accepted
    assert run_tsg(["merge", run, tmp_path / "into_copy", "--base_model", moved], capsys)[0] == 0
    original = (base / "model.safetensors").read_bytes()
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            model.transformer.wte.weight.add_(0.01)
        model.save_pretrained(base)  # the base folder retrained in place: same names, shapes and sizes
        code, _, err = run_tsg(["merge", run, tmp_path / "merged"], capsys)
        line = error_line(err, "merge")
        assert code == 2 and "model.safetensors changed since the adapter was trained" in line, line
        assert "--allow_changed_base true" in line and not (tmp_path / "merged").exists()
        code, _, err = run_tsg(["generate", "--model", run, "--max_new_tokens", "3", "--device", "cpu"], capsys)
        assert code == 2 and "--allow_changed_base true" in error_line(err, "generate")
        assert not (run / adapter.MERGED_SUBDIR).exists()
        code, _, err = run_tsg(["merge", run, tmp_path / "merged", "--allow_changed_base", "true"], capsys)
        assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err[-2000:]
    finally:
        (base / "model.safetensors").write_bytes(original)


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_a_full_disk_leaves_no_half_written_merge_and_a_rerun_works(error, lora_run, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    from transformers import modeling_utils

    run, _ = lora_run
    save = modeling_utils.safe_save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        if error == "safetensors":  # what safetensors raises on a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_tsg(["merge", run, out / "merged"], capsys)
    line = error_line(err, "merge")
    assert code == 2 and "No space left on device" in line and "nothing written" in line, line
    assert list(out.iterdir()) == []  # neither the merged folder nor a temporary one
    with pytest.raises(UserError, match="No space left on device"):
        adapter.merged_model_dir(run)  # the merge that generate and evaluate do
    assert not (run / adapter.MERGED_SUBDIR).exists()
    assert not [p for p in run.iterdir() if p.name.startswith(f".{adapter.MERGED_SUBDIR}.")]
    monkeypatch.setattr(modeling_utils, "safe_save_file", save)  # space again: a rerun works
    assert run_tsg(["merge", run, out / "merged"], capsys)[0] == 0
    assert AutoModelForCausalLM.from_pretrained(out / "merged").config.n_embd == 64
