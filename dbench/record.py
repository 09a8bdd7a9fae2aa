"""The run directory: what a run writes, written atomically, and read back to resume.

results/<run-id>/
    config.json       the resolved RunConfig, partition and devices
    environment.json  versions, devices, git revision
    metrics.jsonl     one JSON row per epoch ("kind": "epoch", with per-module time and
                      memory) and one per σ probe ("kind": "probe")
    summary.json      status (running|complete|interrupted|failed|diverged) and results,
                      with per-module totals, peak memory and mean σ
    summary.md        the same for a reader: tables with units (see dbench.run_tables)
    checkpoint.pt     trainer state after the last finished epoch (for --resume)

Every file is replaced atomically (write a temporary file beside it, then
rename), so a crash or Ctrl-C never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dbench.errors import DbenchError

from dbench.files import (CHECKPOINT, CONFIG, ENVIRONMENT, METRICS, SUMMARY, Unreadable, atomic_write_bytes,
                          atomic_write_json, cannot_write, read_rows)
from dbench.files import read_json as read_any

__all__ = ["CHECKPOINT", "CONFIG", "ENVIRONMENT", "METRICS", "SUMMARY", "RunDir", "atomic_write_bytes",
           "atomic_write_json", "cannot_write", "read_json", "writable_folder"]


def _checkpoint_problem(state) -> str | None:
    """What is wrong with a checkpoint's shape (None: nothing): every key a resume reads, with its type."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    if not isinstance(state.get("epochs_done"), int) or state["epochs_done"] < 0:
        return "no whole number epochs_done"
    trainer = state.get("trainer")
    if not isinstance(trainer, dict):
        return "no trainer state"
    if not isinstance(trainer.get("iteration"), int):
        return "the trainer state has no whole number iteration"
    engine = trainer.get("engine")
    if not isinstance(engine, dict) or not isinstance(engine.get("stages"), list) or not all(
            isinstance(s, dict) for s in engine["stages"]):
        return "the trainer state has no list of module states"
    partial = state.get("partial")
    if partial is not None and not (isinstance(partial, dict) and isinstance(partial.get("step"), int)):
        return "a mid-epoch part without a whole number step"
    return None


