"""`tsg merge`: merge a run's LoRA adapter into its full-precision base and save a plain model that loads without
peft, checked against the adapter's own logits (tsg.adapter).

    tsg merge runs/qlora_cpu runs/qlora_cpu-merged
    make merge RUN=runs/qlora_cpu
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from tsg import adapter
from tsg.config import Command, option, run
from tsg.files import UserError

logger = logging.getLogger("tsg")


@dataclass
class MergeArguments:
    run_dir: Optional[str] = option(None, "A run folder holding adapter_config.json (saved by tsg train with "
                                    "use_peft).")
    out_dir: Optional[str] = option(None, "Where the merged model and tokenizer go.")
    base_model: Optional[str] = option(None, "The base to merge into (default: the one adapter_config.json names).")
    atol: float = option(adapter.ATOL, "Absolute logit tolerance of the self-check.")
    rtol: float = option(adapter.RTOL, "Tolerance relative to the largest logit.")
    allow_changed_base: bool = option(False, "Merge even into a base that is not the one the adapter was trained on "
                                      "(its adapter_base.json).")
    trust_remote_code: bool = option(False, "Run Python code the base model's folder names (auto_map in its config).")

    def __post_init__(self):
        for name in ("run_dir", "out_dir"):
            if not getattr(self, name):
                raise UserError(f"{name}: required (tsg merge RUN_DIR OUT_DIR)")


MERGE = Command(name="merge", types=(MergeArguments,), description=__doc__,
                positional=("run_dir", "out_dir"))


def merge(options: MergeArguments) -> dict:
    report = adapter.merge(options.run_dir, options.out_dir, options.atol, options.rtol, options.base_model,
                           options.allow_changed_base, options.trust_remote_code)
    logger.info("merged %s + %s into %s; logits match the adapter's within %.2g (tolerance %.2g)",
                report["base_model"], options.run_dir, options.out_dir, report["max_abs_logit_diff_vs_adapter"],
                report["tolerance"])
    gap = report["max_abs_logit_diff_vs_quantized_training_model"]
    if gap is not None:
        logger.info("against the quantized model it trained on, logits differ by up to %.3g (the quantization "
                    "error)", gap)
    return report


def main(argv: list[str] | None = None) -> None:
    run(MERGE, merge, argv)


if __name__ == "__main__":
    main()
