"""Speedup of each method over model-parallel BP and over the fastest exact-gradient baseline, on the same devices.

Every contender trains the same model on the same data set (``--dataset``,
default the built-in ``synthetic``) for the same epochs, in folders under
``--root`` that later calls reuse:
- each method of ``--methods`` at K devices on the distributed engine (one
  process per module, or per replica for ddp; on a CPU each process gets
  ``cores // K`` threads, so at K=2 on a 2-core machine every process has one
  core of its own), cut by ``--split`` (ddp holds the whole model on each);
- ``bp`` on one device (``--gpus 1``: on a CPU one process with every core),
  the other exact baseline.
Contenders run interleaved, ``--rounds`` times (round r runs each once before
round r+1 starts), so the machine's drift spreads over all of them; the
table gives the median samples/s over the rounds with its min–max.
Throughput is each run's own ``samples_per_s`` (warm-up steps excluded, σ
probe off). Speedups are ratios of medians: over the reference method
(model-parallel BP) at K, and over the fastest exact-gradient baseline (the
exact-gradient family's runs at K that are not the reference, and bp on one
device), each beside its ideal from ALGORITHMS.md's cost model. Also per
method: its share of the ideal in each round (over the reference's run of the
same round), and the ideal at the cut it ran with: the cost model assumes
balanced modules, so at a cut whose slowest module's step is b × the mean
(``balance.measured_balance`` in the run's config, timed at set-up) the
ideal is ideal / b. A model of few blocks (ResNet-20 has 9 equal ones) cannot
be cut evenly in two; the gap between the columns is the model's, not the
method's.

    python benchmarks/speedup.py --model resnet20 --k 2 --epochs 1 --rounds 2
"""
from __future__ import annotations

import platform
import statistics
from datetime import date
from pathlib import Path

import click
import torch

import methods as _registering  # noqa: F401  (registers the built-in methods; `methods` is an option below)
from dbench.cpus import usable_cpus
from dbench import run as runner
from dbench.cli import run_command
from dbench.config import RunConfig
from dbench.method import DATA_PARALLEL, EXACT_GRADIENT
from dbench.record import CONFIG, RunDir
from dbench.registry import DATASETS, METHODS

ONE_DEVICE = "bp@1"  # the whole model on one device


def config(name: str, model: str, k: int, epochs: int, batch: int, split: str,
           devices: list[str] | None = None, dataset: str = RunConfig.dataset) -> RunConfig:
    if name == ONE_DEVICE:
        return RunConfig(method="bp", model=model, dataset=dataset, gpus=1, epochs=epochs, batch_size=batch,
                         sigma_every=0, devices=devices[:1] if devices else None)
    whole = METHODS.get(name).parallelism == DATA_PARALLEL  # every device holds the whole model: no cut
    return RunConfig(method=name, model=model, dataset=dataset, gpus=k, epochs=epochs, batch_size=batch,
                     split="auto" if whole else split, engine="distributed", sigma_every=0, devices=devices)


