"""An adapter run: its LoRA adapter merged into the full-precision base, as a plain model that loads without peft.

The base model is read from the adapter's own metadata (`adapter_config.json`) and reloaded in full precision: an
adapter trained on 4-bit or 8-bit weights is never merged into quantized weights. The merge checks itself: the
merged model's logits on a probe text must match those of the unmerged adapter on the same full-precision base
within `atol + rtol * max|logit|`, or nothing is written. For a quantized run it also reports, as information, how
far the merged model is from the quantized model that was trained (the quantization error). `OUT_DIR/merge_report.json`
records both.

An adapter knows its base: training writes `adapter_base.json` beside every adapter it saves (the run folder and each
checkpoint): the SHA-256 of the base folder's config.json and weights, or a hub base's name and commit. A merge into
a base that no longer matches is refused unless `allow_changed_base` (a retrained base folder would otherwise take
the adapter silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tsg.files import UserError, one_line, replaced_atomically, write_text
from tsg.model import (QUANTIZATION_FIELDS, check_remote_code, keep_transformers4_keys, quantization_config,
                       refused_remote_code)

PROBE = "Once upon a time, there was a little girl named Lily. She loved to play outside."
ATOL = 1e-4
RTOL = 1e-4
MERGED_SUBDIR = "merged"
REPORT_NAME = "merge_report.json"
BASE_RECORD = "adapter_base.json"
FORCE_CHANGED_BASE = "--allow_changed_base true"

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


def base_fingerprint(base: str) -> dict:
    """What the base model is. A local folder: the SHA-256 of config.json and of each weights file, every byte of them
    (a retrained base keeps its file sizes and its safetensors header, and a copy changes every mtime; a merge reads
    every byte of the base anyway). A hub name: the name and the commit it resolves to (None when it cannot be
    resolved, e.g. offline with nothing cached)."""
    path = Path(base).expanduser()
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        files = {}
        for file in [path / "config.json", *weights]:
            if file.is_file():
                digest = hashlib.sha256()
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                files[file.name] = digest.hexdigest()
        return {"base_model": str(path.resolve()), "sha256": files}
    commit = None
    try:
        from transformers.utils import cached_file
        from transformers.utils.hub import extract_commit_hash

        commit = extract_commit_hash(cached_file(base, "config.json"), None)
    except Exception as e:  # offline, or not on the hub: the name alone is recorded
        logger.info("note: no commit found for the base %s (%s)", base, one_line(e, 200))
    return {"base_model": base, "commit": commit}


def record_base(folder: str | Path, fingerprint: dict) -> Path:
    """`fingerprint` (base_fingerprint) as FOLDER/adapter_base.json."""
    return write_text(Path(folder) / BASE_RECORD, json.dumps(fingerprint, indent=2) + "\n")


def base_changes(recorded: dict, current: dict) -> str | None:
    """How `current` differs from the base the adapter recorded (None: the same, or nothing to compare)."""
    old, new = recorded.get("sha256"), current.get("sha256")
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        return f"{', '.join(changed)} changed since the adapter was trained" if changed else None
    old, new = recorded.get("commit"), current.get("commit")
    if old and new and old != new:
        return f"it is at commit {new}, the adapter was trained on commit {old}"
    return None


def check_base(run_dir: Path, base: str, allow_changed: bool = False) -> None:
    """Refuse `base` when it is not the base the adapter in run_dir was trained on (its adapter_base.json)."""
    path = run_dir / BASE_RECORD
    if not path.is_file():  # an adapter saved by something else than tsg train: nothing to check against
        logger.info("note: %s has no %s: its base cannot be checked", run_dir, BASE_RECORD)
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if allow_changed:
            return
        raise UserError(f"{path}: unreadable ({one_line(e, 100)}); merge anyway with {FORCE_CHANGED_BASE}") from None
    changes = base_changes(recorded, base_fingerprint(base))
    if changes is None:
        if recorded.get("sha256") is not None and not Path(base).expanduser().is_dir():
            logger.warning("warning: %s was trained on the folder %s; the hub model %s cannot be checked against it",
                           run_dir, recorded.get("base_model"), base)
        return
    if not allow_changed:
        raise UserError(f"{run_dir}: its base model {base} is not the one the adapter was trained on ({changes}); "
                        f"merge anyway with {FORCE_CHANGED_BASE}")
    logger.warning("warning: merging %s into a changed base %s (%s)", run_dir, base, changes)


class RecordBaseCallback(TrainerCallback):
    """Writes adapter_base.json beside every adapter a run saves: each checkpoint and, at the end, the run folder.
    The main process fingerprints the base as training begins, right after it was loaded."""

    def __init__(self, base: str):
        self.base = base
        self.fingerprint = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.fingerprint = base_fingerprint(self.base)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.fingerprint is not None and folder.is_dir():
            record_base(folder, self.fingerprint)

    def on_train_end(self, args, state, control, **kwargs):
        if self.fingerprint is not None:
            record_base(args.output_dir, self.fingerprint)


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


def _quantized_gap(run_dir: Path, base: str, quantization: dict, ids: torch.Tensor, merged_logits,
                   trust_remote_code: bool = False) -> float | None:
    """Max |logit| difference between the merged model and the quantized model the adapter trained on."""
    from peft import PeftModel

    on_gpu = torch.cuda.is_available()
    config = quantization_config(not on_gpu, **quantization)  # as training built it, compute dtype default included
    device = "cuda" if on_gpu else "cpu"
    try:
        quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map={"": device},
                                                         trust_remote_code=trust_remote_code)
        trained = PeftModel.from_pretrained(quantized, str(run_dir)).eval()
        return (_logits(trained, ids.to(device)).cpu() - merged_logits).abs().max().item()
    except Exception as e:  # information only: the merge stands without it
        logger.info("note: the quantized model could not be rebuilt for comparison (%s)", one_line(e, 200))
        return None


def merge(run_dir: str | Path, out_dir: str | Path, atol: float = ATOL, rtol: float = RTOL,
          base: str | None = None, allow_changed_base: bool = False, trust_remote_code: bool = False) -> dict:
    """Merge run_dir's adapter into its full-precision base (`base`, default: the one its metadata names; checked to
    be the base it was trained on unless allow_changed_base) and save model + tokenizer to out_dir; returns the
    merge report."""
    with warnings.catch_warnings():
        # an adapter trained on 4-bit weights meets GPT-2's Conv1D layers: peft transposes, and says so;
        # peft still asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return _merge(Path(run_dir), Path(out_dir), atol, rtol, base, allow_changed_base, trust_remote_code)


def _merge(run_dir: Path, out_dir: Path, atol: float, rtol: float, base: str | None, allow_changed_base: bool,
           trust_remote_code: bool) -> dict:
    from peft import PeftModel
    from safetensors import SafetensorError

    base = base or adapter_base(run_dir)
    for folder in (base, str(run_dir)):  # the base's model, the run's tokenizer
        check_remote_code(folder, trust_remote_code)
    check_base(run_dir, base, allow_changed_base)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        refused_remote_code(e, base)
        raise UserError(f"{run_dir}: its base model {base!r} could not be loaded ({one_line(e, 200)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir), trust_remote_code=trust_remote_code)
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
            _quantized_gap(run_dir, base, quantization, ids, merged_logits, trust_remote_code)
            if quantization else None
        ),
    }
    try:
        with replaced_atomically(out_dir) as tmp:  # never a half-written model where out_dir belongs
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        raise UserError(f"{out_dir}: the merged model could not be written ({write_error(e)}); "
                        "nothing written") from None
    return report


def write_error(error: Exception) -> str:
    """What went wrong in a write, in the OS's words ("No space left on device") when the error carries its code."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os error (\d+)", str(error))  # safetensors: "I/O error: ... (os error 28)"
    return os.strerror(int(code.group(1))) if code else one_line(error, 200)


def merged_model_dir(run_dir: str | Path, base: str | None = None, allow_changed_base: bool = False,
                     trust_remote_code: bool = False) -> Path:
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
    merge(run_dir, out, base=base, allow_changed_base=allow_changed_base, trust_remote_code=trust_remote_code)
    return out
