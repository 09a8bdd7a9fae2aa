"""Parity of dbench's exact baselines with the same training written as plain PyTorch.

A verdict is only as honest as its strongest exact contender, so each of
dbench's exact baselines is timed against its plain-PyTorch counterpart, on
the same cut, the same batch, the same processes, interleaved:

- ``ddp`` (``RankTrainer``, K = 1, N replicas) against a model wrapped in
  ``DistributedDataParallel`` training on its equal shard;
- ``gpipe`` and ``1f1b`` (``RankTrainer`` at K, M micro-batches) against
  ``PipelineStage`` with ``ScheduleGPipe`` / ``Schedule1F1B`` of
  ``torch.distributed.pipelining`` on the same modules (its runner, its P2P,
  ``scale_grads``), then the same SGD step;
- ``bp --gpus 1`` (``RankTrainer`` in a world of one) against a plain loop
  (forward, loss, backward, step).

dbench's side is the step the distributed engine runs, all of it: the
writer's share of the batch's loss and logits included (ddp gathers them
every step; every run reports them). K (or N) processes, each pinned to its
own CPU with one torch thread as dbench pins a module's process, gloo. Every
round runs the pairs in an order shuffled from a fixed seed (the same in
every process), ``--steps`` each after a barrier; a step's seconds are the
slowest process's. The ratio is dbench's samples/s over plain PyTorch's, per
round: min / median / max. The target (issue 29): every median ≥ 0.97.

    python benchmarks/baselines_parity.py --model resnet20 --k 2 --microbatches 8 --rounds 5 --steps 4
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
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dbench.cli import run_command
from dbench.cpus import module_shares
from dbench.registry import METHODS, MODELS

SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
PAIRS = {"ddp": "DistributedDataParallel", "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "bp --gpus 1": "a plain loop"}


def _timed(steps_of: dict, rounds: int, steps: int, warmup: int, world: int) -> dict[str, list[float]]:
    """Seconds per step of every contender, per round (the slowest process's), in a per-round shuffled order."""
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    order = random.Random(0)
    times: dict[str, list[float]] = {c: [] for c in steps_of}
    for _ in range(rounds):
        names = list(steps_of)
        order.shuffle(names)  # the same order in every process: the same seed
        for name in names:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                steps_of[name]()
            took = torch.tensor([(time.perf_counter() - start) / steps])
            if world > 1:
                dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the step ends when the slowest process's does
            times[name].append(float(took))
    return times


def _worker(rank: int, world: int, port: int, model_name: str, batch: int, microbatches: int, pairs: list[str],
            rounds: int, steps: int, warmup: int, cpus: list, queue) -> None:
    os.sched_setaffinity(0, set(cpus[rank]))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from dbench.engine.distributed import RankTrainer
    from dbench.optim import OptimConfig
    from dbench.partition import by_count

    torch.manual_seed(0)
    blocks = MODELS.get(model_name)(num_classes=10).blocks
    start, end = by_count(len(blocks), world)[rank]
    module = nn.Sequential(*blocks[start:end])  # this process's module of the K-cut (equal block counts)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def dbench(method: str, part: nn.Module, **kw):
        cls = METHODS.get(method)
        options = cls.Options(microbatches=microbatches) if method in ("gpipe", "1f1b") else None
        trainer = RankTrainer(copy.deepcopy(part), method, rank, world, torch.device("cpu"),
                              optim=OptimConfig(**SETTINGS), options=options, num_classes=10, timeout_s=300, **kw)
        return lambda: trainer.step_output(x, y)

    def plain_pipeline(kind):
        part = copy.deepcopy(module)
        runner = kind(PipelineStage(part, rank, world, torch.device("cpu")), n_microbatches=microbatches,
                      loss_fn=loss_fn, scale_grads=True)
        optimizer = torch.optim.SGD(part.parameters(), **SETTINGS)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            runner.step(x) if rank == 0 else runner.step(target=y) if rank == world - 1 else runner.step()
            optimizer.step()
        return step

    def plain_ddp():
        wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(nn.Sequential(*blocks)))
        optimizer = torch.optim.SGD(wrapped.parameters(), **SETTINGS)
        sx, sy = x.tensor_split(world)[rank], y.tensor_split(world)[rank]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(wrapped(sx), sy).backward()
            optimizer.step()
        return step

    steps_of = {}
    for pair in pairs:
        if pair == "ddp":
            steps_of["dbench ddp"] = dbench("ddp", nn.Sequential(*blocks), replicas=world)
            steps_of["torch ddp"] = plain_ddp()
        elif pair in ("gpipe", "1f1b"):
            steps_of[f"dbench {pair}"] = dbench(pair, module)
            steps_of[f"torch {pair}"] = plain_pipeline(ScheduleGPipe if pair == "gpipe" else Schedule1F1B)
    times = _timed(steps_of, rounds, steps, warmup, world)
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def _single(_rank: int, model_name: str, batch: int, rounds: int, steps: int, warmup: int, cpu: list, queue) -> None:
    """``bp --gpus 1`` against a plain loop, in a process (and a world) of its own."""
    os.sched_setaffinity(0, set(cpu))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from dbench.engine.distributed import RankTrainer
    from dbench.optim import OptimConfig

    torch.manual_seed(0)
    model = nn.Sequential(*MODELS.get(model_name)(num_classes=10).blocks)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    trainer = RankTrainer(copy.deepcopy(model), "bp", 0, 1, torch.device("cpu"), optim=OptimConfig(**SETTINGS),
                          options=None, num_classes=10, timeout_s=300)
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(plain.parameters(), **SETTINGS)
    loss_fn = nn.CrossEntropyLoss()

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()
        optimizer.step()

    queue.put(_timed({"dbench bp --gpus 1": lambda: trainer.step_output(x, y), "torch bp --gpus 1": plain_step},
                     rounds, steps, warmup, 1))
    dist.destroy_process_group()


