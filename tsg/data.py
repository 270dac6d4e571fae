"""Stories end to end: raw files or a hub data set -> `datasets.Dataset` of text -> tokens -> packed blocks.

Each stage can be run and inspected on its own:

    stories = load_stories(args, seed=0)               # DatasetDict of {"text"}, empty stories skipped
    tokens = tokenize_stories(stories, tokenizer)      # {"input_ids"}: each story ends in EOS (story_token_ids)
    blocks = pack_dataset(tokens, block_size, "isolated", pad_token_id)
    batch = BlockCollator("sdpa")(list(blocks["train"]))

Packing modes (`packing` in the config):
- isolated: stories are laid end to end in `block_size` rows; each story piece attends only to
  itself (block-diagonal causal mask) and its position ids restart at 0, so a packed story's logits
  equal its logits alone. A story that crosses a row boundary is split there; the piece in the next
  row starts again at position 0. The first token of each piece has no label (nothing to predict it
  from): the only labels lost, about one token a row.
- concat: plain concatenation, as run_clm's group_texts: tokens attend across story boundaries.
- pad: one story per row, padded to `block_size` (longer stories split), as the seed project did.

How a story becomes tokens is defined once, here (`story_text`, `story_token_ids`), for training and for
evaluation alike: the text stripped and a trailing end-of-story marker removed, tokenized without special tokens,
then the tokenizer's EOS token appended.

The story's own EOS keeps its label in every mode (in `isolated`, unless a row boundary falls right
before it): a model must learn to end a story.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, load_dataset

from tsg.config import StoryArguments
from tsg.files import UserError, existing_file, one_line, text_lines

# The end-of-story text: the line between two stories of a TinyStories .txt file, and the special token (BOS, EOS
# and pad) of the tokenizers tsg trains.
END_OF_STORY = "<|endoftext|>"
SAMPLE_FILE = Path(__file__).parent / "sample" / "tinystories_sample.txt"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100
MAP_BATCH_SIZE = 1000
# Story text (bytes of Arrow tables) above which tokenizing and packing use every core by default: below it, starting
# the processes costs more than they save (the 8.6 MB train_all.txt tokenizes in ~3 s on one).
PARALLEL_BYTES = 50e6


def read_tinystories_txt(path: str) -> Iterator[str]:
    """Stories of a TinyStories `.txt` file: each ends at a line that is exactly `<|endoftext|>`."""
    lines: list[str] = []
    for line in text_lines(path, "stories"):
        if line.strip() == END_OF_STORY:
            yield "".join(lines).strip()
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines).strip()


def story_text(text: str, eos_token: str) -> str:
    """The text of a story as it is tokenized: stripped, a trailing end-of-story marker (tsg prepare's) removed."""
    return text.strip().removesuffix(eos_token).rstrip()


def story_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each story's token ids: its story_text tokenized without special tokens (long stories are split later, by
    packing or scoring windows), then the EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: stories cannot be told apart")
    if not texts:
        return []
    ids = tokenizer([story_text(t, tokenizer.eos_token) for t in texts], add_special_tokens=False,
                    verbose=False)["input_ids"]
    return [story + [eos] for story in ids]


def _txt_generator(path: str, stamp: tuple):  # `stamp` (size, mtime) makes the datasets cache see edits
    for story in read_tinystories_txt(path):
        yield {"text": story}


