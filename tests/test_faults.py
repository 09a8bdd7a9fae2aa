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

from conftest import alive, interrupted_at_step, module_processes, run_cli
from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError
from dbench.record import CHECKPOINT, RunDir

DBENCH = str(Path(sys.executable).parent / "dbench")
CFG = dict(model="mlp", epochs=2, batch_size=512, sigma_every=0, dataset="synthetic-small")


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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, as intended
def test_a_stop_swallowed_by_a_destructor_stops_the_run_at_its_next_step(tmp_path, monkeypatch):
    """A signal handler's KeyboardInterrupt that lands in a __del__ (the memory meter runs thousands an iteration) is
    dropped by Python ("Exception ignored") and a `kill` during set-up was seen to leave the run training. The request
    the handler noted stops the run at its next step instead, marked interrupted and resumable."""
    from dbench import interrupts

    monkeypatch.setattr(interrupts, "requested", False)

    class LandsHere:
        def __del__(self):
            interrupts.request()

    LandsHere()  # the handler runs inside a destructor: Python prints the exception and carries on
    assert interrupts.requested
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**CFG), tmp_path / "run", quiet=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary.get("epochs_done", 0) == 0


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


# Every launcher of a distributed run: (the command before `run`'s arguments, what names its workers in `ps`).
LAUNCHERS = {
    "dbench": ([DBENCH], "forkserver"),
    "torchrun": ([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", DBENCH],
                 "dbench"),
}


@pytest.mark.parametrize("launcher_name", sorted(LAUNCHERS))
def test_workers_stop_by_themselves_when_their_launcher_dies(tmp_path, launcher_name):
    """SIGKILL the launcher (dbench's own, or torchrun's agent) mid-epoch: its module processes end within
    seconds and the run is marked interrupted (resumable), never completed with nobody supervising it."""
    prefix, marker = LAUNCHERS[launcher_name]
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [*prefix, "run", "--engine", "distributed", "--split", "blocks", "--gpus", "2", "--model", "mlp",
         "--dataset", "synthetic-small", "--batch-size", "512", "--epochs", "50", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = out / "summary.json"
    deadline = time.monotonic() + 180
    while not (summary.exists() and json.loads(summary.read_text())["epochs_done"] >= 1):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = module_processes(launcher.pid, marker)
    assert len(workers) == 2
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"module processes outlived their launcher ({launcher_name})"
        time.sleep(0.1)
    recorded = json.loads(summary.read_text())
    assert recorded["status"] == "interrupted"
    # resumable: the checkpoint, the metrics and the summary tell the same story
    import torch

    checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint["epochs_done"] == recorded["epochs_done"] == len([r for r in rows if r["kind"] == "epoch"]) >= 1


# --------------------------------------------------------------------------- mid-epoch checkpoints


def _numbers(path: Path) -> list[dict]:
    from test_resume import numbers

    return numbers(path)


@pytest.mark.parametrize("method", ["fr", "ddg", "2bw"])  # 2bw: micro-batches in flight at the cut
def test_a_run_stopped_inside_an_epoch_resumes_from_its_last_mid_epoch_checkpoint(tmp_path, monkeypatch, method):
    """--checkpoint-every N: a stop loses at most N steps, and the resumed run ends with the numbers of an
    unbroken one (losses, accuracies, σ probes, per-module memory; timings aside)."""
    cfg = dict(method=method, model="mlp", gpus=3, epochs=2, batch_size=100, seed=1,
               dataset="synthetic-small")  # 20 steps an epoch
    whole = runner.start(RunConfig(**cfg), tmp_path / "whole", quiet=True)

    cut = tmp_path / "cut"
    # step 11 of epoch 2: two steps after its checkpoint at step 9
    with interrupted_at_step(monkeypatch, 20 + 11), \
            pytest.raises(runner.RunInterrupted, match=r"1 finished epoch\(s\) and 9 step\(s\) of epoch 2"):
        runner.start(RunConfig(**cfg, checkpoint_every=3), cut, quiet=True)
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    runner.resume(cut, quiet=True)
    assert _numbers(cut) == _numbers(whole)


def test_checkpoint_every_must_be_a_number_of_steps(tmp_path):
    with pytest.raises(DbenchError, match="bad --checkpoint-every -1"):
        runner.start(RunConfig(**CFG, checkpoint_every=-1), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- full disk, unwritable places


def _limited_file_size(limit: int):
    """In the child: files cannot grow beyond ``limit`` bytes (writes fail with EFBIG, as on a full disk)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_and_marks_the_run_failed(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([DBENCH, "run", "--model", "mlp", "--epochs", "2", "--sigma-every", "0", "--quiet",
                           "--dataset", "synthetic-small", "--out", str(out)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300,
                          preexec_fn=_limited_file_size(200_000))  # the run's JSON files fit; its checkpoint not
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"cannot write {out / CHECKPOINT}" in done.stderr and "File too large" in done.stderr
    recorded = json.loads((out / "summary.json").read_text())
    assert recorded["status"] == "failed" and recorded["epochs_done"] == 0
    # nothing half-written: no checkpoint, no temporary file, no metrics row for the epoch it lost
    assert not (out / CHECKPOINT).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "epoch"]


@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    """A folder nothing can be written in. As root, permissions do not stop writes, so there the
    system calls that create files and folders under it fail as the kernel would (EACCES)."""
    import errno

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_open, real_mkdir = os.open, os.mkdir

        def denied(path):
            return Path(os.path.abspath(path)).is_relative_to(folder)

        def fake_open(path, flags, *args, **kwargs):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and denied(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if denied(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    yield folder
    folder.chmod(0o755)


def test_run_into_an_unwritable_folder_is_one_line_before_any_work(unwritable, monkeypatch, capsys):
    from dbench import run as run_module

    monkeypatch.setattr(run_module.planning, "make", lambda *a, **k: pytest.fail("the set-up started"))
    code, _, err = run_cli(["run", "--model", "mlp", "--out", str(unwritable / "run")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write the run directory's folder {unwritable}" in err and "Permission denied" in err
    assert list(unwritable.iterdir()) == []


def test_run_out_under_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "hostname"
    blocker.write_text("a file\n")
    code, _, err = run_cli(["run", "--model", "mlp", "--out", str(blocker / "run")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and f"{blocker} is a file, not a folder" in err


def test_report_into_an_unwritable_folder_is_one_line(tmp_path, unwritable, monkeypatch, capsys):
    finished = runner.start(RunConfig(**{**CFG, "epochs": 1}), tmp_path / "runs" / "a", quiet=True)
    code, _, err = run_cli(["report", str(finished.parent), "--out", str(unwritable / "report")], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"cannot write the report's --out {unwritable / 'report'}" in err.splitlines()[-1]
    assert list(unwritable.iterdir()) == []


def test_resume_of_an_unwritable_run_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "run"
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**CFG), out, quiet=True, on_epoch_end=lambda done: (_ for _ in ()).throw(KeyboardInterrupt))
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the run's folder is on a read-only file system
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and Path(os.path.abspath(path)).is_relative_to(out):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    from dbench import run as run_module

    monkeypatch.setattr(run_module, "build", lambda *a, **k: pytest.fail("the set-up started"))
    code, _, err = run_cli(["run", "--resume", str(out)], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot resume {out}: the folder cannot be written (Read-only file system)" in err


# --------------------------------------------------------------------------- damaged run files on --resume


def _interrupted_after_one_epoch(path: Path) -> Path:
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**CFG), path, quiet=True, on_epoch_end=lambda done: (_ for _ in ()).throw(KeyboardInterrupt))
    return path


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / CHECKPOINT).write_bytes(b"junk"), "checkpoint.pt is damaged and cannot be read"),
    (lambda p: (p / CHECKPOINT).write_bytes((p / CHECKPOINT).read_bytes()[:5000]), "checkpoint.pt is damaged"),
    (lambda p: (p / "metrics.jsonl").write_text((p / "metrics.jsonl").read_text()[:-40]), "metrics.jsonl line"),
    (lambda p: (p / "metrics.jsonl").write_text(
        "".join((p / "metrics.jsonl").read_text().splitlines(keepends=True)[:-1])),
     "holds the rows of epochs none but the checkpoint has 1 finished epoch(s)"),
], ids=["junk-checkpoint", "truncated-checkpoint", "metrics-cut-mid-line", "metrics-lost-its-last-row"])
def test_resume_of_a_damaged_run_names_the_file(tmp_path, monkeypatch, capsys, damage, expected):
    out = _interrupted_after_one_epoch(tmp_path / "run")
    damage(out)
    code, _, err = run_cli(["run", "--resume", str(out)], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err and str(out) in err


def test_binary_run_files_are_named_not_crashed_on(tmp_path, monkeypatch, capsys):
    out = _interrupted_after_one_epoch(tmp_path / "run")
    (out / "summary.json").write_bytes(b"\xff\xfe\x00binary")
    code, _, err = run_cli(["run", "--resume", str(out)], monkeypatch, capsys)
    assert code == 2 and "summary.json is not text (not UTF-8)" in err and "Traceback" not in err
    code, _, err = run_cli(["report", str(out), "--out", str(tmp_path / "report")], monkeypatch, capsys)
    assert "summary.json is not text (not UTF-8)" in err and "Traceback" not in err


PATH_CASES = {
    "run --out": ["run", "--model", "mlp", "--epochs", "1", "--out", "{p}/run"],
    "run --resume": ["run", "--resume", "{p}"],
    "run --data-dir": ["run", "--model", "resnet8", "--dataset", "cifar10", "--data-dir", "{p}", "--out", "{tmp}/r"],
    "run --split from:": ["run", "--model", "mlp", "--gpus", "2", "--split", "from:{p}", "--out", "{tmp}/r"],
    "report": ["report", "{p}", "--out", "{tmp}/report"],
    "compare": ["compare", "{p}"],
    "project": ["project", "{p}"],
    "suite --file": ["suite", "smoke", "--file", "{p}"],
}


@pytest.mark.parametrize("refusal", ["too-long", "link-loop"])
@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_every_user_path_the_os_refuses_is_one_line_exit_2(tmp_path, case, refusal, monkeypatch, capsys):
    """Every path a user gives, × every way the OS refuses to look one up (a name longer than the file
    system takes; a loop of symbolic links): one line, exit 2, no traceback, nothing written."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    if refusal == "too-long":
        bad = work / ("x" * 300)
    else:
        os.symlink(work / "b", work / "a")
        os.symlink(work / "a", work / "b")
        bad = work / "a" / "inside"
    before = sorted(p.name for p in work.iterdir())
    args = [a.replace("{p}", str(bad)).replace("{tmp}", str(tmp_path)) for a in PATH_CASES[case]]
    code, _, err = run_cli(args, monkeypatch, capsys, cwd=work)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in work.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
