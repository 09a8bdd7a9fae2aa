"""How much of the CUDA allocator's peak the framework's memory accounting explains.

The accounting (dbench/meters/memory.py) counts what a module holds: weights,
gradients, optimizer state, what the method keeps, messages, and the storages
autograd saved for backward. The allocator's peak also holds what it cannot
see: library workspaces (cuBLAS keeps one per handle, allocated at the first
matrix product and never freed; cuDNN's are per call), the gradients of
activations alive during a backward, and a forward's temporaries. This prints,
per method, model and batch size, on one GPU (K=1, where every method is BP,
and K=2 with both modules on the one GPU for FR and DDG, whose peaks then add):

    accounted   the meter's peak total over the step (MiB)
    allocated   torch.cuda.max_memory_allocated over the steps, minus what was
                allocated before the trainer existed (the batch; and, after the
                warm-up, the libraries' persistent workspaces)
    ratio       accounted / allocated

    python benchmarks/memory_accuracy.py
"""
from __future__ import annotations

import copy
import os
import platform
from datetime import date

import click
import torch

import methods  # noqa: F401  (registers the methods)
from dbench import Trainer
from dbench.cli import run_command
from dbench.errors import DbenchError
from dbench.partition import partition, split_modules
from dbench.registry import MODELS

MIB = 2 ** 20


def warm_up(device: torch.device) -> None:
    """Make the libraries allocate their persistent workspaces (cuBLAS's at the first matrix product)."""
    a = torch.randn(64, 64, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(3, 8, 3).to(device)
    (conv(torch.randn(2, 3, 8, 8, device=device)).sum() + (a @ a).sum()).backward()
    torch.cuda.synchronize(device)


def measure(method: str, model: str, batch: int, k: int, device: torch.device, steps: int = 3) -> tuple[float, float]:
    torch.manual_seed(0)
    blocks = MODELS.get(model)(num_classes=10).blocks
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(steps)]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t = Trainer(split_modules(copy.deepcopy(blocks), partition(blocks, k, "blocks")), method,
                devices=[device] * k, measure=True)
    t.meters.start_epoch()
    for x, y in data:
        t.step(x, y)
    torch.cuda.synchronize(device)
    accounted = sum(r["accounted_peak_bytes"] for r in t.meters.stop_epoch())
    allocated = torch.cuda.max_memory_allocated(device) - base
    del t
    return accounted / MIB, allocated / MIB


def _batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of batch sizes >= 1, e.g. 64,256")
    return sizes


@click.command()
@click.option("--models", default="resnet8,resnet20,resnet56", show_default=True)
@click.option("--batches", default="64,256", show_default=True, callback=_batch_sizes)
def main(models: str, batches: list[int]) -> None:
    if not torch.cuda.is_available():
        raise DbenchError("memory_accuracy.py compares with the CUDA allocator: it needs a CUDA device")
    device = torch.device("cuda", 0)
    print(f"### Memory accounting against the CUDA allocator's peak ({date.today().isoformat()})\n")
    print(f"Machine: {os.cpu_count()} cores ({platform.machine()}), {torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}. 3 steps each; K=2 runs put both modules on the one GPU.\n")
    print("| method | K | model | batch | warm-up | accounted MiB | allocated MiB | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for warmed in (False, True):
        if warmed:
            warm_up(device)
        for model in models.split(","):
            for batch in batches:
                for method, k in (("bp", 1), ("fr", 2), ("ddg", 2)):
                    if not warmed and (method, model, batch) != ("bp", models.split(",")[0], batches[0]):
                        continue  # before the warm-up: the first measurement only (it pays the workspaces)
                    a, m = measure(method, model, batch, k, device)
                    print(f"| {method} | {k} | {model} | {batch} | {'yes' if warmed else 'no'} | {a:.1f} | {m:.1f} | {a / m:.2f} |")


if __name__ == "__main__":
    run_command(main)
