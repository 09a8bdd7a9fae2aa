"""What dbench's ddp gives up against torch's DistributedDataParallel: the all-reduce's overlap with the backward.

dbench runs every layout of N devices (K modules × D replicas) through one
code path, and ``ddp`` is its K = 1 case: the replicas' gradients are averaged
by one flat all-reduce after the backward, before the update
(``Transport.all_reduce``). torch's DistributedDataParallel instead starts an
all-reduce on each gradient bucket while the backward still runs. This
measures what that costs, interleaved, on the same processes:

- torch DDP: the model wrapped in ``DistributedDataParallel``, the plain
  training step a user writes on its shard (the loss averaged over the
  shard, DDP averaging the gradients; equal shards);
- dbench ddp: ``RankTrainer(..., method="ddp", replicas=N)``, the step the
  distributed engine runs (each process reads the batch and takes its shard;
  the writer gathers the batch's loss and logits, as every run reports them);
- dbench ddp without the gather: the same step's shard alone (``_run`` of
  the stage's program), to tell the all-reduce's cost from the reporting's.

N processes, each pinned to its own CPU with one torch thread (as dbench
pins its module processes on a CPU), gloo. Every round runs the contenders in
an order shuffled from a fixed seed (the same in every process), ``--steps``
each after a barrier; the seconds per step are the slowest process's. Ratios
are per round, to torch DDP of the same round: min / median / max.

    python benchmarks/ddp_overlap.py --model resnet20 --replicas 2 --rounds 7 --steps 6
"""
from __future__ import annotations

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
from dbench.registry import MODELS

SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
CONTENDERS = ("torch DDP", "dbench ddp", "dbench ddp, no gather")


def _worker(rank: int, world: int, port: int, model_name: str, batch: int, rounds: int, steps: int, warmup: int,
            cpus: list | None, queue) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus[rank]))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from dbench.engine.distributed import RankTrainer
    from dbench.optim import OptimConfig

    torch.manual_seed(0)
    blocks = MODELS.get(model_name)(num_classes=10).blocks
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    shard_x, shard_y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]

    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*[b for b in _copy(blocks)]))
    optimizer = torch.optim.SGD(ddp.parameters(), foreach=False, **SETTINGS)
    loss_fn = nn.CrossEntropyLoss()

    def torch_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ddp(shard_x), shard_y).backward()
        optimizer.step()

    trainer = RankTrainer(nn.Sequential(*_copy(blocks)), "ddp", rank, world, torch.device("cpu"),
                          optim=OptimConfig(**SETTINGS), options=None, num_classes=10, timeout_s=300,
                          replicas=world)

    def dbench_step() -> None:
        trainer.step_output(x, y)

    def dbench_no_gather() -> None:
        trainer.stage.shard_weight = 1.0  # equal shards
        trainer._run(trainer.stage.train_step(trainer.iteration, shard_x, shard_y))
        trainer.iteration += 1

    steps_of = {"torch DDP": torch_step, "dbench ddp": dbench_step, "dbench ddp, no gather": dbench_no_gather}
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    order = random.Random(0)
    times: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for _ in range(rounds):
        contenders = list(CONTENDERS)
        order.shuffle(contenders)  # the same order in every process: the same seed
        for name in contenders:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                steps_of[name]()
            took = torch.tensor([(time.perf_counter() - start) / steps])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slowest process's: the step ends when it does
            times[name].append(float(took))
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def _copy(blocks):
    import copy

    return copy.deepcopy(blocks)


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--replicas", type=int, default=2, show_default=True, help="N processes, one replica each.")
@click.option("--batch-size", "batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
def main(model: str, replicas: int, batch: int, rounds: int, steps: int, warmup: int) -> None:
    """Torch DDP against dbench's ddp, interleaved: seconds per step and the ratio per round."""
    from dbench.cpus import usable_cpus
    from dbench.engine.launch import free_port

    MODELS.get(model)  # an unknown name fails before any process starts
    if replicas < 2:
        raise click.BadParameter(f"{replicas}: needs at least 2 (replicas to average over)", param_hint="--replicas")
    if batch % replicas:
        raise click.BadParameter(f"{batch}: must divide into {replicas} equal shards (torch DDP's plain step averages "
                                 f"unweighted)", param_hint="--batch-size")
    cpus = module_shares(replicas)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(replicas, free_port(), model, batch, rounds, steps, warmup, cpus, queue),
                       nprocs=replicas, start_method="spawn")
    times = queue.get()
    click.echo(f"### ddp overlap: {model}, batch {batch}, {replicas} replicas ({date.today()})\n")
    click.echo(f"Machine: {usable_cpus()} usable of {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
               f"{platform.platform()}), torch {torch.__version__}; gloo, one process per replica pinned to CPUs "
               f"{cpus} with one torch thread. {rounds} round(s) of {steps} steps after {warmup} warm-up, the "
               f"contenders' order shuffled per round; wall seconds per step (the slowest process's): "
               f"min / median / max over rounds.\n")
    click.echo("| contender | s/step | × torch DDP (per round) |")
    click.echo("|---|---|---|")
    base = times["torch DDP"]
    for name in CONTENDERS:
        t = times[name]
        ratios = [a / b for a, b in zip(t, base)]
        click.echo(f"| {name} | {min(t):.4f} / {statistics.median(t):.4f} / {max(t):.4f} | "
                   f"{min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f} |")


if __name__ == "__main__":
    run_command(main)
