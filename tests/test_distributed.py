"""The distributed engine: same numbers as the local engine, and a clean end when a module process dies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import alive, group, module_processes
from distributed_workers import PROBE_AT, RANGES, WORKLOADS, equivalence_worker
from dbench import Trainer
from dbench.cpus import module_shares, usable_cpus
from dbench.engine.launch import free_port
from dbench.meters import STATES
from dbench.method import MODEL_PARALLEL
from dbench.registry import METHODS

# one process holds the K modules (the data-parallel methods have their own tests: test_ddp.py)
ALL_METHODS = sorted(name for name, cls in METHODS.items()  # every method the local engine runs too
                     if cls.parallelism == MODEL_PARALLEL and "local" in cls.engines)
DBENCH = str(Path(sys.executable).parent / "dbench")


def local_reference(method: str, k: int, workload: str = "image") -> dict:
    """What the distributed workers must reproduce: the local engine on the same model and batches."""
    blocks, batches_of, classes = WORKLOADS[workload]
    train, probe, test_x = batches_of()
    t = Trainer(group(blocks(), RANGES[k]), method, lr=0.05, momentum=0.9, num_classes=classes, measure=True)
    losses, sigma = [], None
    for i, (x, y) in enumerate(train):
        if i == PROBE_AT:
            out, sigma, _ = t.sigma_step(x, y, probe)
        else:
            out = t.step_output(x, y)
        if out is not None:  # None: no batch scored in this iteration (FDG's first K-1), as in the worker
            losses.append(out.loss)
    return {"losses": losses, "state": t.state_dict(), "logits": t.predict(test_x),
            "sigma": [(r.sigma, r.sigma_corrected, r.cosine) for r in sigma]}


def assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b.to(a.device)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("k", [2, 3])
def test_distributed_equals_local_for_every_method(k, tmp_path):
    """Per-iteration losses, σ at a probe step, predictions and the whole final state (weights, optimizer,
    method state, messages in flight) are bit-identical; both sides use one thread so float sums agree."""
    out = tmp_path / "results.pt"
    mp.start_processes(equivalence_worker, args=(k, free_port(), ALL_METHODS, str(out)), nprocs=k,
                       start_method="forkserver", join=True)
    got = torch.load(out, weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ALL_METHODS:
            want = local_reference(method, k)
            assert len(got[method]["losses"]) == len(want["losses"])
            assert_same(want, got[method], method)
    finally:
        torch.set_num_threads(threads)


def wait_for_an_epoch(launcher: subprocess.Popen, out: Path) -> None:
    """Until the run at ``out`` has a finished epoch recorded, checkpoint and summary included
    (the launcher must still be running)."""
    deadline = time.monotonic() + 120
    summary = out / "summary.json"
    while not (summary.exists() and json.loads(summary.read_text())["epochs_done"] >= 1):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def signal_a_worker(launcher: subprocess.Popen, out: Path, sig: int, pick: int) -> tuple[list[int], str, float]:
    """After the first recorded epoch, send ``sig`` to one module process; wait (60 s at most) for the launcher.

    Returns the module processes, the launcher's stderr and the seconds from the signal to its end.
    """
    try:
        wait_for_an_epoch(launcher, out)
        workers = module_processes(launcher.pid)
        os.kill(workers[pick], sig)
        sent = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        return workers, stderr, time.monotonic() - sent
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.parametrize("k", [2, 3])
def test_a_killed_module_ends_the_run_cleanly(k, tmp_path):
    """SIGKILL one module process mid-training: the run stops within 30 s, names the module, is marked
    failed with its files whole, and leaves no process behind."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [DBENCH, "run", "--engine", "distributed", "--split", "blocks", "--gpus", str(k), "--model", "mlp",
         "--dataset", "synthetic-small", "--batch-size", "512", "--epochs", "50", "--quiet",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    workers, stderr, elapsed = signal_a_worker(launcher, out, signal.SIGKILL, pick=-1)
    assert len(workers) == k
    assert launcher.returncode != 0
    assert elapsed < 30
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: module ") and "killed by signal 9" in lines[0], stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "killed by signal 9" in summary["error"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_done"] == len([r for r in rows if r["kind"] == "epoch"]) >= 1
    assert not any(alive(pid) for pid in workers)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_hung_module_ends_the_run_within_the_timeout(tmp_path):
    """SIGSTOP a module process (alive but silent): its peers give up after --comm-timeout (5 s), the
    launcher stops everything (SIGKILL ends the stopped one), and the error says it timed out."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [DBENCH, "run", "--engine", "distributed", "--split", "blocks", "--gpus", "2", "--model", "mlp",
         "--dataset", "synthetic-small", "--batch-size", "512", "--epochs", "50", "--quiet",
         "--comm-timeout", "5", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    workers, stderr, elapsed = signal_a_worker(launcher, out, signal.SIGSTOP, pick=0)
    assert launcher.returncode != 0 and elapsed < 30
    # Which module reports first depends on where each was when the peer went silent (a receive, a
    # send, a gather); the message says that it timed out.
    assert stderr.startswith("error: module ") and "timed out" in stderr.lower(), stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert not any(alive(pid) for pid in workers)


def test_launcher_torchrun_and_local_runs_agree(tmp_path):
    """The same run through the CLI three ways (our launcher, torchrun, the local engine): the same checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one cut for all three (--split auto would profile a cut for the distributed engine only)
    common = ["run", "--gpus", "2", "--model", "mlp", "--epochs", "2", "--quiet", "--method", "fr", "--split", "blocks",
              "--dataset", "synthetic-small", "--batch-size", "512"]
    commands = {
        "distributed": [DBENCH, *common, "--engine", "distributed"],
        "torchrun": [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                     DBENCH, *common, "--engine", "distributed"],
        "local": [DBENCH, *common, "--engine", "local"],
    }
    for name, command in commands.items():
        done = subprocess.run([*command, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("run saved in") == 1  # under torchrun too: one process speaks
    want = torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=True)
    for name in ("distributed", "torchrun"):
        assert_same(want, torch.load(tmp_path / name / "checkpoint.pt", weights_only=True), name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["engine"] == "distributed" and config["devices"] == ["cpu", "cpu"]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["module"] for m in rows[-1]["modules"]] == [0, 1]
        environment = json.loads((tmp_path / name / "environment.json").read_text())
        # Our launcher pins each module's process to its share of the CPUs; torchrun's processes are its own.
        assert environment["module_cpus"] == (module_shares(2) if name == "distributed" else None)
        if name == "distributed" and module_shares(2):
            assert environment["torch_threads"] == len(module_shares(2)[0])  # each module's, not the launcher's
        # The rows count the run's CPUs, not the share of the pinned process that writes them.
        assert {r["cpu_count"] for r in rows if r["kind"] == "epoch"} == {usable_cpus()}
        for row in (r for r in rows if r["kind"] == "epoch"):
            for m in row["modules"]:
                # every module sends and receives each step: moving messages is a state of its own
                assert m["comm_s"] > 0, (name, m)
                # Each process's clocks run from its own exit of the epoch's first barrier to its exit of the last;
                # train_seconds is the writer's. On a loaded 2-core machine (xdist, torchrun's agent) a process
                # can be descheduled for tens of ms around a barrier: 0.1 s of slack for that skew (seen: 59 ms).
                assert sum(m[f"{s}_s"] for s in STATES) == pytest.approx(row["train_seconds"], rel=0.03, abs=0.1)


@pytest.mark.parametrize("method,model", [("ddg", "mlp"), ("ddp", "mlp"), ("interleaved-1f1b", "cnn")])
def test_interrupted_distributed_run_resumes_to_the_same_numbers(tmp_path, method, model):
    """Ctrl-C stops every module process and marks the run interrupted; --resume ends where an unbroken run does
    (torch's runner too: interleaved-1f1b holds two of the cnn's four modules on each device)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two epochs: the interrupt lands after the first, so the resumed run restarts inside the run, from the
    # stopped epoch's mid-epoch checkpoint; a third added nothing the property needs (and 40 s to CI). The
    # small data set at a small batch: about as many steps an epoch (16, 32) as the full one gave at 512 and 256 (20, 40),
    # so the interrupt still lands inside the second epoch, at a quarter of the compute.
    common = ["run", "--engine", "distributed", "--gpus", "2", "--model", model, "--epochs", "2", "--quiet",
              "--method", method, "--dataset", "synthetic-small", "--batch-size", "128" if model == "cnn" else "64"]
    if method != "ddp":  # the same cut for both runs (a whole replica per process has none)
        common += ["--split", "blocks"]
    whole = subprocess.run([DBENCH, *common, "--out", str(tmp_path / "whole")], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    # The stopped run also checkpoints inside its epochs (every 3 steps), through the mid-epoch
    # flush of every stream: an unbroken run without them is what it must end equal to.
    launcher = subprocess.Popen([DBENCH, *common, "--checkpoint-every", "3", "--out", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_an_epoch(launcher, cut)
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    summary = json.loads((cut / "summary.json").read_text())
    if summary["status"] == "complete":
        pytest.skip("the run finished before the interrupt landed")
    assert launcher.returncode == 130 and "interrupted" in stderr
    assert summary["status"] == "interrupted"
    assert not list(cut.glob("failure-rank*")), "an interrupted run wrote failure files although nothing failed"
    resumed = subprocess.run([DBENCH, "run", "--resume", str(cut), "--quiet"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True),
                torch.load(cut / "checkpoint.pt", weights_only=True))
    assert json.loads((cut / "summary.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("devices, backend", [
    (["cuda:0", "cuda:1"], "nccl"),   # a GPU per module: NCCL
    (["cuda:0", "cuda:0"], "gloo"),   # two processes on one GPU: NCCL refuses them
    (["cuda:1", "cuda:0", "cuda:1"], "gloo"),
    (["cuda:0", "cpu"], "gloo"),      # NCCL cannot reach a CPU module
    (["cpu", "cpu"], "gloo"),
])
def test_the_data_backend_is_chosen_from_every_module_s_device(devices, backend):
    from dbench.engine.distributed import data_backend

    assert data_backend(devices) == backend
