"""The run directory's file names and the one way dbench reads and writes its JSON files.

Torch-free (the reports and results read run directories where torch is slow to import or absent):
``dbench.record`` (the run directory of a training run), ``dbench.summary``, ``dbench.results``,
``dbench.check`` and the data cache all read and write through here. Every file is replaced atomically
(written beside it, fsynced, then renamed), so a crash or Ctrl-C never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dbench.errors import DbenchError

# A run directory's files (see dbench.record).
CONFIG = "config.json"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"


class Unreadable(DbenchError):
    """A JSON file is missing, unreadable or damaged; ``reason`` says which, without the path (each reader
    adds what the user can do about it)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason
        self.args = (path, reason)  # it pickles with the arguments it is built from


def _text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise Unreadable(path, "is missing") from None
    except UnicodeDecodeError:
        raise Unreadable(path, "is not text (not UTF-8)") from None
    except OSError as e:
        raise Unreadable(path, f"cannot be read ({e.strerror or e})") from None


def read_json(path: Path) -> Any:
    """The JSON value in file ``path`` (its shape is the caller's to check); Unreadable (a DbenchError) if
    missing, unreadable or not JSON."""
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise Unreadable(path, f"is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_object(path: Path) -> dict:
    """The JSON object in file ``path``; Unreadable (a DbenchError) if missing, unreadable or damaged."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise Unreadable(path, f"is not a JSON object (it holds a {type(data).__name__})")
    return data


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a JSON-lines file with their line numbers (blank lines skipped; a missing file has
    none); Unreadable naming the first damaged line."""
    if not Path(path).exists():
        return []
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise Unreadable(path, f"line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise Unreadable(path, f"line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def cannot_write(path: Path, e: OSError) -> DbenchError:
    """A failed write as one line: the file, and the system's reason (disk full, read-only, permission)."""
    return DbenchError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` or leave it as it was: written beside it, fsynced, then renamed.

    A failed write (a full disk, say) removes its temporary file and raises a one-line DbenchError.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise cannot_write(path, e) from None
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
