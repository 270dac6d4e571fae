"""An adapter run: its LoRA adapter merged into the full-precision base, as a plain model that loads without peft.

The base model is read from the adapter's own metadata (`adapter_config.json`) and reloaded in full precision: an
adapter trained on 4-bit or 8-bit weights is never merged into quantized weights. The merge checks itself: the
merged model's logits on a probe text must match those of the unmerged adapter on the same full-precision base
within `atol + rtol * max|logit|`, or nothing is written. For a quantized run it also reports, as information, how
far the merged model is from the quantized model that was trained (the quantization error). `OUT_DIR/merge_report.json`
records both.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsg.files import UserError, one_line, replaced_atomically
from tsg.model import QUANTIZATION_FIELDS, keep_transformers4_keys, quantization_config

PROBE = "Once upon a time, there was a little girl named Lily. She loved to play outside."
ATOL = 1e-4
RTOL = 1e-4
MERGED_SUBDIR = "merged"
REPORT_NAME = "merge_report.json"

logger = logging.getLogger(__name__)


def is_adapter_run(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def adapter_base(run_dir: Path) -> str:
    """The base model named in the adapter's metadata."""
    from peft import PeftConfig

    if not is_adapter_run(run_dir):
        raise UserError(f"{run_dir}: no adapter_config.json (not an adapter run)")
    try:
        base = PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{run_dir}/adapter_config.json: not a peft adapter config ({one_line(e, 200)})") from None
    if not base:
        raise UserError(f"{run_dir}/adapter_config.json names no base_model_name_or_path")
    return base


def trained_quantization(run_dir: Path) -> dict | None:
    """The 4/8-bit settings the run trained with, from tsg's run_config.json (None: full precision)."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    if not (config.get("load_in_4bit") or config.get("load_in_8bit")):
        return None
    return {key: config.get(key) for key in QUANTIZATION_FIELDS}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _quantized_gap(run_dir: Path, base: str, quantization: dict, ids: torch.Tensor, merged_logits) -> float | None:
    """Max |logit| difference between the merged model and the quantized model the adapter trained on."""
    from peft import PeftModel

    on_gpu = torch.cuda.is_available()
    config = quantization_config(not on_gpu, **quantization)  # as training built it, compute dtype default included
    device = "cuda" if on_gpu else "cpu"
    try:
        quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map={"": device})
        trained = PeftModel.from_pretrained(quantized, str(run_dir)).eval()
        return (_logits(trained, ids.to(device)).cpu() - merged_logits).abs().max().item()
    except Exception as e:  # information only: the merge stands without it
        logger.info("note: the quantized model could not be rebuilt for comparison (%s)", one_line(e, 200))
        return None


def merge(run_dir: str | Path, out_dir: str | Path, atol: float = ATOL, rtol: float = RTOL,
          base: str | None = None) -> dict:
    """Merge run_dir's adapter into its full-precision base (`base`, default: the one its metadata names) and save
    model + tokenizer to out_dir; returns the merge report."""
    with warnings.catch_warnings():
        # an adapter trained on 4-bit weights meets GPT-2's Conv1D layers: peft transposes, and says so;
        # peft still asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return _merge(Path(run_dir), Path(out_dir), atol, rtol, base)


def _merge(run_dir: Path, out_dir: Path, atol: float, rtol: float, base: str | None) -> dict:
    from peft import PeftModel

    base = base or adapter_base(run_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir}: its base model {base!r} could not be loaded ({one_line(e, 200)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
        adapted = PeftModel.from_pretrained(model, str(run_dir)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{run_dir}: the adapter or its tokenizer could not be loaded ({one_line(e, 200)})") from None
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    adapter_logits = _logits(adapted, ids)
    merged = adapted.merge_and_unload()
    keep_transformers4_keys(merged.config)  # transformers 5 folded them into rope_parameters when loading the base
    merged_logits = _logits(merged, ids)
    diff = (merged_logits - adapter_logits).abs().max().item()
    tolerance = atol + rtol * adapter_logits.abs().max().item()
    if not diff <= tolerance:
        raise UserError(f"{run_dir}: merged logits differ from the adapter's by {diff:.3g} > {tolerance:.3g}; "
                        "nothing written")
    quantization = trained_quantization(run_dir)
    report = {
        "adapter": str(run_dir),
        "base_model": base,
        "probe_tokens": ids.shape[1],
        "max_abs_logit_diff_vs_adapter": diff,
        "tolerance": tolerance,
        "trained_quantization": quantization,
        "max_abs_logit_diff_vs_quantized_training_model": (
            _quantized_gap(run_dir, base, quantization, ids, merged_logits) if quantization else None
        ),
    }
    try:
        with replaced_atomically(out_dir) as tmp:  # never a half-written model where out_dir belongs
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{out_dir}: the merged model could not be written ({e.strerror or e})") from None
    return report


def merged_model_dir(run_dir: str | Path, base: str | None = None) -> Path:
    """A plain model for an adapter run: merged once into RUN_DIR/merged, reused while the adapter (and the base it
    was merged into) is unchanged."""
    run_dir = Path(run_dir)
    out = run_dir / MERGED_SUBDIR
    adapter = run_dir / "adapter_model.safetensors"
    report = out / REPORT_NAME
    if report.is_file() and (not adapter.is_file() or report.stat().st_mtime >= adapter.stat().st_mtime):
        try:
            merged_base = json.loads(report.read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):  # an unreadable report: merge again
            merged_base = None
        if merged_base is not None and base in (None, merged_base):
            return out
    logger.info("merging the adapter of %s into %s", run_dir, out)
    merge(run_dir, out, base=base)
    return out
