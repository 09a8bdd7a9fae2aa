"""Process start-up: a module process started by spawn against one forked from a warm fork server.

dbench's launcher starts one process per module (dbench/engine/launch.py). A
spawned process is a fresh interpreter that imports torch and dbench before it
can train; a process forked from multiprocessing's fork server inherits the
server's imports (the server imported dbench once, when the launcher first
needed it). This times what each costs, interleaved: every round starts
``--workers`` processes with each context, in an order shuffled anew each
round (fixed seed), and measures from ``start()`` to the moment every
process has imported ``dbench.run`` (what a module process needs before it
trains) and reported, and the CPU seconds the processes used for it
(``RUSAGE_CHILDREN``: the spawned processes are the benchmark's children; the
forked ones are the fork server's, so their CPU time is read by each process
itself). The fork server's own start (one import of dbench, once per launcher
process) is timed apart.

    python benchmarks/startup.py --rounds 5 --workers 2
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import time
from datetime import date

import click

from dbench.cli import run_command
from dbench.cpus import usable_cpus

CONTEXTS = ("spawn", "forkserver")


def _ready(queue) -> None:
    import dbench.run  # noqa: F401  what a module process imports before it trains

    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put(usage.ru_utime + usage.ru_stime)


def _start(ctx, workers: int) -> tuple[float, float]:
    """Wall seconds until ``workers`` processes have imported dbench.run; their CPU seconds."""
    queue = ctx.SimpleQueue()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    procs = [ctx.Process(target=_ready, args=(queue,)) for _ in range(workers)]
    for p in procs:
        p.start()
    reported = [queue.get() for _ in procs]
    wall = time.perf_counter() - began
    for p in procs:
        p.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # spawned processes are reaped by this process (RUSAGE_CHILDREN); forked ones by the fork server
    return wall, (children if ctx.get_start_method() == "spawn" else sum(reported))


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


@click.command()
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Rounds of each context.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes started together per round (a run's modules).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-round order.")
def main(rounds: int, workers: int, seed: int) -> None:
    server = mp.get_context("forkserver")
    server.set_forkserver_preload(["dbench.run"])  # as dbench's launcher does
    began = time.perf_counter()
    _start(server, 1)  # starts the fork server, which imports dbench.run once
    server_s = time.perf_counter() - began
    order = random.Random(seed)
    wall: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    cpu: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    for _ in range(rounds):
        for name in order.sample(CONTEXTS, len(CONTEXTS)):
            w, c = _start(mp.get_context(name) if name == "spawn" else server, workers)
            wall[name].append(w)
            cpu[name].append(c)
    click.echo(f"### Module process start-up: spawn against a warm fork server ({date.today()})\n")
    click.echo(f"Machine: {usable_cpus()} usable of {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
               f"{platform.platform()}). {rounds} round(s) of {workers} process(es) started together per context, "
               f"the order shuffled per round; min / median / max over rounds. The fork server's own start "
               f"(once per launcher): {server_s:.2f} s.\n")
    click.echo("| start method | wall s until all imported dbench.run | CPU s of the processes |")
    click.echo("|---|---|---|")
    for name in CONTEXTS:
        click.echo(f"| {name} | {_spread(wall[name])} | {_spread(cpu[name])} |")


if __name__ == "__main__":
    run_command(main)
