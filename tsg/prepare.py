"""`tsg prepare`: turn a TinyStories `.txt` file into train/validation CSV files with a `text` column, each story
wrapped in start/end markers (the seed project's data preparation).

    tsg prepare TinyStoriesV2-GPT4-train.txt data/ --ndata 20000 --train_fraction 0.9   # data/train.csv, valid.csv
    tsg prepare -c dataprep.toml                     # the seed's config: outname X.csv -> X_train.csv, X_test.csv

The first `ndata` stories are shuffled with `split_random_seed` and split by `train_fraction`. Train on them with
`--train_file data/train.csv --validation_file data/valid.csv`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tsg.config import Command, SeedKey, option, run
from tsg.data import END_OF_STORY, split_stories
from tsg.files import UserError, replaced_atomically

logger = logging.getLogger("tsg")


@dataclass
class PrepareArguments:
    input_file: Optional[str] = option(None, f"TinyStories .txt file (stories separated by {END_OF_STORY} lines).")
    output_dir: Optional[str] = option(None, "Folder for train.csv and valid.csv.")
    output_file: Optional[str] = option(None, "Or: one CSV name X.csv; the splits are X_train.csv and X_test.csv "
                                        "beside it.")
    ndata: Optional[int] = option(None, "Use the first N stories (default: all).")
    train_fraction: float = option(0.9, "Share of the stories for training.")
    split_random_seed: int = option(42, "Seed of the shuffle before the split.")
    start_marker: str = option("<|startoftext|>", "Text put before each story.")
    end_marker: str = option(END_OF_STORY, "Text put after each story.")

    def __post_init__(self):
        if not self.input_file:
            raise UserError("input_file: required (tsg prepare INPUT_FILE OUTPUT_DIR)")
        if bool(self.output_dir) == bool(self.output_file):
            raise UserError("give output_dir (train.csv, valid.csv) or output_file (X_train.csv, X_test.csv), "
                            "one of them")
        if self.output_file and Path(self.output_file).suffix.lower() != ".csv":
            raise UserError(f"output_file {self.output_file}: expected a .csv file name")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UserError(f"output_dir {self.output_dir}: not a folder")
        if self.ndata is not None and self.ndata < 1:
            raise UserError(f"ndata: expected a positive number of stories, got {self.ndata}")
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"train_fraction: expected a number in (0, 1], got {self.train_fraction}")

    def outputs(self) -> dict[str, Path]:
        """Where each split goes: train, and test (the held-out stories)."""
        if self.output_dir:
            return {"train": Path(self.output_dir) / "train.csv", "test": Path(self.output_dir) / "valid.csv"}
        file = Path(self.output_file)
        return {split: file.with_name(f"{file.stem}_{split}.csv") for split in ("train", "test")}


PREPARE = Command(
    name="prepare",
    types=(PrepareArguments,),
    description=__doc__,
    positional=("input_file", "output_dir"),
    seed_keys={"input_name": SeedKey("input_file"), "outname": SeedKey("output_file"),
               "starter": SeedKey("start_marker"), "ender": SeedKey("end_marker")},
)


def prepare(options: PrepareArguments) -> dict[str, int]:
    """Write the splits as CSV (atomically); returns how many stories went into each."""
    splits = split_stories(options.input_file, options.ndata, options.train_fraction, options.split_random_seed,
                           options.start_marker, options.end_marker)
    for name, path in options.outputs().items():
        try:
            if name in splits:
                with replaced_atomically(path) as tmp:
                    splits[name].to_csv(str(tmp), index=False)
            else:  # no stale held-out file from an earlier run beside the new training file
                path.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    counts = {name: len(splits[name]) if name in splits else 0 for name in ("train", "test")}
    written = " and ".join(str(path) for name, path in options.outputs().items() if counts[name])
    logger.info("%s training and %s held-out stories: %s", f"{counts['train']:,}", f"{counts['test']:,}", written)
    return counts


def main(argv: list[str] | None = None) -> None:
    run(PREPARE, prepare, argv)


if __name__ == "__main__":
    main()
