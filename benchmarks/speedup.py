"""Parallel speedup over BP at the same K, on the distributed engine, next to ALGORITHMS.md's ideal.

Each method trains the same model for the same steps on the distributed
engine, one process per module (as ``dbench run --engine distributed``),
in folders under ``--root`` that later calls reuse. On a CPU each process gets
``cores // K`` threads, so at K=2 on a 2-core machine every module has one
core of its own. Throughput is the runs' own ``samples_per_s`` (warm-up steps
excluded, σ probe off), averaged over the epochs; the speedup is a method's
throughput over the reference method's (BP: the method whose ``reference`` fact
is set). The ideal (balanced modules, backward = 2 forwards, free
communication) is ALGORITHMS.md's, each method's ``ideal_speedup``. Per module,
the table also shows compute and wait seconds, the engine's own account of
where the time went.

    python benchmarks/speedup.py --model resnet20 --k 2 --epochs 1
"""
from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import click
import torch

import methods  # noqa: F401  (registers the methods)
from dbench import run as runner
from dbench.cli import run_command
from dbench.config import RunConfig
from dbench.registry import METHODS


def run(method: str, model: str, k: int, epochs: int, batch: int, split: str, root: Path) -> dict:
    cfg = RunConfig(method=method, model=model, gpus=k, epochs=epochs, batch_size=batch, split=split,
                    engine="distributed", sigma_every=0)
    out = root / f"{method}-{model}-k{k}-b{batch}-e{epochs}-{split}"
    summary = runner.completed(cfg, out)
    return {"summary": summary, "config": json.loads((out / "config.json").read_text())}


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--split", default="time", show_default=True, help="Partition (time: balanced by profiling).")
@click.option("--methods", default="bp,fr,ddg,dfa", show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/speedup"), show_default=True)
def main(model: str, k: int, epochs: int, batch_size: int, split: str, methods: str, root: Path) -> None:
    names = methods.split(",")
    for name in names:
        METHODS.get(name)  # an unknown name fails here, before the first run starts
    references = [name for name in names if METHODS.get(name).reference]
    if not references:
        known = ", ".join(name for name, cls in METHODS.items() if cls.reference)
        raise click.BadParameter(f"{methods!r} lacks a reference method, the baseline every speedup is over "
                                 f"(one of: {known})", param_hint="--methods")
    reference = references[0]
    results = {m: run(m, model, k, epochs, batch_size, split, root) for m in names}
    base = results[reference]["summary"]["samples_per_s"]
    cpu = platform.processor() or platform.machine()
    devices = results[reference]["config"]["devices"]
    click.echo(f"### Speedup over {reference}, {model}, K={k}, batch {batch_size}, {split} partition ({date.today().isoformat()})\n")
    click.echo(f"Machine: {os.cpu_count()} cores ({cpu}, {platform.platform()}), devices {', '.join(devices)}, "
               f"torch {torch.__version__}, distributed engine (one process per module"
               + (f", {max(1, (os.cpu_count() or 1) // k)} thread(s) each" if devices[0] == "cpu" else "")
               + f"), {epochs} epoch(s) of {results[reference]['config']['steps_per_epoch']} steps, warm-up steps excluded.\n")
    click.echo(f"| method | samples/s | speedup over {reference} | ideal | share of ideal | compute s per module | wait s per module |")
    click.echo("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        s = r["summary"]
        speedup = s["samples_per_s"] / base
        ideal = METHODS.get(method).ideal_speedup(k)  # default options, as these runs use
        compute = " / ".join(f"{m['compute_s']:.1f}" for m in s["modules"])
        wait = " / ".join(f"{m['wait_input_s'] + m['wait_grad_s']:.1f}" for m in s["modules"])
        ideal_text, share = (f"{ideal:.2f}", f"{100 * speedup / ideal:.0f}%") if ideal else ("–", "–")
        click.echo(f"| {method} | {s['samples_per_s']:.1f} | {speedup:.2f} | {ideal_text} | {share} | {compute} | {wait} |")


if __name__ == "__main__":
    run_command(main)
