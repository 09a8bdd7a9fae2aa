"""Start one process per module on this machine, watch them, and stop them all when one fails;
or, under torchrun, be one of those processes.

The launcher (the ``dbench run`` process) has created the run directory; each
worker joins the process group (NCCL when each module has a GPU of its own, else gloo; address and port
given here, as torchrun would), builds its own module from the run's config and
trains it (``dbench.run.train_here`` with its rank). The top module's process
writes the metrics, summary and checkpoint.

Failures: every worker that raises reports ``(rank, message)`` and leaves its
traceback in ``failure-rank<k>.txt``; a worker killed by a signal is seen by its
exit code. At the first failure the launcher stops the others (SIGTERM, then
SIGKILL after ``GRACE_S``), waits for every one of them, and marks the run
failed with the module that failed first: no orphan processes and no half
state, since every file of the run is replaced atomically. A worker stuck on a
message from a peer that hangs without dying fails on the process group's
timeout (``--comm-timeout``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from dbench.errors import DbenchError, RunInterrupted
from dbench.cpus import module_shares, pin, usable_cpus
from dbench import interrupts

POLL_S = 0.1  # how often the launcher looks at its workers
SETTLE_S = 1.0  # after a failure, how long the peers get to fail and report in turn
GRACE_S = 5.0  # how long a stopped worker gets before SIGKILL
WATCH_S = 0.5  # how often a worker checks that its launcher is alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_threads(devices: list) -> int | None:
    """Torch threads of each worker process when every module is on the CPU: the CPUs of its share; where
    there are no shares (fewer CPUs than modules, or no affinity mask to read, as on macOS) the CPUs split
    evenly, at least one each. Else None (as is)."""
    if all(torch.device(d).type == "cpu" for d in devices):
        shares = worker_cpus(devices)
        return min(len(share) for share in shares) if shares else max(1, usable_cpus() // len(devices))
    return None


def worker_cpus(devices: list) -> list[list[int]] | None:
    """The CPUs each worker process is pinned to: a share of this process's affinity mask per module when
    every module is on the CPU and there are CPUs enough (``dbench.cpus.module_shares``), else None (as is).
    Module k on device k: on the CPU, a module's device is its share of the cores."""
    if all(torch.device(d).type == "cpu" for d in devices):
        return module_shares(len(devices))
    return None


def launch(run, quiet: bool) -> None:
    """Train ``run`` (a RunDir) with one process per module; returns when all finished."""
    from dbench import run as runner
    from dbench.record import CONFIG

    record = run.read(CONFIG)
    world = record["run"]["gpus"]
    threads = worker_threads(record["devices"])
    shares = worker_cpus(record["devices"]) or [None] * world
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world, str(run.path), port, quiet, threads, shares[rank], reports),
                    name=f"module-{rank}")
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    try:
        failed = _watch(procs, reports)
    except KeyboardInterrupt:
        _stop(procs)
        runner.mark(run, "interrupted")
        raise runner.interrupted(run) from None
    if failed is not None:
        rank, message = failed
        _stop(procs)
        runner.mark(run, "failed", error=f"module {rank}: {message}")
        raise DbenchError(f"module {rank} failed: {message}; the run is marked failed: {run.path}")


def _watch(procs: list, reports) -> tuple[int, str] | None:
    """Wait until every worker ended well (None) or one failed: then ``(rank, message)`` of the root cause.

    When one process dies, its peers fail a moment later on the broken
    connection and report that. So after the first sign of failure the
    launcher lets the others settle, then names a process killed by a signal
    if there is one, else the first that reported an error.
    """
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return None
        if not reports.empty() or any(c not in (None, 0) for c in codes):
            break
        time.sleep(POLL_S)
    time.sleep(SETTLE_S)
    reported = []
    while not reports.empty():
        reported.append(reports.get())
    for rank, p in enumerate(procs):
        if p.exitcode is not None and p.exitcode < 0:
            return rank, f"its process was killed by signal {-p.exitcode}"
    if reported:
        return reported[0]
    rank, code = next((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0))
    return rank, f"its process exited with code {code}"


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker ends as if interrupted
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _worker(rank: int, world: int, run_path: str, port: int, quiet: bool, threads: int | None,
            cpus: list[int] | None, reports) -> None:
    if cpus is not None:
        pin(cpus)  # first: every thread this process starts from here on inherits the mask
    # Ctrl-C reaches the launcher, which stops the workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    launcher = os.getppid()
    threading.Thread(target=_watch_launcher, args=(launcher, rank, world, run_path), daemon=True,
                     name="launcher-watchdog").start()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if threads is not None:
        torch.set_num_threads(threads)  # the modules share this machine's cores
    try:
        run_rank(Path(run_path), rank, world, quiet)
        code = 0
    except (KeyboardInterrupt, RunInterrupted):
        code = 130
    except BaseException as e:
        _exiting()
        if _stopping or os.getppid() != launcher:
            # Told to stop, or the launcher died (whose watchdog stops every worker, each at its own moment):
            # a peer stopped first breaks this module's connections, so what is raised here is the stop's
            # echo, not a failure; nothing failed and no failure file is written. The writer's loop has
            # recorded the run failed as it saw the error: it is interrupted, and resumable.
            if os.getppid() != launcher and rank == world - 1:
                _mark_launcher_died(run_path)
            code = 130
        else:
            (Path(run_path) / f"failure-rank{rank}.txt").write_text(traceback.format_exc())
            reports.put((rank, f"{type(e).__name__}: {e}".splitlines()[0]))
            code = 1
    _exiting()
    sys.exit(code)