def folder_can_be(path: Path, what: str) -> None:
    """Check, creating nothing, that ``path`` is or can become a folder: no file or dangling link on its way,
    and a path the system can look up at all (not too long, no loop of links); else one line naming it."""
    try:
        for folder in (path, *path.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise DbenchError(f"cannot write {what} {path}: {folder} is a file, not a folder")
                break
            if folder.is_symlink():  # a link to nothing, or into a loop of links: mkdir would say "File exists"
                raise DbenchError(f"cannot write {what} {path}: {folder} is a symbolic link that leads nowhere "
                                  f"(a loop of links, or a link to a missing place)")
    except OSError as e:
        raise DbenchError(f"cannot write {what} {path}: {e.strerror or e}") from None


def writable_folder(path: Path, what: str) -> None:
    """Make folder ``path`` (and its parents) if missing and check that a file can be written in it.

    Called before any work, so that a read-only or impossible output place fails in one line at
    once, not after hours of training. ``what`` names the folder for the message ("--out", say).
    """
    path = Path(path)
    folder_can_be(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DbenchError(f"cannot write {what} {path}: {e.strerror or e}") from None


def read_json(path: Path) -> Any:
    """A run's JSON file (its shape checked by the reader: dbench.plan, dbench.run), its damage said as a
    one-line DbenchError with what to do."""
    try:
        return read_any(path)
    except Unreadable as e:
        if e.reason == "is missing":
            raise DbenchError(f"{path} is missing: not a dbench run directory") from None
        if e.reason.startswith("is not text"):
            raise DbenchError(f"{path} {e.reason}: the file is damaged") from None
        raise


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, files: dict[str, Any]) -> "RunDir":
        """Make the directory with its first files in one rename, so it never exists half-made."""
        path = Path(path)
        if path.exists():
            raise DbenchError(f"run directory {path} already exists: pass --resume {path} to continue it, or another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for name, obj in files.items():
                atomic_write_json(staging / name, obj)
            os.rename(staging, path)
        except BaseException:
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
            raise
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise DbenchError(f"cannot resume {path}: no {CONFIG} there (not a dbench run directory)")
        return run

    def check_writable(self) -> None:
        """Before resuming: every file of the run is replaced by a write beside it, so the folder must take one."""
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as e:
            raise DbenchError(f"cannot resume {self.path}: the folder cannot be written ({e.strerror or e})") from None

    @staticmethod
    @contextlib.contextmanager
    def claim(path: Path):
        """Hold the name ``path`` for a run this process is about to create: a second ``dbench run`` with the
        same ``--out`` is refused at once instead of after its whole set-up.

        The claim is an flock on a hidden file beside ``path`` (the OS drops it if the process dies); the
        file is removed when the claim ends.
        """
        path = Path(path)
        folder_can_be(path.parent, "the run directory's folder")  # first: a path the system cannot look up
        made = [p for p in reversed(path.parents) if not p.exists()]  # folders this claim creates
        marker = path.parent / f".{path.name}.claim"
        try:
            writable_folder(path.parent, "the run directory's folder")
            with open(marker, "a+b") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise DbenchError(f"another dbench run is already creating {path}: choose another --out") from None
                try:
                    yield
                finally:
                    marker.unlink(missing_ok=True)
        finally:
            if not path.exists():  # nothing was created: leave no empty folder behind either
                for folder in reversed(made):
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the run for this process: a second process training it would interleave writes.

        The lock is on config.json, which is written once and never replaced,
        so no lock file is left behind; the OS drops it if the process dies.
        """
        with open(self.path / CONFIG, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DbenchError(f"run {self.path} is being trained by another process; wait for it or stop it first") from None
            yield

    def read(self, name: str) -> Any:
        return read_json(self.path / name)

    def write(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.path / name, text.encode())

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; a damaged file is a one-line error naming the line."""
        path = self.path / METRICS
        try:
            numbered = read_rows(path)
        except Unreadable as e:
            if e.reason.endswith("is not a JSON object"):
                raise DbenchError(f"{e.path} {e.reason.removesuffix(' is not a JSON object')} is not a dbench "
                                  "metrics row: repair or remove that line, or start the run again") from None
            fix = "repair or remove that line" if e.reason.startswith("line ") else "restore it from a backup"
            raise DbenchError(f"{e}: the file is damaged; {fix}, or start the run again") from None
        for n, row in numbered:
            if not isinstance(row.get("epoch"), int):
                raise DbenchError(f"{path} line {n} is not a dbench metrics row (no epoch number): repair or "
                                  "remove that line, or start the run again")
        return [row for _, row in numbered]

    def write_metrics(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / METRICS, text.encode())

    def save_checkpoint(self, state: dict) -> None:
        # Serialized in memory first: torch.save into a file that cannot grow (a full disk) fails with
        # an unreadable message from its zip writer; the plain write then says what went wrong.
        import torch  # here: the readers of run directories (reports) need no torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path / CHECKPOINT, buffer.getbuffer())

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed process left mid-write (``.<name>.XXXX``); returns them.

        Call only while holding the run (``exclusive``): then no other process is writing one.
        """
        stale = [p for p in self.path.iterdir() if p.is_file() and p.name.startswith(".")
                 and any(p.name.startswith(f".{name}.") for name in (CONFIG, ENVIRONMENT, METRICS, SUMMARY, CHECKPOINT))]
        for p in stale:
            p.unlink()
        return stale

    def load_checkpoint(self, mmap: bool = False) -> dict | None:
        """The checkpoint, or None if the run has none yet; a damaged one is a one-line error naming it.

        ``mmap``: map the file instead of reading every tensor (to read a number or two from it).
        """
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
            raise DbenchError(f"{path} is damaged and cannot be read ({type(e).__name__}): restore it from a "
                              "backup, or delete it to train the run again from its first epoch") from None
        problem = _checkpoint_problem(state)
        if problem:
            raise DbenchError(f"{path} is not a dbench checkpoint ({problem}): restore it from a backup, or delete "
                              "it to train the run again from its first epoch")
        return state

    def checkpointed(self) -> tuple[int, int]:
        """``(finished epochs, steps of the next epoch)`` in the checkpoint; ``(0, 0)`` without one."""
        state = self.load_checkpoint(mmap=True)
        if state is None:
            return 0, 0
        return state["epochs_done"], (state.get("partial") or {}).get("step", 0)
