"""Nothing lost, nothing left running (issue 16, first part): what a fault leaves behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import alive
from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError
from dbench.record import CHECKPOINT, RunDir

DBENCH = str(Path(sys.executable).parent / "dbench")
CFG = dict(model="mlp", epochs=2, batch_size=512, sigma_every=0)


def test_a_second_run_with_the_same_out_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    with RunDir.claim(out):  # another process is planning this run right now
        start = time.monotonic()
        with pytest.raises(DbenchError, match=f"another dbench run is already creating {out}"):
            runner.start(RunConfig(**CFG), out, quiet=True)
        assert time.monotonic() - start < 1.0  # refused before any set-up
    assert not out.exists()


def test_bad_input_leaves_no_folder_and_no_claim_behind(tmp_path):
    with pytest.raises(DbenchError):
        runner.start(RunConfig(**{**CFG, "split": "9,9"}), tmp_path / "new" / "deeper" / "run", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_left_by_a_killed_write_is_removed_on_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**CFG), out, quiet=True, on_epoch_end=lambda done: (_ for _ in ()).throw(KeyboardInterrupt))
    stale = out / f".{CHECKPOINT}.k1ll3d"
    stale.write_bytes(b"half a checkpoint")  # what SIGKILL during torch.save leaves
    runner.resume(out, quiet=True)
    assert not stale.exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stopping_during_set_up_marks_the_run_interrupted(tmp_path, monkeypatch):
    from dbench import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data loads and the model is built

    monkeypatch.setattr(run_module, "build", interrupted)
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**CFG), tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"


def test_workers_stop_by_themselves_when_the_launcher_dies(tmp_path):
    """SIGKILL the launcher mid-epoch: its module processes end within seconds and the run is marked
    interrupted (resumable), never completed with nobody supervising it."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [DBENCH, "run", "--engine", "distributed", "--gpus", "2", "--model", "mlp", "--epochs", "50", "--quiet",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    summary = out / "summary.json"
    deadline = time.monotonic() + 120
    while not (summary.exists() and json.loads(summary.read_text())["epochs_done"] >= 1):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = [int(line.split()[0]) for line in subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(launcher.pid)], capture_output=True, text=True
    ).stdout.splitlines() if "spawn_main" in line]
    assert len(workers) == 2
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "module processes outlived their launcher"
        time.sleep(0.1)
    recorded = json.loads(summary.read_text())
    assert recorded["status"] == "interrupted"
    # resumable: the checkpoint, the metrics and the summary tell the same story
    import torch

    checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint["epochs_done"] == recorded["epochs_done"] == len([r for r in rows if r["kind"] == "epoch"]) >= 1

