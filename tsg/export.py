"""`tsg export`: a trained model as a file that runs outside Python: GGUF for llama.cpp (tsg.conversion).

    tsg export runs/tiny_cpu --format gguf                     # runs/tiny_cpu/tiny_cpu-f32.gguf
    tsg export runs/qlora_cpu --outtype q8_0 --output stories.gguf   # an adapter run is merged first
    make export MODEL=runs/tiny_cpu FORMAT=gguf

The file is kept only when it checks out: read back, it gives the model's next-token logits on probe texts within
the outtype's tolerance and the same token ids. Then llama.cpp runs it, e.g.
`llama-completion -m runs/tiny_cpu/tiny_cpu-f32.gguf -p "Once upon a time" -n 200`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from tsg.config import Command, option, run
from tsg.conversion import write_gguf
from tsg.files import UserError
from tsg.generation import check_model_name

logger = logging.getLogger("tsg")


@dataclass
class ExportArguments:
    model: Optional[str] = option(None, "Folder saved by tsg train, an adapter run (merged first), or a hub name.")
    format: Literal["gguf"] = option("gguf", "The file format: gguf (llama.cpp).")
    outtype: Literal["f32", "f16", "q8_0"] = option("f32", "Weights in the file: f32, f16 or q8_0 (8-bit blocks).")
    output: Optional[str] = option(None, "The file to write (default: MODEL/<name>-<outtype>.gguf).")

    def __post_init__(self):
        if not self.model:
            raise UserError("model: required (tsg export MODEL)")
        folder = check_model_name(self.model)
        if self.output is None and folder is None:
            raise UserError(f"output: required when model is a hub name ({self.model})")
        if self.output and Path(self.output).suffix.lower() != ".gguf":
            raise UserError(f"output {self.output}: expected a .gguf file name")
        if self.output and Path(self.output).is_dir():
            raise UserError(f"output {self.output}: is a folder")

    @property
    def path(self) -> Path:
        if self.output:
            return Path(self.output)
        folder = Path(self.model).expanduser().resolve()
        return folder / f"{folder.name}-{self.outtype}.gguf"


EXPORT = Command(name="export", types=(ExportArguments,), description=__doc__, positional=("model",))


def export(options: ExportArguments) -> None:
    path, check = write_gguf(options.model, options.path, options.outtype)
    logger.info("wrote %s (%.1f MB, %s)", path, path.stat().st_size / 1e6, options.outtype)
    logger.info("checked: next-token logits on %d probe texts within %.3g of the model's (tolerance %.3g), "
                "token ids %s", check.probes, check.max_abs_logit_diff, check.tolerance,
                "the same" if check.same_tokens else "different")


def main(argv: list[str] | None = None) -> None:
    run(EXPORT, export, argv)


if __name__ == "__main__":
    main()
