"""Merge a run's LoRA adapter into its base model and save a plain model that loads without peft.

    python -m tsg.merge runs/qlora_cpu runs/qlora_cpu-merged

The base model is read from the adapter's own metadata (`adapter_config.json`) and reloaded in full
precision: an adapter trained on 4-bit or 8-bit weights is never merged into quantized weights. The
merge checks itself: the merged model's logits on a probe text must match those of the unmerged
adapter on the same full-precision base within `atol + rtol * max|logit|`, or nothing is written. For
a quantized run it also reports, as information, how far the merged model is from the quantized model
that was trained (the quantization error). `OUT_DIR/merge_report.json` records both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROBE = "Once upon a time, there was a little girl named Lily. She loved to play outside."
ATOL = 1e-4
RTOL = 1e-4
MERGED_SUBDIR = "merged"


class MergeError(RuntimeError):
    """The adapter could not be merged; nothing was written."""


def adapter_base(run_dir: Path) -> str:
    """The base model named in the adapter's metadata."""
    from peft import PeftConfig

    if not (run_dir / "adapter_config.json").is_file():
        raise MergeError(f"{run_dir}: no adapter_config.json (not an adapter run)")
    base = PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
    if not base:
        raise MergeError(f"{run_dir}/adapter_config.json names no base_model_name_or_path")
    return base


def _quantization_of(run_dir: Path) -> dict | None:
    """The 4/8-bit settings the run trained with, from tsg's run_config.json (None: full precision)."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    if not (config.get("load_in_4bit") or config.get("load_in_8bit")):
        return None
    return {key: config.get(key) for key in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                              "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _quantized_gap(run_dir: Path, base: str, quantization: dict, ids: torch.Tensor, merged_logits) -> float | None:
    """Max |logit| difference between the merged model and the quantized model the adapter trained on."""
    from peft import PeftModel

    from tsg.model import quantization_config

    # the same BitsAndBytesConfig training built from these fields (and the same compute dtype default)
    config = quantization_config(SimpleNamespace(**quantization), on_cpu=not torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map={"": device})
        trained = PeftModel.from_pretrained(quantized, str(run_dir)).eval()
        return (_logits(trained, ids.to(device)).cpu() - merged_logits).abs().max().item()
    except Exception as e:  # information only: the merge stands without it
        print(f"tsg.merge: note: the quantized model could not be rebuilt for comparison ({e})", file=sys.stderr)
        return None


def merge(run_dir: str | Path, out_dir: str | Path, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Merge run_dir's adapter into its full-precision base and save model + tokenizer to out_dir."""
    with warnings.catch_warnings():
        # an adapter trained on 4-bit weights meets GPT-2's Conv1D layers: peft transposes, and says so;
        # peft still asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return _merge(Path(run_dir), Path(out_dir), atol, rtol)


def _merge(run_dir: Path, out_dir: Path, atol: float, rtol: float) -> dict:
    from peft import PeftModel

    base = adapter_base(run_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise MergeError(f"{run_dir}: its base model {base!r} could not be loaded ({' '.join(str(e).split())[:200]})")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    adapted = PeftModel.from_pretrained(model, str(run_dir)).eval()
    adapter_logits = _logits(adapted, ids)
    merged = adapted.merge_and_unload()
    merged_logits = _logits(merged, ids)
    diff = (merged_logits - adapter_logits).abs().max().item()
    tolerance = atol + rtol * adapter_logits.abs().max().item()
    if not diff <= tolerance:
        raise MergeError(f"{run_dir}: merged logits differ from the adapter's by {diff:.3g} > {tolerance:.3g}; "
                         "nothing written")
    quantization = _quantization_of(run_dir)
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
    _save_atomically(merged, tokenizer, report, out_dir)
    return report


def _save_atomically(model, tokenizer, report: dict, out_dir: Path) -> None:
    """Write into a temporary folder beside out_dir, then swap it in: never a half-written model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent)) / "previous"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged_model_dir(run_dir: str | Path) -> Path:
    """A plain model for an adapter run: merged once into RUN_DIR/merged, reused while the adapter is unchanged."""
    run_dir = Path(run_dir)
    out = run_dir / MERGED_SUBDIR
    adapter = run_dir / "adapter_model.safetensors"
    report = out / "merge_report.json"
    if report.is_file() and (not adapter.is_file() or report.stat().st_mtime >= adapter.stat().st_mtime):
        return out
    print(f"tsg.merge: merging the adapter of {run_dir} into {out}", file=sys.stderr)
    merge(run_dir, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tsg.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder holding adapter_config.json (saved by tsg.train with use_peft)")
    parser.add_argument("out_dir", help="where the merged model and tokenizer go")
    parser.add_argument("--atol", type=float, default=ATOL, help="absolute logit tolerance of the self-check")
    parser.add_argument("--rtol", type=float, default=RTOL, help="tolerance relative to the largest logit")
    args = parser.parse_args(argv)
    try:
        report = merge(args.run_dir, args.out_dir, args.atol, args.rtol)
    except MergeError as e:
        print(f"tsg.merge: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tsg.merge: merged {report['base_model']} + {args.run_dir} into {args.out_dir}; "
          f"logits match the adapter's within {report['max_abs_logit_diff_vs_adapter']:.2g} "
          f"(tolerance {report['tolerance']:.2g})")
    gap = report["max_abs_logit_diff_vs_quantized_training_model"]
    if gap is not None:
        print(f"tsg.merge: against the quantized model it trained on, logits differ by up to {gap:.3g} "
              "(the quantization error)")


if __name__ == "__main__":
    main()
