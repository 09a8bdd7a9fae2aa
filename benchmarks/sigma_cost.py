"""What the σ probe costs at its default frequency, as a share of the epoch's training time.

Runs one epoch per method through dbench's runner (as ``dbench run``) on
``--dataset`` (default the built-in ``synthetic``), with the default probe
settings (4 probes an epoch, 2 probe batches) and reads the run's own
accounting: ``probe_s`` (the probes' extra plain-BP passes, timed apart) over
``train_seconds``. A probe costs about ``sigma_batches`` forward+backward
passes, whatever the epoch's length, so the share shrinks as epochs get
longer; the table also gives one probe's cost in training steps, from which
the share for any data set follows (CIFAR: 391 steps an epoch at batch 128).
Target: <= 10% of epoch time.

    python benchmarks/sigma_cost.py --model resnet20 --k 2
"""
from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import click
import torch

import methods as _registering  # noqa: F401  (registers the built-in methods; `methods` is an option below)
from dbench import run as runner
from dbench.cli import run_command
from dbench.config import RunConfig
from dbench.registry import DATASETS, METHODS


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--methods", default="bp,fr", show_default=True)
@click.option("--dataset", default=RunConfig.dataset, show_default=True, help="Data set (see `dbench list`).")
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/sigma-cost"), show_default=True)
def main(model: str, k: int, methods: str, dataset: str, root: Path) -> None:
    DATASETS.get(dataset)  # an unknown name fails here, before the first run starts
    rows = []
    for method in methods.split(","):
        METHODS.get(method)  # an unknown name fails here, before the first run starts
    for method in methods.split(","):
        data = "" if dataset == RunConfig.dataset else f"-{dataset}"  # the default's folders keep their names
        out = root / f"{method}-{model}{data}-k{k}"
        summary = runner.completed(RunConfig(method=method, model=model, dataset=dataset, gpus=k, epochs=1), out)
        config = json.loads((out / "config.json").read_text())
        epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "epoch"][0]
        probe = max(m["probe_s"] for m in summary["modules"])
        steps = config["steps_per_epoch"]
        per_step = (epoch["train_seconds"] - probe) / steps
        per_probe = probe / epoch["probes"]
        rows.append((method, steps, epoch["probes"], config["sigma_probe_samples"], epoch["train_seconds"], probe,
                     per_probe / per_step))
    click.echo(f"### σ probe cost, {model}, {dataset}, K={k}, default frequency ({date.today().isoformat()})\n")
    click.echo(f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
               f"{platform.platform()}, torch {torch.__version__}, local engine.\n")
    click.echo("| method | steps/epoch | probes | probe samples | train s | probe s | share of epoch | one probe, in steps | share at 391 steps/epoch |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for method, steps, probes, samples, train, probe, in_steps in rows:
        click.echo(f"| {method} | {steps} | {probes} | {samples} | {train:.1f} | {probe:.1f} | {100 * probe / train:.1f}% | "
                   f"{in_steps:.2f} | {100 * probes * in_steps / (391 + probes * in_steps):.1f}% |")


if __name__ == "__main__":
    run_command(main)
