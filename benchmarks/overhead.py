"""Runner overhead: BP through dbench (K=1) against a plain PyTorch training loop, interleaved.

Same model (one definition, copies with the same initial weights), same
batches, same SGD settings, one process. Every round runs each contender for
``--steps`` iterations, in an order shuffled anew each round (from a fixed
seed), so drifts of the machine and any advantage of going first or last hit
all contenders alike. Each contender's time per iteration is taken both as
process CPU time (stable on a shared machine, and what the issue's target is
stated in) and as wall time.

The ratio to the plain loop is computed per round (contender over plain loop,
same round) and the table gives the median of those paired ratios with their
min and max: a slow round slows both sides of a pair, so the paired ratio is
far steadier than a ratio of medians. Target: ≤ 1.03 at every depth, in CPU
and in wall time.

Contenders:
- plain PyTorch loop: what a user writes; ``torch.optim.SGD`` with its
  defaults (the multi-tensor ``foreach`` update where torch picks it).
- plain loop, foreach=False: the same with dbench's single-tensor update
  (dbench uses it so that K modules give numbers bit-identical to the
  unsplit model); tells the update's share apart from the runner's.
- dbench BP, meters off: ``Trainer(...).step``.
- dbench BP, meters on: as ``dbench run`` trains (clock, memory accounting
  with saved-tensor hooks in a window at the epoch's start, σ capture armed
  only at probe steps). The warm-up runs past the window (2K+4 iterations, 6
  here), so the rounds time the steps a run spends most of its epoch in.
- dbench BP, meters on, memory accounted every iteration: what every step cost
  before the window (the saved-tensor hooks and samples at every iteration).

    python benchmarks/overhead.py --model resnet20 --model resnet56 --rounds 9 --steps 4 --threads 1
"""
from __future__ import annotations

import copy
import os
import platform
import random
import statistics
import time
from datetime import date

import click
import torch
from torch import nn

from dbench import Trainer
from dbench.cli import run_command
from dbench.devices import parse_device, synchronize
from dbench.meters.stage_meter import EVERY_ITERATION
from dbench.registry import MODELS

SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
# Past dbench's memory accounting window at K=1 (2K+4 iterations from the epoch's start: StageMeter), so
# that "meters on" times the steps a run spends most of its epoch in, as every round does.
WARMUP = 6
PLAIN = "plain PyTorch loop"


def plain_loop(blocks, device, foreach):
    model = nn.Sequential(*copy.deepcopy(blocks)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), foreach=foreach, **SETTINGS)
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def dbench_bp(blocks, device, measure, window=None):
    trainer = Trainer([nn.Sequential(*copy.deepcopy(blocks))], "bp", devices=[device], measure=measure, **SETTINGS)
    if measure:
        if window is not None:
            for meter in trainer.meters.stages:
                meter.window = window
        trainer.meters.start_epoch()  # as the runner does at the start of every epoch
    return trainer.step


def contenders(blocks, device) -> dict:
    return {
        PLAIN: plain_loop(blocks, device, foreach=None),
        "plain loop, foreach=False": plain_loop(blocks, device, foreach=False),
        "dbench BP, meters off": dbench_bp(blocks, device, measure=False),
        "dbench BP, meters on": dbench_bp(blocks, device, measure=True),
        "dbench BP, meters on, memory accounted every iteration": dbench_bp(blocks, device, measure=True,
                                                                            window=EVERY_ITERATION),
    }


def measure(model: str, batch_size: int, rounds: int, steps: int, device: torch.device, seed: int) -> dict:
    """{contender: [(cpu s/iteration, wall s/iteration) per round]}."""
    torch.manual_seed(0)
    blocks = MODELS.get(model)(num_classes=10).blocks
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(steps)]
    steppers = contenders(blocks, device)
    for step in steppers.values():  # warm-up: allocations, kernel selection, lazy state, the accounting window
        for i in range(WARMUP):
            step(*data[i % len(data)])
    synchronize(device)
    order = list(steppers)
    shuffle = random.Random(seed)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for x, y in data:
                steppers[name](x, y)
            synchronize(device)
            times[name].append(((time.process_time() - cpu0) / steps, (time.perf_counter() - wall0) / steps))
    return times


def paired(times: dict, name: str, which: int) -> list[float]:
    """Per round: contender's time over the plain loop's in the same round (which: 0 CPU, 1 wall)."""
    return [c[which] / p[which] for c, p in zip(times[name], times[PLAIN])]


def table(model: str, batch_size: int, times: dict) -> list[str]:
    lines = [f"#### {model}, batch {batch_size}\n",
             "| contender | CPU s/it median (min–max) | CPU ratio median (min–max) "
             "| wall s/it median (min–max) | wall ratio median (min–max) |",
             "|---|---|---|---|---|"]
    for name, values in times.items():
        cells = []
        for which in (0, 1):
            per_round = [v[which] for v in values]
            ratios = paired(times, name, which)
            cells.append(f"{statistics.median(per_round):.4f} ({min(per_round):.4f}–{max(per_round):.4f})")
            cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@click.command()
@click.option("--model", "models", multiple=True, default=["resnet20"], show_default=True,
              help="Repeat for several depths.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=9, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Iterations per round and contender.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch's intra-op threads (default: torch's own choice).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Of the rounds' orders.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def main(models, batch_size: int, rounds: int, steps: int, threads: int | None, seed: int, device: str) -> None:
    device = parse_device(device)
    for model in models:
        MODELS.get(model)  # an unknown name fails before any work
    if threads is not None:
        torch.set_num_threads(threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    click.echo(f"### Runner overhead, {device.type} ({date.today().isoformat()})\n")
    click.echo(f"Machine: {where}, {torch.get_num_threads()} torch threads; {platform.platform()}; "
               f"torch {torch.__version__}. {rounds} rounds of {steps} iterations per contender, in a shuffled "
               f"order per round (seed {seed}), after {WARMUP} warm-up iterations. Ratios are per round, to the plain "
               f"loop of the same round.\n")
    for model in models:
        click.echo("\n".join(table(model, batch_size, measure(model, batch_size, rounds, steps, device, seed))))
        click.echo("")


if __name__ == "__main__":
    run_command(main)