def _exiting() -> None:
    """From here on this worker is ending: the launcher's stop (SIGTERM), which it sends to every worker
    once one has failed, must not raise into the failure report or the interpreter's exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_stopping = False  # set in a worker once the launcher (or its watchdog) has told it to stop


def _interrupt(signum, frame) -> None:
    global _stopping
    _stopping = True
    interrupts.request()  # noted too, in case it lands where Python drops exceptions (dbench/interrupts.py)


def _watch_launcher(launcher: int, rank: int, world: int, run_path: str | list) -> None:
    """End this worker soon after its launcher dies (say, SIGKILLed): nobody would supervise or stop the run.

    The worker is first stopped as if interrupted (SIGTERM: the run is marked
    interrupted and stays resumable). A worker blocked in a collective whose
    peers are gone cannot act on that until its timeout, so after GRACE_S the
    top module's process marks the run interrupted itself and every worker
    exits.
    """
    while os.getppid() == launcher:
        time.sleep(WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    path = run_path[0] if isinstance(run_path, list) else run_path  # torchrun: known once the run is planned
    if rank == world - 1 and path is not None:  # the writer: the run must not stay "running" with nothing running it
        _mark_launcher_died(str(path))
    os._exit(130)


def _mark_launcher_died(run_path: str) -> None:
    from dbench import run as runner
    from dbench.record import RunDir

    runner.mark(RunDir(Path(run_path)), "interrupted", error="the launcher process died")


def run_rank(path: Path, rank: int, world: int, quiet: bool) -> None:
    """One module's process: join the group, train, leave."""
    import torch.distributed as dist

    from dbench import run as runner
    from dbench.engine.distributed import data_backend, init
    from dbench.record import CONFIG, RunDir

    run = RunDir(path)
    record = run.read(CONFIG)
    device = torch.device(record["devices"][rank])
    init(rank, world, device, record["run"]["comm_timeout"], data_backend(record["devices"]))
    try:
        runner.train_here(run, quiet, rank=rank)
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """True in a process that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def speaks() -> bool:
    """Whether this process prints the run's messages: always, except under torchrun where only the writer does."""
    return not under_torchrun() or int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1


def torchrun_process(cfg, out: Path | None, resume: Path | None, quiet: bool) -> Path:
    """``dbench run`` as one of torchrun's processes: this process is module RANK of WORLD_SIZE.

    Device: ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU. The top
    module's process creates the run directory (from its node) and writes it;
    the others learn its path from it. torchrun itself stops every process
    when one fails; if torchrun's agent dies, the workers stop by themselves
    (``_watch_launcher``) and the run is marked interrupted.
    """
    import torch.distributed as dist

    from dbench import run as runner
    from dbench.config import RunConfig
    from dbench.engine.distributed import init
    from dbench.record import CONFIG, RunDir

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun's agent is this process's parent: if it dies (SIGKILL), nobody supervises the run any more,
    # so the workers stop as they do when dbench's own launcher dies (the same watchdog).
    run_path: list = [resume]
    threading.Thread(target=_watch_launcher, args=(os.getppid(), rank, world, run_path), daemon=True,
                     name="torchrun-agent-watchdog").start()
    if resume is None and cfg.gpus != world:
        raise DbenchError(f"--gpus {cfg.gpus} does not match torchrun's {world} processes: one process per module")
    if resume is None and cfg.engine == "local":
        raise DbenchError("--engine local under torchrun: torchrun starts one process per module; use --engine distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    timeout = cfg.comm_timeout if resume is None else RunConfig.from_dict(
        RunDir.open(resume).read(CONFIG)["run"]).comm_timeout
    init(rank, world, device, timeout)
    try:
        control = dist.new_group(backend="gloo")
        names = [None] * world
        dist.all_gather_object(names, str(device), group=control)
        writer = world - 1
        if resume is not None:
            path = resume
        else:
            # The writer plans the run (validates, profiles: once) and creates its directory; every
            # other rank builds from that plan. A bad setting fails on every rank with the same line.
            cfg.engine, cfg.devices = "distributed", names
            box: list = [None]
            if rank == writer:
                try:
                    box = [("path", str(runner.create_run_dir(cfg, out)[0]))]
                except DbenchError as e:
                    box = [("error", str(e))]
            dist.broadcast_object_list(box, src=writer, group=control)
            kind, value = box[0]
            if kind == "error":
                raise DbenchError(value)
            path = Path(value)
        run_path[0] = path
        runner.train_here(RunDir(path), quiet, rank=rank)
    finally:
        dist.destroy_process_group()
    return path
