"""What K cores computing at once cost each other: the machine's share of a gap to the ideal speedup.

The ideal speedups of ALGORITHMS.md count work: a decoupled method at K
modules, each on its own core, is ideal when every core does its share of the
model's arithmetic at the speed one core does it alone. Model-parallel BP, the
baseline of that ideal, keeps one core busy at a time. When K cores compute at
once they share the last-level cache, the memory bandwidth and (on many CPUs)
the power budget, so each may do the same arithmetic slower than alone. That
slowdown belongs to the machine, not to any method: data parallelism (DDP)
pays it too.

This measures it directly, with no dbench engine, messages or methods in the
way: the same single-threaded BP training step (the given model, batch and
SGD settings, synthetic data) in one process alone on one CPU, and in K
processes at once, each pinned to its own CPU of this process's affinity mask
(on distinct physical cores where there are K of them, as dbench pins modules),
started together at a barrier. The K processes start once and serve every
round; a round times the first of them alone, then all K together. Each
process times its steps after a warm-up, in CPU time (what the core spent on
the step, stalls included) and wall time.

    taskset -c 6,7 python benchmarks/contention.py --model resnet20 --k 2 --rounds 5 --steps 8

The slowdown (together over alone, per round, median with min–max) caps what
any method that keeps K cores busy can reach: the ideal divided by it. It is
a bound from one kind of work (full-model steps); a module's own layers may
stream more or less memory.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import time
from datetime import date

import click
import torch

from dbench.cli import run_command
from dbench.cpus import module_shares, usable_cpus
from dbench.registry import MODELS
from overhead import plain_loop  # benchmarks/ is this script's folder: on the path, here and in spawned workers


def _worker(model_name: str, batch: int, cpu: int, warmup: int, conn, barrier) -> None:
    """One process for every round: pinned to ``cpu``, one torch thread, its model built and warmed up once.

    On each ``("time", steps, together)`` it times that many BP steps (after the others at the barrier when
    ``together``) and answers (CPU s/step, wall s/step); ``None`` ends it. Kept alive across rounds so that
    a round costs its steps, not a process start and an import of torch.
    """
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # The plain PyTorch training step overhead.py times dbench against (torch's default SGD update).
    step = plain_loop(MODELS.get(model_name)(num_classes=10).blocks, torch.device("cpu"), foreach=None)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(warmup):
        step(x, y)
    conn.send("ready")
    while (order := conn.recv()) is not None:
        _, steps, together = order
        if together:
            barrier.wait()  # the K processes time their steps at the same moment
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            step(x, y)
        conn.send(((time.process_time() - cpu0) / steps, (time.perf_counter() - wall0) / steps))


class Workers:
    """K pinned worker processes, one per CPU; ``alone`` times the first by itself, ``together`` all at once."""

    def __init__(self, model: str, batch: int, cpus: list[int], warmup: int):
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(len(cpus))
        self.conns, self.procs = [], []
        for cpu in cpus:
            here, there = ctx.Pipe()
            self.conns.append(here)
            self.procs.append(ctx.Process(target=_worker, args=(model, batch, cpu, warmup, there, barrier)))
        for p in self.procs:
            p.start()
        for conn in self.conns:
            if conn.recv() != "ready":
                raise SystemExit("a timing process did not start")

    def alone(self, steps: int) -> tuple[float, float]:
        self.conns[0].send(("time", steps, False))
        return self.conns[0].recv()

    def together(self, steps: int) -> list[tuple[float, float]]:
        for conn in self.conns:
            conn.send(("time", steps, True))
        return [conn.recv() for conn in self.conns]

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for p in self.procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"a timing process exited with code {p.exitcode}")


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--batch-size", "batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--k", type=int, default=2, show_default=True, help="Processes computing at once, one per CPU.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
def main(model, batch, k, rounds, warmup, steps):
    MODELS.get(model)  # an unknown name fails before any process starts
    mask = sorted(os.sched_getaffinity(0))
    if k < 2 or k > len(mask):
        raise click.BadParameter(f"{k}: needs 2 to {len(mask)} (the CPUs this process may use)", param_hint="--k")
    # One CPU of each of K distinct physical cores where there are so many (as dbench pins K modules).
    together_cpus = [share[0] for share in module_shares(k)]
    alone, together, ratios = [], [], {"cpu": [], "wall": []}
    workers = Workers(model, batch, together_cpus, warmup)
    try:
        for _ in range(rounds):
            a_cpu, a_wall = workers.alone(steps)
            both = workers.together(steps)
            alone.append((a_cpu, a_wall))
            together.append(both)
            # Paired per round: a slow round slows both sides.
            ratios["cpu"].append(statistics.mean(c for c, _ in both) / a_cpu)
            ratios["wall"].append(statistics.mean(w for _, w in both) / a_wall)
    finally:
        workers.close()
    click.echo(f"### Contention, {model}, batch {batch}, K={k} single-threaded processes ({date.today()})\n")
    click.echo(f"Machine: {usable_cpus()} usable of {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
               f"{platform.platform()}), torch {torch.__version__}. CPUs {together_cpus} ({together_cpus[0]} alone). "
               f"{rounds} round(s) of {steps} steps after {warmup} warm-up; medians (min–max) over rounds.\n")
    click.echo("| | CPU s/step | wall s/step | × alone, CPU | × alone, wall |")
    click.echo("|---|---|---|---|---|")
    click.echo(f"| 1 process alone | {_spread([c for c, _ in alone], '.3f')} | {_spread([w for _, w in alone], '.3f')} "
               f"| 1.00 | 1.00 |")
    click.echo(f"| {k} processes at once (mean of them) | "
               f"{_spread([statistics.mean(c for c, _ in b) for b in together], '.3f')} | "
               f"{_spread([statistics.mean(w for _, w in b) for b in together], '.3f')} | "
               f"{_spread(ratios['cpu'], '.2f')} | {_spread(ratios['wall'], '.2f')} |")
    slow = statistics.median(ratios["cpu"])
    click.echo(f"\nEach of {k} cores computing at once did a step in {slow:.2f}× the CPU time of one core alone: "
               f"a method that keeps {k} cores busy reaches at most {1 / slow:.0%} of a work-counting ideal here.")


if __name__ == "__main__":
    run_command(main)