def load_story_file(path: str, text_column: str = "text") -> Dataset:
    """One local file of stories as a Dataset with one column, `text`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file of stories")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        if next(read_tinystories_txt(str(file)), None) is None:
            raise UserError(f"{path}: no stories (the file is empty)")
        stat = file.stat()
        try:
            return Dataset.from_generator(
                _txt_generator, gen_kwargs={"path": str(file.resolve()), "stamp": (stat.st_size, stat.st_mtime_ns)}
            )
        except Exception as e:  # datasets wraps what the generator raised (a bad line: tsg's UserError)
            cause = e
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise UserError(str(cause)) from None
    if suffix not in FILE_BUILDERS:
        raise UserError(
            f"{path}: unknown story file type '{suffix}' (expected .txt with {END_OF_STORY} separators, "
            ".csv, .json, .jsonl or .parquet)"
        )
    try:
        dataset = load_dataset(FILE_BUILDERS[suffix], data_files=str(file), split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise UserError(f"{path}: could not be read as {suffix[1:]}: {one_line(e)}") from None
    return _text_only(dataset, text_column, str(path))


def _text_only(dataset: Dataset, text_column: str, source: str) -> Dataset:
    if text_column not in dataset.column_names:
        raise UserError(
            f"{source}: no '{text_column}' column (columns: {', '.join(dataset.column_names)}); "
            "set text_column to the one that holds the stories"
        )
    dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def _drop_empty(dataset: Dataset, source: str) -> tuple[Dataset, int]:
    kept = dataset.filter(
        lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]],
        batched=True,
        desc="Skipping empty stories",
    )
    if len(kept) == 0:
        raise UserError(f"{source}: no stories (the data set is empty or every story is blank)")
    return kept, len(dataset) - len(kept)


def load_stories(args: StoryArguments, seed: int) -> tuple[DatasetDict, dict]:
    """Training and validation stories as a DatasetDict of `text`, and counts of what was loaded."""
    if args.train_file:
        train_source = args.train_file
        splits = {"train": load_story_file(args.train_file, args.text_column)}
        if args.validation_file:
            splits["validation"] = load_story_file(args.validation_file, args.text_column)
    else:
        train_source = args.dataset_name
        hub = load_dataset(args.dataset_name, args.dataset_config_name)
        if "train" not in hub:
            raise UserError(f"dataset_name={args.dataset_name!r} has no 'train' split (splits: {', '.join(hub)})")
        splits = {"train": _text_only(hub["train"], args.text_column, args.dataset_name)}
        if "validation" in hub:
            splits["validation"] = _text_only(hub["validation"], args.text_column, args.dataset_name)
    counts = {"empty_stories_skipped": 0}
    for split in list(splits):
        source = args.validation_file if split == "validation" and args.validation_file else train_source
        splits[split], skipped = _drop_empty(splits[split], source)
        counts["empty_stories_skipped"] += skipped
    if "validation" not in splits and args.validation_split_percentage > 0:
        if len(splits["train"]) < 2:
            raise UserError(f"{train_source}: one story cannot be split into training and validation stories")
        parts = splits["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        splits = {"train": parts["train"], "validation": parts["test"]}
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    counts.update({f"{split}_stories": len(ds) for split, ds in splits.items()})
    return DatasetDict(splits), counts


def read_stories(path: str, max_stories: int | None = None, text_column: str = "text") -> tuple[list[str], int]:
    """(the stories of a story file, blank ones skipped, the first max_stories of them; how many were blank)."""
    dataset = load_story_file(path, text_column)
    texts, blank = [], 0
    for text in dataset["text"]:
        if isinstance(text, str) and text.strip():
            texts.append(text)
            if max_stories is not None and len(texts) >= max_stories:
                break
        else:
            blank += 1
    if not texts:
        raise UserError(f"{path}: no stories (the file is empty or every story is blank)")
    return texts, blank


def iter_stories(path: str, text_column: str = "text") -> Iterator[str]:
    """The stories of a story file, streamed (a .txt file is never held in memory whole). A file that cannot be
    read as stories is an error here, before the first story is asked for."""
    if Path(existing_file(path, "stories")).suffix.lower() == ".txt":
        return read_tinystories_txt(path)
    dataset = load_story_file(path, text_column)
    return (text for first in range(0, len(dataset), MAP_BATCH_SIZE)
            for text in dataset[first:first + MAP_BATCH_SIZE]["text"])


def split_stories(path: str, ndata: int | None, train_fraction: float, seed: int, start_marker: str,
                  end_marker: str) -> DatasetDict:
    """The seed project's data preparation: the first `ndata` stories of a TinyStories .txt file (blank ones
    skipped), each wrapped in the markers, split at random (seeded) into `train` (train_fraction of them, at least
    one) and `test` (the rest; no split when none is left)."""
    existing_file(path, "input_file")
    stories = (story for story in read_tinystories_txt(path) if story.strip())
    texts = [f"{start_marker}{story}{end_marker}" for story in itertools.islice(stories, ndata)]
    if not texts:
        raise UserError(f"{path}: no stories (expected stories separated by {END_OF_STORY} lines)")
    dataset = Dataset.from_dict({"text": texts})
    n_train = max(1, round(len(texts) * train_fraction))
    if n_train == len(texts):
        return DatasetDict({"train": dataset.shuffle(seed=seed)})
    return dataset.train_test_split(train_size=n_train, seed=seed)


def default_num_proc(stories: DatasetDict) -> int | None:
    """Processes for tokenizing and packing when preprocessing_num_workers is unset: one per usable core for story
    text over PARALLEL_BYTES, else None (in this process). The tables' sizes are read, not their rows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and sum(split.data.nbytes for split in stories.values()) > PARALLEL_BYTES else None


def tokenize_stories(stories: DatasetDict, tokenizer, num_proc: int | None = None,
                     overwrite_cache: bool = False) -> DatasetDict:
    """Token ids of every story, each ending in the tokenizer's EOS token (batched, cached)."""
    story_token_ids(tokenizer, [])  # a tokenizer without EOS stops here, before the map

    def tokenize(batch):
        return {"input_ids": story_token_ids(tokenizer, batch["text"])}

    return stories.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], load_from_cache_file=not overwrite_cache,
        desc="Tokenizing stories",
    )