def _port() -> int:
    from dbench.engine.launch import free_port

    return free_port()


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--k", type=click.IntRange(min=2), default=2, show_default=True,
              help="Processes: the pipelines' modules and ddp's replicas.")
@click.option("--microbatches", type=click.IntRange(min=1), default=8, show_default=True, help="M of gpipe and 1f1b.")
@click.option("--batch-size", "batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--pairs", default=",".join(PAIRS), show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
def main(model: str, k: int, microbatches: int, batch: int, pairs: str, rounds: int, steps: int, warmup: int) -> None:
    """dbench's exact baselines against plain PyTorch, interleaved: seconds per step and dbench's samples/s over
    plain PyTorch's per round."""
    from dbench.cpus import usable_cpus

    blocks = len(MODELS.get(model)(num_classes=10).blocks)  # an unknown model fails before any process starts
    chosen = [p.strip() for p in pairs.split(",") if p.strip()]
    for p in chosen:
        if p not in PAIRS:
            raise click.BadParameter(f"{p}: not a baseline here; choose from {', '.join(PAIRS)}", param_hint="--pairs")
    if k > blocks:
        raise click.BadParameter(f"{k}: {model} has {blocks} blocks, fewer than K", param_hint="--k")
    if batch % k or batch % microbatches:
        raise click.BadParameter(f"{batch}: must split evenly into {k} shards and {microbatches} micro-batches (the "
                                 f"plain scripts average unweighted)", param_hint="--batch-size")
    cpus = module_shares(k)
    ctx = mp.get_context("spawn")
    times: dict[str, list[float]] = {}
    multi = [p for p in chosen if p != "bp --gpus 1"]
    if multi:
        queue = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(k, _port(), model, batch, microbatches, multi, rounds, steps, warmup, cpus,
                                          queue), nprocs=k, start_method="spawn")
        times |= queue.get()
    if "bp --gpus 1" in chosen:
        queue = ctx.SimpleQueue()
        mp.start_processes(_single, args=(model, batch, rounds, steps, warmup, cpus[0], queue), nprocs=1,
                           start_method="spawn")
        times |= queue.get()
    click.echo(f"### Exact baselines against plain PyTorch: {model}, K = N = {k}, batch {batch}, M = {microbatches} "
               f"({date.today()})\n")
    click.echo(f"Machine: {usable_cpus()} usable of {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
               f"{platform.platform()}), torch {torch.__version__}; gloo, one process per module or replica pinned to "
               f"CPUs {cpus} with one torch thread. {rounds} round(s) of {steps} steps after {warmup} warm-up, the "
               f"contenders' order shuffled per round; wall seconds per step (the slowest process's): min / median / "
               f"max over rounds.\n")
    click.echo("| baseline | plain PyTorch | dbench s/step | plain s/step | dbench samples/s ÷ plain (per round) |")
    click.echo("|---|---|---|---|---|")
    for pair in chosen:
        ours, theirs = times[f"dbench {pair}"], times[f"torch {pair}"]
        ratios = [b / a for a, b in zip(ours, theirs)]
        click.echo(f"| {pair} | {PAIRS[pair]} | {_spread(ours, 4)} | {_spread(theirs, 4)} | {_spread(ratios, 3)} |")


def _spread(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


if __name__ == "__main__":
    run_command(main)
