"""Where each decoupled method's time goes, per module, at K=2 and K=4: the gap to the ideal, explained.

Each method (and model-parallel BP, the reference) trains the same model on
the same data set (``--dataset``, default the built-in ``synthetic``) on
the distributed engine, one process per module (on a CPU each gets
``cores // K`` threads), cut by ``--split``. Every module's wall-clock is
split by dbench's meters into compute (forward, backward, replay, update),
communication (posting sends; receiving a message once it has started to
arrive), waiting for an input, waiting for a gradient, data (its process's
loader producing the next batch) and idle (its step done, waiting for the others
at the epoch's end or the runner). The table gives each
module's share of the training time, and three speedups over BP at the same K:

- measured: samples/s over BP's;
- busy bound: BP's period over the busiest module's compute + communication
  per step, what this cut would give if no module ever waited;
- ideal: ALGORITHMS.md's cost model (balanced modules, free communication).

So ideal → busy bound is lost to the cut's imbalance and to communication (the
imbalance column is the busiest module's busy time over the mean module's),
and busy bound → measured to waiting: dependencies the method keeps (DFA's
locked forward, the top module's place in the pipeline) and the machine's
contention. Runs are kept under ``--root`` and reused by later calls.

    python benchmarks/breakdown.py --model resnet20 --k 2 --k 4
"""
from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import click
import torch

import methods  # noqa: F401  (registers the methods)
from dbench.cpus import usable_cpus
from dbench import run as runner
from dbench.cli import run_command
from dbench.config import RunConfig
from dbench.method import EXACT_GRADIENT, MODEL_PARALLEL
from dbench.registry import DATASETS, METHODS

BUSY = ("compute_s", "comm_s")
SHARES = ("compute_s", "comm_s", "wait_input_s", "wait_grad_s", "data_s", "idle_s")


def decoupled() -> list[str]:
    """Every installed method that cuts the model and does not compute the exact gradient, in table order."""
    found = [(cls.table_order, name) for name, cls in METHODS.items()
             if cls.parallelism == MODEL_PARALLEL and cls.family != EXACT_GRADIENT]
    return [name for _, name in sorted(found)]


def reference() -> str:
    return next(name for name, cls in METHODS.items() if cls.reference)


def config(name: str, model: str, k: int, epochs: int, batch: int, split: str, device: str | None,
           dataset: str = RunConfig.dataset) -> RunConfig:
    return RunConfig(method=name, model=model, dataset=dataset, gpus=k, epochs=epochs, batch_size=batch, split=split,
                     engine="distributed", sigma_every=0, devices=[device] * k if device else None)


def steps_of(folder: Path) -> int:
    saved = json.loads((folder / "config.json").read_text())
    return saved["steps_per_epoch"] * saved["run"]["epochs"]


def busy(module: dict) -> float:
    return sum(module.get(key, 0.0) for key in BUSY)


def table(k: int, names: list[str], runs: dict[str, tuple[dict, int]]) -> list[str]:
    ref = reference()
    ref_summary, ref_steps = runs[ref]
    ref_period = ref_summary["train_seconds"] / ref_steps
    lines = [f"#### K={k}\n",
             "| method | samples/s | measured × BP | busy bound × BP | ideal × BP | imbalance (max/mean busy) | "
             "per module: compute / comm / wait input / wait grad / data / idle, % of training time |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        summary, steps = runs[name]
        modules = summary["modules"]
        total = summary["train_seconds"]
        loads = [busy(m) for m in modules]
        bound = ref_period / (max(loads) / steps)
        ideal = METHODS.get(name).ideal_speedup(k)
        shares = "<br>".join(f"{m['module']}: " + " / ".join(f"{100 * m.get(key, 0.0) / total:.0f}" for key in SHARES)
                             for m in modules)
        lines.append(f"| {name} | {summary['samples_per_s']:.1f} | "
                     f"{summary['samples_per_s'] / ref_summary['samples_per_s']:.2f} | {bound:.2f} | "
                     f"{'–' if ideal is None else f'{ideal:.2f}'} | {max(loads) / (sum(loads) / len(loads)):.2f} | "
                     f"{shares} |")
    return lines


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", "ks", type=click.IntRange(min=2), multiple=True, default=[2, 4], show_default=True,
              help="Modules (processes); repeat for several.")
@click.option("--methods", "wanted", default=None, help="Comma-separated (default: every decoupled method installed).")
@click.option("--dataset", default=RunConfig.dataset, show_default=True, help="Data set (see `dbench list`).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--split", default="time", show_default=True, help="Partition (time: balanced by profiling).")
@click.option("--device", default=None,
              help="Put every module on this one device, e.g. cuda:0 (default: one GPU per module, or the CPU). "
                   "Modules sharing a GPU time-share it: the table then shows each method's work and transport on "
                   "that GPU, not a parallel speedup.")
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/breakdown"), show_default=True)
def main(model: str, ks: tuple[int, ...], wanted: str | None, dataset: str, epochs: int, batch_size: int,
         split: str, device: str | None, root: Path) -> None:
    DATASETS.get(dataset)  # an unknown name fails here, before the first run starts
    names = wanted.split(",") if wanted else decoupled()
    for name in names:
        METHODS.get(name)  # an unknown name fails here, before the first run starts
    everyone = [reference(), *(n for n in names if n != reference())]
    for k in ks:
        for name in everyone:  # every setting is checked before the first run starts
            config(name, model, k, epochs, batch_size, split, device, dataset).validate()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    click.echo(f"### Time breakdown, {model}, {dataset}, batch {batch_size}, {split} partition, distributed engine "
               f"({date.today().isoformat()})\n")
    click.echo(f"Machine: {usable_cpus()} cores ({platform.processor() or platform.machine()}, "
               f"{platform.platform()})" + (f", {gpu}" if gpu else "") + f", torch {torch.__version__}. "
               f"One process per module" + ("" if gpu else ", cores // K threads each") +
               (f", every module on {device} (time-shared: not a parallel speedup)" if device else "") +
               f"; {epochs} epoch(s), σ probe off.\n")
    for k in ks:
        runs = {}
        for name in everyone:
            cfg = config(name, model, k, epochs, batch_size, split, device, dataset)
            placed = f"-{device.replace(':', '')}" if device else ""
            data = "" if dataset == RunConfig.dataset else f"-{dataset}"  # the default's folders keep their names
            folder = root / f"{name}-{model}{data}-k{k}-b{batch_size}-e{epochs}-{split}{placed}"
            summary = runner.completed(cfg, folder)
            runs[name] = (summary, steps_of(folder))
            click.echo(f"K={k} {name}: {summary['samples_per_s']:.1f} samples/s", err=True)
        click.echo("\n".join(table(k, everyone, runs)) + "\n")


if __name__ == "__main__":
    run_command(main)