def pack_stories(stories: list[list[int]], block_size: int, packing: str, pad_token_id: int) -> dict[str, np.ndarray]:
    """Rows of exactly `block_size` tokens from whole stories (see the module doc for the modes).

    Returns input_ids, attention_mask (1 = real token), labels (-100 = no loss) and, for
    `isolated`, position_ids that restart at 0 at every story piece.
    """
    if packing == "pad":
        pieces = [s[i : i + block_size] for s in stories for i in range(0, len(s), block_size)]
        ids = np.full((len(pieces), block_size), pad_token_id, dtype=np.int64)
        real = np.zeros((len(pieces), block_size), dtype=bool)
        for row, piece in enumerate(pieces):
            ids[row, : len(piece)] = piece
            real[row, : len(piece)] = True
        labels = np.where(real, ids, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": real.astype(np.int64), "labels": labels}
    if packing not in ("isolated", "concat"):
        raise ValueError(f"packing: expected isolated, concat or pad, got {packing!r}")
    lengths = np.array([len(s) for s in stories], dtype=np.int64)
    total = int(lengths.sum())
    n_rows = -(-total // block_size)
    ids = np.full(n_rows * block_size, pad_token_id, dtype=np.int64)
    if total:
        ids[:total] = np.concatenate([np.asarray(s, dtype=np.int64) for s in stories])
    real = np.arange(n_rows * block_size) < total
    labels = np.where(real, ids, IGNORE_INDEX)
    rows = {"input_ids": ids, "attention_mask": real.astype(np.int64), "labels": labels}
    if packing == "isolated":
        index = np.arange(n_rows * block_size)
        starts = np.zeros(n_rows * block_size, dtype=bool)
        starts[np.cumsum(lengths)[:-1]] = True  # a story begins
        starts[0::block_size] = True  # a row begins: the piece in it restarts
        starts[~real] = True  # each pad token is a segment of its own
        position_ids = index - np.maximum.accumulate(np.where(starts, index, 0))
        labels[starts] = IGNORE_INDEX
        rows["position_ids"] = position_ids
    return {key: value.reshape(n_rows, block_size) for key, value in rows.items()}


def pack_dataset(tokens: DatasetDict, block_size: int, packing: str, pad_token_id: int,
                 num_proc: int | None = None, overwrite_cache: bool = False) -> DatasetDict:
    """Packed rows of `block_size` tokens for every split (batched, cached)."""
    return tokens.map(
        lambda batch: pack_stories(batch["input_ids"], block_size, packing, pad_token_id),
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        num_proc=num_proc,
        remove_columns=["input_ids"],
        load_from_cache_file=not overwrite_cache,
        desc=f"Packing stories ({packing}, {block_size} tokens)",
    )


def describe(stories: DatasetDict, tokens: DatasetDict, blocks: DatasetDict, counts: dict, block_size: int) -> dict:
    """What was loaded, per split: stories, tokens, blocks and the share of pad tokens."""
    summary = {"empty_stories_skipped": counts["empty_stories_skipped"]}
    for split in blocks:
        n_tokens = pc.sum(pc.list_value_length(tokens[split].data.column("input_ids"))).as_py() or 0
        n_blocks = len(blocks[split])
        summary[split] = {
            "stories": len(stories[split]),
            "tokens": int(n_tokens),
            "blocks": n_blocks,
            "pad_share": 1 - n_tokens / max(1, n_blocks * block_size),
        }
    return summary


def count_bytes(stories: Dataset) -> int:
    """UTF-8 bytes of all story texts (of the rows selected: a split's table may hold other rows too)."""
    text = stories.with_format("arrow")[:]["text"]
    return pc.sum(pc.binary_length(pc.cast(text, pa.binary()))).as_py() or 0


def count_labels(blocks: Dataset) -> int:
    """Tokens that carry a label (are predicted) in packed blocks."""
    labels = blocks.with_format("arrow")[:]["labels"]
    return pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0


def block_causal_mask(position_ids: torch.Tensor, additive: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 1, L, L) causal mask in which each piece (positions restarting at 0) sees only itself.

    Boolean (True = attend) for sdpa; additive (0 or the dtype's minimum) for eager attention.
    """
    segment = torch.cumsum(position_ids == 0, dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class BlockCollator:
    """Stacks packed rows into a batch; for `isolated` rows, adds the mask that keeps stories apart.

    With flash attention the batch is flattened into one row of B x block_size tokens and the
    restarted position ids delimit the stories (transformers' varlen path, as DataCollatorWithFlattening).
    `pad_to_longest` cuts the padding columns that no row of the batch needs: `pad` rows then come padded to the
    batch's longest story instead of `block_size` (the benchmark compares both).
    """

    attn_implementation: str = "sdpa"
    pad_to_longest: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {key: torch.tensor(np.array([row[key] for row in rows])) for key in rows[0]}
        if self.pad_to_longest:
            longest = int(batch["attention_mask"].sum(dim=1).max())
            batch = {key: value[:, :longest] for key, value in batch.items()}
        if "position_ids" in batch:
            if self.attn_implementation.startswith("flash_attention"):
                del batch["attention_mask"]
                batch = {key: value.reshape(1, -1) for key, value in batch.items()}
            else:
                additive = not self.attn_implementation.startswith("sdpa")  # sdpa and sdpa_by_story: boolean
                batch["attention_mask"] = block_causal_mask(batch["position_ids"], additive)
        return batch
