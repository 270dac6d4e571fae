"""Files tsg reads and writes, and the one error type of bad input.

Every output (a run's `run_config.json`, stories, reports, CSV splits, a merged model folder) is written through
`replaced_atomically`: into a temporary path beside the target, renamed into place only once complete, so that
an interrupted or failed write never leaves a half-written file where the output belongs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class UserError(ValueError):
    """Bad input (a config, data, a model folder, an option): the message is one line naming the file, key or value
    and what is expected. Commands print it as `tsg <cmd>: error: <message>` and exit with code 2."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """A library's error message on one line, cut to `limit` characters (for the end of a UserError message)."""
    return " ".join(str(error).split())[:limit]


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder into; when the block ends without an error it takes
    `path`'s place by a rename (a folder already there is moved aside first, then deleted). On an error the
    temporary path is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        yield tmp
        moved = tmp.is_dir() and path.is_dir()  # a rename cannot replace a folder that holds files
        if moved:
            path.rename(old)
        try:
            os.replace(tmp, path)
        except OSError:
            if moved:
                old.rename(path)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as the whole of the UTF-8 file `path`, atomically."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def text_lines(path: str | os.PathLike, key: str) -> Iterator[str]:
    """The lines of a UTF-8 text file, read as they are needed: the one place tsg reads text (configs, stories,
    prompts, banned words), so that a missing, unreadable or undecodable file is one UserError naming it (and `key`,
    the option that named the file), never a traceback."""
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                yield line
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (line {number + 1}; {key})") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({key})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: not a file ({key})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}; {key})") from None


def read_text(path: str | os.PathLike, key: str) -> str:
    """The whole of a UTF-8 text file (see text_lines)."""
    return "".join(text_lines(path, key))


def check_weights(folder: str | os.PathLike) -> None:
    """A UserError naming the first safetensors file in `folder` that is not whole (cut short by a full disk or an
    interrupted copy, or not safetensors at all): reading its header checks that the file covers every tensor."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "np"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: not a complete safetensors file ({one_line(e, 120)}): it was cut short or is "
                            "damaged; save or copy it again") from None


def read_lines(path: str | os.PathLike, key: str) -> list[str]:
    """The non-blank lines of a text file, stripped (prompts, banned words). `key` names the option in errors."""
    file = existing_file(path, key)
    lines = [line.strip() for line in read_text(file, key).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{path}: the file holds no lines ({key})")
    return lines


def existing_file(path: str | os.PathLike, key: str) -> Path:
    """`path` as a Path, or a UserError naming `key` when it is not a file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: {'not a file' if file.exists() else 'no such file'} ({key})")
    return file
