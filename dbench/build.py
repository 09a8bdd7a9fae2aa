"""Build one process's share of a run from its plan: data loaders, the model's modules, the trainer.

The local engine builds every module in one process; each process of the
distributed engine (``rank``) builds its own module only. Nothing here
validates or decides: that was the plan's job (dbench.plan).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbench.data.base import Splits
from dbench.data.loader import DeviceLoader
from dbench.engine.distributed import RankTrainer
from dbench.optim import LRSchedule
from dbench.partition import split_modules
from dbench.plan import Plan, loader
from dbench.registry import DATASETS, MODELS
from dbench.trainer import Trainer

PROBE_SEED = 12345  # picks the σ probe's fixed images (the same for every run of a data set)


@dataclass
class Built:
    """What one process trains with."""

    plan: Plan
    train: DeviceLoader
    test: DeviceLoader
    trainer: Any  # a Trainer (local engine) or this process's RankTrainer (distributed)
    rank: int | None  # this process's module under the distributed engine, None for the local engine
    schedule: LRSchedule
    probe: list  # the σ probe's fixed batches
    trace: dict | None = None  # the epoch's trace (--trace), until the loop writes it

    @property
    def images(self) -> bool:
        """Whether this process reads images (every replica's first module does; the others need labels only)."""
        return self.rank is None or self.rank % self.plan.modules == 0


def build(plan: Plan, rank: int | None = None, splits: Splits | None = None) -> Built:
    """This process's loaders and trainer; ``splits``: the data set if this process loaded it already."""
    cfg = plan.config
    devices = [torch.device(d) for d in plan.devices]
    if splits is None:
        splits = DATASETS.get(cfg.dataset).load(Path(cfg.data_dir).expanduser() if cfg.data_dir else None, False)
    # Data live on the first module's device (labels are copied to each stage);
    # a module's own process keeps them on its device and reads only labels unless it is the first.
    home = devices[0] if rank is None else devices[rank]
    train = loader(cfg, splits, home, train=True, context=plan.context)
    test = loader(cfg, splits, home, train=False, context=plan.context)

    torch.manual_seed(cfg.seed)  # the model's initial weights: the same in every process, replica and method
    modules = split_modules(MODELS.get(cfg.model)(num_classes=plan.num_classes).blocks, plan.ranges)
    if rank is None:
        trainer = Trainer(
            modules, cfg.method, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay, devices=devices, options=plan.options,
            num_classes=plan.num_classes, measure=True, replicas=plan.replicas,
        )
    else:
        # Process rank = d·K + k holds module k of replica d (modules, V > 1: the method's placement).
        held = [modules[j] for j in plan.method.placement(rank % plan.modules, plan.modules, plan.options)]
        trainer = RankTrainer(
            held[0] if len(held) == 1 else nn.ModuleList(held), cfg.method, rank, cfg.gpus, devices[rank], optim=cfg.optim,
            options=plan.options, num_classes=plan.num_classes, timeout_s=cfg.comm_timeout, replicas=plan.replicas,
        )
    probe = train.fixed_batches(cfg.sigma_batches, PROBE_SEED) if plan.sigma_every else []
    return Built(plan=plan, train=train, test=test, trainer=trainer, rank=rank,
                 schedule=cfg.schedule(len(train)), probe=probe)
