"""Turn a TinyStories `.txt` file into train/validation CSV files with a `text` column (the seed project's
data preparation).

    python -m tsg.prepare TinyStoriesV2-GPT4-train.txt data/ --ndata 20000 --train_fraction 0.9

Each story is wrapped in start/end markers (default `<|startoftext|>` / `<|endoftext|>`); the first
`ndata` stories are shuffled with `split_random_seed` and split by `train_fraction` into
`OUTPUT_DIR/train.csv` and `OUTPUT_DIR/valid.csv`. Train on them with
`--train_file OUTPUT_DIR/train.csv --validation_file OUTPUT_DIR/valid.csv`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from datasets import Dataset

from tsg.data import read_tinystories_txt


def prepare(input_path: str, output_dir: str, ndata: int | None = None, train_fraction: float = 0.9,
            split_random_seed: int = 42, start_marker: str = "<|startoftext|>",
            end_marker: str = "<|endoftext|>") -> dict[str, int]:
    """Write OUTPUT_DIR/train.csv and valid.csv; returns the number of stories in each."""
    if not Path(input_path).is_file():
        raise ValueError(f"{input_path}: no such file")
    if ndata is not None and ndata < 1:
        raise ValueError(f"--ndata: expected a positive number of stories, got {ndata}")
    if not 0 < train_fraction <= 1:
        raise ValueError(f"--train_fraction: expected a number in (0, 1], got {train_fraction}")
    stories = (story for story in read_tinystories_txt(input_path) if story.strip())
    texts = [f"{start_marker}{story}{end_marker}" for story in itertools.islice(stories, ndata)]
    if not texts:
        raise ValueError(f"{input_path}: no stories (expected stories separated by <|endoftext|> lines)")
    dataset = Dataset.from_dict({"text": texts}).shuffle(seed=split_random_seed)
    n_train = max(1, round(len(texts) * train_fraction))
    splits = {"train": dataset.select(range(n_train))}
    if n_train < len(texts):
        splits["valid"] = dataset.select(range(n_train, len(texts)))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        tmp = out / f".{name}.csv.tmp"
        split.to_csv(str(tmp), index=False)
        tmp.replace(out / f"{name}.csv")
    if "valid" not in splits:  # no stale validation file from an earlier run beside the new train.csv
        (out / "valid.csv").unlink(missing_ok=True)
    return {"train": len(splits["train"]), "valid": len(splits.get("valid", []))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tsg.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="TinyStories .txt file (stories separated by <|endoftext|> lines)")
    parser.add_argument("output_dir", help="folder for train.csv and valid.csv")
    parser.add_argument("--ndata", type=int, default=None, help="use the first N stories (default: all)")
    parser.add_argument("--train_fraction", type=float, default=0.9, help="share of stories for training")
    parser.add_argument("--split_random_seed", type=int, default=42, help="seed of the shuffle before the split")
    parser.add_argument("--start_marker", default="<|startoftext|>", help="text put before each story")
    parser.add_argument("--end_marker", default="<|endoftext|>", help="text put after each story")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.input, args.output_dir, args.ndata, args.train_fraction, args.split_random_seed,
                         args.start_marker, args.end_marker)
    except ValueError as e:
        print(f"tsg.prepare: error: {e}", file=sys.stderr)
        sys.exit(2)
    written = "train.csv and valid.csv" if counts["valid"] else "train.csv (no stories left for valid.csv)"
    print(f"tsg.prepare: {counts['train']:,} training and {counts['valid']:,} validation stories "
          f"in {args.output_dir}: {written}")


if __name__ == "__main__":
    main()
