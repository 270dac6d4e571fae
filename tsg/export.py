"""`tsg export`: a trained model as a file that runs outside Python (tsg.conversion): GGUF for llama.cpp, ONNX for
ONNX Runtime and transformers.js.

    tsg export runs/tiny_cpu --format gguf                     # runs/tiny_cpu/tiny_cpu-f32.gguf
    tsg export runs/qlora_cpu --outtype q8_0 --output stories.gguf   # an adapter run is merged first
    tsg export runs/tiny_cpu --format onnx                     # runs/tiny_cpu/onnx/model.onnx
    tsg export runs/tiny_cpu --format onnx --output web/tiny   # web/tiny/onnx/model.onnx, config, tokenizer
    make export MODEL=runs/tiny_cpu FORMAT=gguf

A file is kept only when it checks out: GGUF read back gives the model's next-token logits on probe texts within
the outtype's tolerance and the same token ids; ONNX under ONNX Runtime gives the model's logits along a greedy
continuation decoded through its past key values, and its folder's tokenizer the same ids. Then llama.cpp runs the
GGUF (`llama-completion -m runs/tiny_cpu/tiny_cpu-f32.gguf -p "Once upon a time" -n 200`, or `tsg generate
--backend llama.cpp`), and ONNX Runtime or transformers.js the ONNX folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from tsg.config import Command, option, run
from tsg.conversion import default_gguf_path, write_gguf, write_onnx
from tsg.files import UserError
from tsg.generation import check_model_name

logger = logging.getLogger("tsg")


@dataclass
class ExportArguments:
    model: Optional[str] = option(None, "Folder saved by tsg train, an adapter run (merged first), or a hub name.")
    format: Literal["gguf", "onnx"] = option("gguf", "gguf (llama.cpp) or onnx (ONNX Runtime, transformers.js).")
    outtype: Literal["f32", "f16", "q8_0"] = option("f32", "GGUF weights: f32, f16 or q8_0 (8-bit blocks); ONNX: f32.")
    output: Optional[str] = option(None, "gguf: the file to write (default: MODEL/<name>-<outtype>.gguf); onnx: the "
                                   "folder (default: the model's own; another gets its config and tokenizer too).")

    def __post_init__(self):
        if not self.model:
            raise UserError("model: required (tsg export MODEL)")
        folder = check_model_name(self.model)
        if self.output is None and folder is None:
            raise UserError(f"output: required when model is a hub name ({self.model})")
        if self.format == "onnx":
            if self.outtype != "f32":
                raise UserError(f"outtype {self.outtype}: the ONNX export is f32 (f16 and q8_0 are GGUF's)")
            if self.output and Path(self.output).exists() and not Path(self.output).is_dir():
                raise UserError(f"output {self.output}: not a folder (the ONNX export writes a folder)")
            return
        if self.output and Path(self.output).suffix.lower() != ".gguf":
            raise UserError(f"output {self.output}: expected a .gguf file name")
        if self.output and Path(self.output).is_dir():
            raise UserError(f"output {self.output}: is a folder")

    @property
    def path(self) -> Path:
        return Path(self.output) if self.output else default_gguf_path(self.model, self.outtype)


EXPORT = Command(name="export", types=(ExportArguments,), description=__doc__, positional=("model",))


def export(options: ExportArguments) -> None:
    if options.format == "onnx":
        path, check = write_onnx(options.model, options.output)
        size = sum(f.stat().st_size for f in path.parent.iterdir())
        logger.info("wrote %s (%.1f MB, f32)", path, size / 1e6)
        logger.info("checked under ONNX Runtime: logits on %d probe texts and %d greedy steps after each, decoded "
                    "through the past key values, within %.3g of the model's (tolerance %.3g); token ids the same",
                    check.probes, check.steps, check.max_abs_logit_diff, check.tolerance)
        return
    path, check = write_gguf(options.model, options.path, options.outtype)
    logger.info("wrote %s (%.1f MB, %s)", path, path.stat().st_size / 1e6, options.outtype)
    logger.info("checked: next-token logits on %d probe texts within %.3g of the model's (tolerance %.3g), "
                "token ids %s", check.probes, check.max_abs_logit_diff, check.tolerance,
                "the same" if check.same_tokens else "different")


def main(argv: list[str] | None = None) -> None:
    run(EXPORT, export, argv)


if __name__ == "__main__":
    main()
