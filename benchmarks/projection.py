"""The projection's check: projected against measured seconds per epoch, for every model-parallel method at K.

For each method, every round (methods in an order shuffled per round from a
fixed seed):

- a traced run on the local engine (``dbench run --engine local --trace``),
  in one process pinned to one CPU with one torch thread: each module's
  segments timed alone, as a module process of the distributed engine
  computes them (pinned, one thread);
- the same run on the distributed engine (``--engine distributed``), one
  process per module, each pinned to its own CPU by dbench's launcher;
- the trace replayed on the link profile (``--link``: by default one probed
  now with ``dbench probe-link``, dbench's own transport between two pinned
  processes of this machine).

With ``--relayout`` (the default), one more contender per round checks a
projection laid out anew (``dbench project --devices``): ``ddp`` traced on
one device at batch B/K, projected on K replicas (global batch B), against
``ddp --gpus K`` measured on the distributed engine at batch B.

The error is projected over measured training seconds of the epoch, minus 1,
per round; the table gives min / median / max over rounds, and the local
engine's own (serial) seconds for scale. The trace's own cost: the same
local run without ``--trace`` in the same round (traced over untraced
seconds, minus 1). Both runs use equal block counts
(``--split blocks``) so that they train the same cut, and no σ probe.
Every run trains on ``--dataset`` (default the built-in ``synthetic``).

    python benchmarks/projection.py --model resnet20 --k 2 --rounds 3
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import click
import torch

from dbench.cli import run_command
from dbench.cpus import usable_cpus
from dbench.errors import DbenchError
from dbench.registry import DATASETS, METHODS, MODELS

DBENCH = str(Path(sys.executable).parent / "dbench")
RELAID = "ddp (1 device laid out on K)"
DEFAULT_METHODS = ",".join(sorted(n for n, c in METHODS.items() if c.parallelism == "model"))


def _run(args: list[str], out: Path, env: dict, prefix: list[str] | None = None) -> dict:
    done = subprocess.run([*(prefix or []), DBENCH, "run", *args, "--quiet", "--out", str(out)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise DbenchError(f"dbench run {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads((out / "summary.json").read_text())


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--methods", default=DEFAULT_METHODS, show_default=True)
@click.option("--dataset", default="synthetic", show_default=True, help="Data set (see `dbench list`).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--link", "link_name", default=None, help="A link profile [default: probe this machine now].")
@click.option("--relayout/--no-relayout", default=True, show_default=True,
              help="Also check ddp traced on one device laid out on K replicas against ddp on K processes.")
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/projection-check"), show_default=True)
def main(model: str, k: int, methods: str, dataset: str, batch_size: int, rounds: int, link_name: str | None,
         relayout: bool, root: Path) -> None:
    from dbench import probe, projection

    MODELS.get(model)
    DATASETS.get(dataset)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        if METHODS.get(name).parallelism != "model":
            raise click.BadParameter(f"{name}: not a model-parallel method", param_hint="--methods")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < k:
        raise click.BadParameter(f"{k}: this process may use {len(cpus)} CPU(s), fewer than K", param_hint="--k")
    if link_name is None:
        stored = root / "link.json"
        probe.save(probe.probe("cpu"), stored)
        link_name = str(stored)
    profile = projection.link(link_name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", model, "--dataset", dataset, "--gpus", str(k), "--epochs", "1", "--batch-size",
              str(batch_size), "--split", "blocks", "--sigma-every", "0"]
    contenders = [*names, *([RELAID] if relayout else [])]
    if relayout and batch_size % k:
        raise click.BadParameter(f"{batch_size}: --relayout traces ddp at batch B/K; B must be a multiple of K",
                                 param_hint="--batch-size")
    results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in contenders}
    order = random.Random(0)
    for r in range(rounds):
        shuffled = list(contenders)
        order.shuffle(shuffled)
        for name in shuffled:
            slug = "ddp-relaid" if name == RELAID else name
            traced, untraced, measured = (root / f"r{r}-{slug}-{kind}" for kind in ("local", "untraced", "distributed"))
            for path in (traced, untraced, measured):
                shutil.rmtree(path, ignore_errors=True)
            pin = ["taskset", "-c", str(cpus[0])]
            if name == RELAID:  # ddp on one device at B/K, laid out on K replicas; measured: ddp on K processes
                one = ["--model", model, "--dataset", dataset, "--method", "ddp", "--gpus", "1", "--epochs", "1",
                       "--batch-size", str(batch_size // k), "--sigma-every", "0", "--engine", "local"]
                local = _run([*one, "--trace"], traced, env, prefix=pin)
                plain = _run(one, untraced, env, prefix=pin)
                dist = _run(["--model", model, "--dataset", dataset, "--method", "ddp", "--gpus", str(k), "--epochs",
                             "1", "--batch-size", str(batch_size), "--sigma-every", "0", "--engine", "distributed"],
                            measured, env)
                projected = projection.load(traced, profile, devices=k).projection.seconds
                results[name].append((projected, dist["train_seconds"], local["train_seconds"],
                                      plain["train_seconds"]))
                continue
            local = _run([*common, "--method", name, "--engine", "local", "--trace"], traced, env, prefix=pin)
            plain = _run([*common, "--method", name, "--engine", "local"], untraced, env, prefix=pin)
            dist = _run([*common, "--method", name, "--engine", "distributed"], measured, env)
            projected = projection.load(traced, profile).projection.seconds
            results[name].append((projected, dist["train_seconds"], local["train_seconds"], plain["train_seconds"]))
    click.echo(f"### Projection against measurement: {model}, {dataset}, K={k}, batch {batch_size}, one epoch "
               f"({date.today()})\n")
    click.echo(f"Machine: {usable_cpus()} usable of {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
               f"{platform.platform()}), torch {torch.__version__}. Link: {profile.describe()}. {rounds} round(s); "
               f"min / median / max over rounds.\n")
    click.echo("| method | projected s/epoch | measured s/epoch (distributed) | error (projected/measured − 1) "
               "| local engine s/epoch (serial, traced) | trace's cost (traced/untraced − 1) |")
    click.echo("|---|---|---|---|---|---|")
    errors = []
    for name in contenders:
        rows = results[name]
        err = [p / m - 1 for p, m, _, _ in rows]
        errors += err
        click.echo(f"| {name} | {_spread([r[0] for r in rows])} | {_spread([r[1] for r in rows])} | "
                   f"{_spread(err, pct=True)} | {_spread([r[2] for r in rows])} | "
                   f"{_spread([r[2] / r[3] - 1 for r in rows], pct=True)} |")
    click.echo(f"\nAll methods and rounds: error {_spread(errors, pct=True)}; within ±10%: "
               f"{sum(abs(e) <= 0.10 for e in errors)} of {len(errors)}.")


def _spread(values: list[float], pct: bool = False) -> str:
    fmt = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:.2f}")
    return f"{fmt(min(values))} / {fmt(statistics.median(values))} / {fmt(max(values))}"


if __name__ == "__main__":
    run_command(main)
