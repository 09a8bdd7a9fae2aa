"""Runner overhead: BP through dbench (K=1) against a plain PyTorch training loop, interleaved.

Same model (one definition, two copies with the same initial weights), same
batches, same SGD settings, one process. Rounds alternate between the plain
loop, dbench without meters and dbench with meters (as `dbench run` trains),
so drifts of the machine hit all three alike; the table gives the median time
per iteration and the ratio to the plain loop. Target: ratio <= 1.05.

The plain loop is what a user would write: ``torch.optim.SGD`` with its
defaults (which may use the multi-tensor ``foreach`` update). dbench's
optimizer uses ``foreach=False`` so that K modules give bit-identical numbers
to the unsplit model; the difference, if any, is part of the measured overhead.

    python benchmarks/overhead.py --model resnet20 --rounds 5 --steps 10
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from datetime import date

import click
import torch
from torch import nn

from dbench import Trainer
from dbench.cli import run_command
from dbench.devices import parse_device, synchronize
from dbench.registry import MODELS




@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Iterations per round and contender.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def main(model: str, batch_size: int, rounds: int, steps: int, device: str) -> None:
    device = parse_device(device)
    torch.manual_seed(0)
    blocks = MODELS.get(model)(num_classes=10).blocks
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(steps)]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    plain = nn.Sequential(*copy.deepcopy(blocks)).to(device).train()
    optimizer = torch.optim.SGD(plain.parameters(), **settings)
    loss_fn = nn.CrossEntropyLoss()

    def plain_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(plain(x), y)
        loss.backward()
        optimizer.step()

    contenders = {
        "plain PyTorch loop": plain_step,
        "dbench BP, meters off": Trainer([nn.Sequential(*copy.deepcopy(blocks))], "bp", devices=[device], **settings).step,
        "dbench BP, meters on": _measured(blocks, device, settings),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, step in contenders.items():  # warm-up: allocations, kernel selection
        for x, y in data[:3]:
            step(x, y)
    synchronize(device)
    for _ in range(rounds):
        for name, step in contenders.items():
            start = time.perf_counter()
            for x, y in data:
                step(x, y)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)

    base = statistics.median(times["plain PyTorch loop"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    click.echo(f"### Runner overhead, {model}, batch {batch_size}, {device.type} ({date.today().isoformat()})\n")
    click.echo(f"Machine: {where}; {platform.platform()}; torch {torch.__version__}. "
               f"{rounds} interleaved rounds of {steps} iterations each, after 3 warm-up iterations.\n")
    click.echo("| contender | median s/iteration | spread (min–max) | ratio to plain |")
    click.echo("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        click.echo(f"| {name} | {med:.4f} | {min(values):.4f}–{max(values):.4f} | {med / base:.3f} |")


def _measured(blocks, device, settings):
    trainer = Trainer([nn.Sequential(*copy.deepcopy(blocks))], "bp", devices=[device], measure=True, **settings)
    trainer.meters.start_epoch()
    return trainer.step


if __name__ == "__main__":
    run_command(main)