def contenders(names: list[str], reference: str) -> list[str]:
    return [*names, ONE_DEVICE] if reference in names else names


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--dataset", default=RunConfig.dataset, show_default=True, help="Data set (see `dbench list`).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--split", default="time", show_default=True, help="Partition (time: balanced by profiling).")
@click.option("--methods", default="bp,fr,ddg,dfa,ddp,gpipe,1f1b", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Interleaved rounds: each contender runs once per round.")
@click.option("--devices", default=None,
              help="Device per module, e.g. cuda:0,cuda:0: one GPU hosting every module. Its processes then "
                   "time-share the GPU (over gloo, messages staged through the host), so the table measures each "
                   "method's extra work and transport on that GPU, not a parallel speedup.")
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/speedup"), show_default=True)
def main(model: str, k: int, dataset: str, epochs: int, batch_size: int, split: str, methods: str,
         devices: str | None, rounds: int, root: Path) -> None:
    DATASETS.get(dataset)  # an unknown name fails here, before the first run starts
    names = methods.split(",")
    placed = devices.split(",") if devices else None
    for name in names:
        METHODS.get(name)  # an unknown name fails here, before the first run starts
    references = [name for name in names if METHODS.get(name).reference]
    if not references:
        known = ", ".join(name for name, cls in METHODS.items() if cls.reference)
        raise click.BadParameter(f"{methods!r} lacks a reference method, the baseline every speedup is over "
                                 f"(one of: {known})", param_hint="--methods")
    reference = references[0]
    everyone = contenders(names, reference)
    for name in everyone:  # every setting is checked before the first run starts
        config(name, model, k, epochs, batch_size, split, placed, dataset).validate()
    rates: dict[str, list[float]] = {name: [] for name in everyone}
    balances: dict[str, list[float]] = {name: [] for name in everyone}
    last: dict[str, dict] = {}
    for r in range(rounds):
        for name in everyone:
            cfg = config(name, model, k, epochs, batch_size, split, placed, dataset)
            data = "" if dataset == RunConfig.dataset else f"-{dataset}"  # the default's folders keep their names
            folder = root / f"r{r}" / f"{name}-{model}{data}-k{cfg.gpus}-b{batch_size}-e{epochs}-{cfg.split}"
            last[name] = runner.completed(cfg, folder)
            rates[name].append(last[name]["samples_per_s"])
            # The cut's balance as timed at set-up (--split time): slowest module's step over the mean.
            balance = (RunDir.open(folder).read(CONFIG).get("balance") or {}).get("measured_balance")
            if balance is not None:
                balances[name].append(balance)
            click.echo(f"round {r + 1}/{rounds} {name}: {rates[name][-1]:.1f} samples/s", err=True)
    median = {name: statistics.median(v) for name, v in rates.items()}

    def ideal(name: str) -> float | None:
        return 1.0 if name == ONE_DEVICE else METHODS.get(name).ideal_speedup(k)  # default options, as run

    exact = [n for n in everyone if n == ONE_DEVICE or (METHODS.get(n).family == EXACT_GRADIENT
                                                         and not METHODS.get(n).reference)]
    fastest = max(exact, key=lambda n: median[n]) if exact else None
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    click.echo(f"### Speedup, {model}, {dataset}, K={k}, batch {batch_size}, {split} partition, {rounds} interleaved "
               f"round(s) ({date.today().isoformat()})\n")
    click.echo(f"Machine: {usable_cpus()} cores ({cpu}, {platform.platform()})" + (f", {gpu}" if gpu else "")
               + f", torch {torch.__version__}. Distributed engine at K={k} (one process per module or replica"
               + (f", {max(1, usable_cpus() // k)} thread(s) each" if gpu is None else "")
               + f"); {ONE_DEVICE}: bp on one device" + (" (one process, every core)" if gpu is None else "")
               + f". {epochs} epoch(s), warm-up steps excluded. Fastest exact baseline: {fastest or '–'}."
               + (f" Devices {devices}: modules sharing a GPU time-share it, so these are costs on one GPU, "
                  "not parallel speedups." if placed and len(set(placed)) < len(placed) else "") + "\n")
    click.echo(f"| method | samples/s median (min–max) | × model-parallel {reference} | ideal | share of ideal, "
               f"per round | ideal at the cut | × fastest exact ({fastest or '–'}) | ideal vs exact | "
               f"compute s per device | wait s per device |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for name in everyone:
        s = last[name]
        over_ref = median[name] / median[reference]
        over_exact = median[name] / median[fastest] if fastest else None
        mine, theirs = ideal(name), ideal(fastest) if fastest else None
        vs_exact = mine / theirs if mine is not None and theirs else None
        # Per round, over the reference of the same round: the "in every run" is about each of them.
        shares = ([mine_r / ref_r / mine for mine_r, ref_r in zip(rates[name], rates[reference])]
                  if mine and name != ONE_DEVICE else [])
        per_round = ", ".join(f"{x:.0%}" for x in shares) or "–"
        # The cost model's ideal assumes balanced modules; at the cut the run used, the slowest module sets
        # the pace: ideal / (slowest over mean), from the cut's timing at set-up (median over rounds).
        # The reference runs one module at a time: its period is the sum of the modules', whatever the cut.
        if name == reference:
            at_cut = mine
        elif mine and balances[name]:
            at_cut = mine / statistics.median(balances[name])
        else:
            at_cut = None
        compute = " / ".join(f"{m['compute_s']:.1f}" for m in s["modules"])
        wait = " / ".join(f"{m['wait_input_s'] + m['wait_grad_s']:.1f}" for m in s["modules"])
        spread = f"{median[name]:.1f} ({min(rates[name]):.1f}–{max(rates[name]):.1f})"
        click.echo(f"| {name} | {spread} | {over_ref:.2f} | {_num(mine)} | {per_round} | {_num(at_cut)} | "
                   f"{_num(over_exact)} | {_num(vs_exact)} | {compute} | {wait} |")


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    run_command(main)
