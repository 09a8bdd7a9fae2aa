"""Partition balance: the `time` partition against equal blocks, slowest module over mean module time.

For each model the blocks are profiled once, exactly as ``--split time``
profiles them (forward and backward of each block, median of 3, on the
device). Three cuts into K modules are then compared:

- ``blocks``: equal block counts (the FR/DDG code's rule; ``--split auto`` on the local engine);
- ``time`` for BP (and DDG, DFA): balances forward + backward per module;
- ``time`` for FR: balances FR's step, where modules below the top pay a
  second forward (play, then replay);
- ``counted`` for BP and for FR (``--split auto``, the default): the same two
  step costs balanced over each block's counted cost (FLOPs and elements
  written) instead of its profiled time, the cut the same on every machine;
  its period against the ``time`` cut's is what the deterministic default
  costs in speed here.

Each module of each cut is then *timed again as a whole* (forward, backward,
median of ``--repeats``, the cuts interleaved so drifts of the machine hit all
alike): the balance figures are measured, not the profile's own sums, which
would flatter the `time` cut that was chosen from them (they are printed
beside, as "predicted by the profile"). Balance is the slowest
module's step time over the mean module's (1.00 is perfect). For a pipeline
the slowest module sets the period, so the last column gives each cut's
period relative to equal blocks.

    python benchmarks/partition_balance.py --models resnet110,wrn28_10 --k 4
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
from datetime import date

import click
import torch
from torch import nn

import methods  # noqa: F401  (registers the methods, whose step costs the `time` cut balances)
from dbench.cli import run_command
from dbench.devices import parse_device
from dbench.models.base import describe
from dbench.partition import (BlockTime, Ranges, balance_time, by_count, check_k, counted_costs, step_costs,
                              time_costs, time_forward_backward)
from dbench.registry import METHODS, MODELS


def module_inputs(modules: list[nn.Module], sample: torch.Tensor) -> list[torch.Tensor]:
    """What each module is fed: the sample, then each module's output (fixed: nothing trains here)."""
    inputs = [sample]
    with torch.no_grad():
        for module in modules[:-1]:
            inputs.append(module(inputs[-1]))
    return [x.requires_grad_() for x in inputs]


def measure(blocks, cuts: dict[str, Ranges], sample, device, repeats: int) -> dict[str, list[BlockTime]]:
    """Median forward and backward seconds of every module of every cut, cuts interleaved round by round."""
    modules = {name: [nn.Sequential(*copy.deepcopy(blocks[a:b])).to(device).train() for a, b in ranges]
               for name, ranges in cuts.items()}
    inputs = {name: module_inputs(mods, sample) for name, mods in modules.items()}

    def one_round(name: str) -> list[BlockTime]:
        return [time_forward_backward(m, x, device) for m, x in zip(modules[name], inputs[name])]

    rounds: dict[str, list[list[BlockTime]]] = {name: [] for name in cuts}
    for name in cuts:  # warm-up: kernel selection, allocator
        one_round(name)
    for _ in range(repeats):
        for name in cuts:
            rounds[name].append(one_round(name))
    return {name: [BlockTime(statistics.median(r[j].forward for r in runs), statistics.median(r[j].backward for r in runs))
                   for j in range(len(cuts[name]))]
            for name, runs in rounds.items()}


@click.command()
@click.option("--models", default="resnet110,wrn28_10", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed rounds per cut (after one warm-up).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def main(models: str, k: int, batch_size: int, repeats: int, device: str) -> None:
    device = parse_device(device)
    for model in models.split(","):  # every name and K checked before the first (long) profile
        check_k(k, describe(model)["blocks"], model)
    bp, fr = METHODS.get("bp").step_cost, METHODS.get("fr").step_cost
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    click.echo(f"### Partition balance, K={k}, batch {batch_size}, {device.type} ({date.today().isoformat()})\n")
    click.echo(f"Machine: {where}; {platform.platform()}; torch {torch.__version__}. Modules timed as wholes, "
               f"median of {repeats} interleaved rounds after one warm-up; one process, one device.\n")
    click.echo("| model | cut | blocks per module | step ms per module | slowest / mean | predicted by the profile | period vs equal blocks | period vs time's cut |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for model in models.split(","):
        torch.manual_seed(0)
        blocks = MODELS.get(model)(num_classes=10).blocks
        sample = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        profile = time_costs(blocks, sample, device)  # what --split time sees
        counted = counted_costs(blocks, sample)  # what --split counted (auto) sees
        equal = by_count(len(blocks), k)
        # name: (cut, the step cost it is judged by, the row it is compared with)
        cuts = {
            "blocks": (equal, bp, "blocks"),
            "time, BP's step": (balance_time(profile, k, bp), bp, "blocks"),
            "blocks, FR's step": (equal, fr, "blocks, FR's step"),
            "time, FR's step": (balance_time(profile, k, fr), fr, "blocks, FR's step"),
            "counted, BP's step": (balance_time(counted, k, bp), bp, "blocks"),
            "counted, FR's step": (balance_time(counted, k, fr), fr, "blocks, FR's step"),
        }
        # Rows with the same cut share one measurement.
        distinct: dict[str, Ranges] = {}
        for name, (ranges, _, _) in cuts.items():
            if ranges not in distinct.values():
                distinct[name] = ranges
        timed = measure(blocks, distinct, sample, device, repeats)
        measured = {name: next(timed[n] for n, r in distinct.items() if r == ranges)
                    for name, (ranges, _, _) in cuts.items()}
        periods = {name: max(cost(t.forward, t.backward, j, k) for j, t in enumerate(measured[name]))
                   for name, (_, cost, _) in cuts.items()}
        for name, (ranges, cost, baseline) in cuts.items():
            steps = [cost(t.forward, t.backward, j, k) for j, t in enumerate(measured[name])]
            timed_cut = "time, FR's step" if cost is fr else "time, BP's step"
            predicted = step_costs(profile, ranges, cost)  # the block profile's sums, what the `time` cut minimised
            sizes = "/".join(str(b - a) for a, b in ranges)
            click.echo(f"| {model} | {name} | {sizes} | {' / '.join(f'{1e3 * s:.0f}' for s in steps)} "
                       f"| {max(steps) / statistics.mean(steps):.2f} | {max(predicted) / statistics.mean(predicted):.2f} "
                       f"| {periods[name] / periods[baseline]:.2f} | {periods[name] / periods[timed_cut]:.2f} |")


if __name__ == "__main__":
    run_command(main)
