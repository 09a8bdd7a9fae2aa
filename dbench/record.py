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
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dbench.errors import DbenchError

CONFIG = "config.json"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
from dbench.summary import SUMMARY  # noqa: E402  (written here, computed and read by dbench.summary)
CHECKPOINT = "checkpoint.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DbenchError(f"{path} is missing: not a dbench run directory") from None
    except json.JSONDecodeError as e:
        raise DbenchError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


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

    @staticmethod
    @contextlib.contextmanager
    def claim(path: Path):
        """Hold the name ``path`` for a run this process is about to create: a second ``dbench run`` with the
        same ``--out`` is refused at once instead of after its whole set-up.

        The claim is an flock on a hidden file beside ``path`` (the OS drops it if the process dies); the
        file is removed when the claim ends.
        """
        path = Path(path)
        made = [p for p in reversed(path.parents) if not p.exists()]  # folders this claim creates
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = path.parent / f".{path.name}.claim"
        try:
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
                    if folder.exists() and not any(folder.iterdir()):
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
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / METRICS, text.encode())

    def save_checkpoint(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint, as every run file
            os.replace(tmp, self.path / CHECKPOINT)
        except BaseException:
            os.unlink(tmp)
            raise

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed process left mid-write (``.<name>.XXXX``); returns them.

        Call only while holding the run (``exclusive``): then no other process is writing one.
        """
        stale = [p for p in self.path.iterdir() if p.is_file() and p.name.startswith(".")
                 and any(p.name.startswith(f".{name}.") for name in (CONFIG, ENVIRONMENT, METRICS, SUMMARY, CHECKPOINT))]
        for p in stale:
            p.unlink()
        return stale

    def load_checkpoint(self) -> dict | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
