"""Start one process per module on this machine, watch them, and stop them all when one fails.

The launcher (the ``dbench run`` process) has created the run directory and
hands this module a ``Job``: what each worker runs and how the run's status is
recorded, both functions of the application (``dbench.run``), which this
engine module does not import. Each worker is given the process group's
address and port (as torchrun would give them) and runs ``Job.train`` with its
rank: it joins the group, builds its own module from the run's config and
trains it. The top module's process writes the metrics, summary and
checkpoint. Under torchrun there is no launcher: ``dbench.run`` is one of
torchrun's processes and shares only ``watch_launcher`` with this module.

Failures: every worker that raises reports ``(rank, message)`` and leaves its
traceback in ``failure-rank<k>.txt``; a worker killed by a signal is seen by its
exit code. At the first failure the launcher stops the others (SIGTERM, then
SIGKILL after ``GRACE_S``), waits for every one of them, and marks the run
failed with the module that failed first: no orphan processes and no half
state, since every file of the run is replaced atomically. A worker stuck on a
message from a peer that hangs without dying fails on the process group's
timeout (``--comm-timeout``).

Why not ``torch.distributed.elastic.multiprocessing.start_processes`` (evaluated against torch 2.14): it
starts, watches and stops workers as this module does (SIGTERM, then SIGKILL after a grace period) and
finds the first failure from error files the workers write under ``@record``. What dbench needs beyond it:
each module's process pinned to its own share of the CPUs before any thread starts (elastic binds to NUMA
nodes by device index, which on one socket gives every module the same cores); a stop that is an
interruption, not a failure (SIGTERM marks the run interrupted and resumable; the echo of a peer's stop is
no failure of its own); a root cause that prefers a worker killed by a signal over the peers that failed on
its broken connection; the run directory marked from outside when the launcher dies (``watch_launcher``).
These would be wrapped around its context rather than replace code, so this module keeps its own
supervision (about 150 lines) on Python's ``multiprocessing`` (a fork server's context: see ``context``).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dbench.errors import DbenchError, RunInterrupted
from dbench.cpus import pin
from dbench.engine import forkserver
from dbench.placement import worker_cpus, worker_threads
from dbench import interrupts

POLL_S = 0.1  # how often the launcher looks at its workers
SETTLE_S = 1.0  # after a failure, how long the peers get to fail and report in turn
GRACE_S = 5.0  # how long a stopped worker gets before SIGKILL
WATCH_S = 0.5  # how often a torchrun worker checks that its launcher (its parent) is alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Job:
    """What the launcher runs, given by the application. Both callables are module-level functions, so that
    a worker process can unpickle them (by name)."""

    path: Path  # the run directory
    devices: list[str]  # one per worker process: module (and replica) rank r on devices[r]
    train: Callable[[Path, int, int, bool], None]  # (run, rank, world, quiet): join the group, train, leave
    mark: Callable[[Path, str, str | None], None]  # (run, status, error): record the run's status from outside
    interrupted: Callable[[Path], BaseException]  # (run): the error that says where to resume it from


def launch(job: Job, quiet: bool) -> None:
    """Train ``job`` with one process per module; returns when all finished."""
    world = len(job.devices)
    threads = worker_threads(job.devices)
    shares = worker_cpus(job.devices) or [None] * world
    ctx = context(job)
    reports = ctx.Queue()
    port = free_port()
    environment = dict(os.environ)  # as the launcher has it now, not as it was when the fork server started
    # The workers' lifeline: the launcher holds the only write end and never writes, so a worker reads EOF
    # on it once the launcher is gone, however it ended. (A worker's parent is the fork server, which
    # outlives the launcher as long as its children do: the parent's pid cannot tell.)
    lifeline, keep = ctx.Pipe(duplex=False)
    procs = [
        ctx.Process(target=_worker, args=(job, rank, world, port, quiet, threads, shares[rank], reports,
                                          environment, lifeline), name=f"module-{rank}")
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    lifeline.close()
    try:
        _supervise(job, procs, reports)
    finally:
        keep.close()  # after the workers were stopped and the run marked: a worker still alive reads EOF


def _supervise(job: Job, procs: list, reports) -> None:
    try:
        failed = _watch(procs, reports)
    except KeyboardInterrupt:
        _stop(procs)
        job.mark(job.path, "interrupted", None)
        raise job.interrupted(job.path) from None
    if failed is not None:
        rank, message = failed
        _stop(procs)
        job.mark(job.path, "failed", f"module {rank}: {message}")
        raise DbenchError(f"module {rank} failed: {message}; the run is marked failed: {job.path}")


def context(job: Job):
    """How worker processes start: forked from multiprocessing's fork server, which imported the
    application's module (``job.train``'s: torch, dbench) once, when this launcher first needed it (or
    earlier: ``dbench run`` starts it before its own imports, ``forkserver.start``).

    Why not spawn (a fresh interpreter per worker): each spawned worker imported torch and dbench again,
    about 2.7 s of CPU per worker on the 2-core machine (benchmarks/RESULTS.md, "Process start-up"); a suite or a
    test session that launches many runs paid it for every module of every run. Why not plain fork: the
    launcher may hold threads (a suite's progress bars, torch's pools), and forking a threaded process can
    deadlock the child; the fork server is a single-threaded process that has run no torch op. What a fork
    server does not carry over is handled here: each worker gets the launcher's environment as it is at
    launch (``_worker``), and multiprocessing sends the working directory and ``sys.path`` itself. The
    server ends when this launcher does (multiprocessing's own pipe), which the workers' watchdog sees.
    """
    return forkserver.context(job.train.__module__)


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


def _worker(job: Job, rank: int, world: int, port: int, quiet: bool, threads: int | None,
            cpus: list[int] | None, reports, environment: dict[str, str], lifeline) -> None:
    os.environ.clear()
    os.environ.update(environment)  # the fork server's environment is that of the moment it started
    if cpus is not None:
        pin(cpus)  # first: every thread this process starts from here on inherits the mask
    # Ctrl-C reaches the launcher, which stops the workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=watch_launcher, args=(lambda: lifeline.poll(None), rank, world, [job.path], job.mark),
                     daemon=True, name="launcher-watchdog").start()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if threads is not None:
        torch.set_num_threads(threads)  # the modules share this machine's cores
    try:
        job.train(job.path, rank, world, quiet)
        code = 0
    except (KeyboardInterrupt, RunInterrupted):
        code = 130
    except BaseException as e:
        _exiting()
        gone = lifeline.poll()  # EOF: the launcher is gone (it never writes)
        if _stopping or gone:
            # Told to stop, or the launcher died (whose watchdog stops every worker, each at its own moment):
            # a peer stopped first breaks this module's connections, so what is raised here is the stop's
            # echo, not a failure; nothing failed and no failure file is written. The writer's loop has
            # recorded the run failed as it saw the error: it is interrupted, and resumable.
            if gone and rank == world - 1:
                job.mark(job.path, "interrupted", LAUNCHER_DIED)
            code = 130
        else:
            (job.path / f"failure-rank{rank}.txt").write_text(traceback.format_exc())
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


def parent_exits(parent: int) -> Callable[[], None]:
    """What blocks until this process's parent (``parent``, its pid now) has ended: a torchrun worker's
    launcher is its parent, and an orphan is adopted by another process."""
    def wait() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
    return wait


def watch_launcher(until_gone: Callable[[], object], rank: int, world: int, run_path: list,
                   mark: Callable[[Path, str, str | None], None]) -> None:
    """End this worker soon after its launcher dies (say, SIGKILLed): nobody would supervise or stop the run.

    The worker is first stopped as if interrupted (SIGTERM: the run is marked
    interrupted and stays resumable). A worker blocked in a collective whose
    peers are gone cannot act on that until its timeout, so after GRACE_S the
    top module's process marks the run interrupted itself (``mark``) and every
    worker exits. ``until_gone`` blocks until the launcher has ended. ``run_path``: a one-item list holding
    the run's directory, or None until it is known (under torchrun, once the run is planned).
    """
    until_gone()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    if rank == world - 1 and run_path[0] is not None:  # the writer: the run must not stay "running" with nothing running it
        mark(Path(run_path[0]), "interrupted", LAUNCHER_DIED)
    os._exit(130)


LAUNCHER_DIED = "the launcher process died"
