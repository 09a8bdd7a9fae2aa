"""DDP: the K = 1 layout of the hybrid, N whole-model replicas, each batch split in N shards, gradients
averaged over the replicas (ALGORITHMS.md, "Exact-gradient baselines" and "At scale")."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dbench.errors import DbenchError
from dbench.method import DATA_PARALLEL
from dbench.registry import METHODS
from methods.bp import BackProp


@dataclass(frozen=True)
class ReplicaOptions:
    """Options of DDP."""

    sync_bn: bool = field(default=False, metadata={
        "help": "normalize BatchNorm over the whole batch (SyncBatchNorm) instead of each replica's shard"})


@METHODS.register("ddp")
class DataParallel(BackProp):
    """BP with one module (the whole model) and N replicas: ``--method ddp --gpus N`` is ``--method bp
    --gpus N --replicas N``, the same code path (the engines' replicas), under the baseline's own name.

    Replica d trains on shard d of every batch (``torch.tensor_split``); its
    loss is weighted by ``N·n_d/B`` and the gradients are averaged over the
    replicas by one all-reduce before the update, so the update is BP's on the
    full batch for any split (an epoch's last batch need not divide by N)
    except for BatchNorm, which normalizes each shard on its own
    (``sync_bn=true``: over the batch, through torch's SyncBatchNorm, CUDA
    only). Running statistics are replica 0's, broadcast before evaluating and
    saving. The reported loss is the whole batch's mean, the logits the whole
    batch's.

    What torch's DistributedDataParallel adds and this does not: its
    all-reduce starts on gradient buckets while the backward still runs.
    Here the all-reduce follows the backward, as for every method with
    replicas (their update rules differ, so the gradient is final only at the
    update). The cost of that is measured in benchmarks/RESULTS.md.
    Memory per device: the whole model, its gradients and optimizer state, the
    activations of B/N samples.
    """

    name = "ddp"
    summary = "DDP: exact gradient, N whole-model replicas on N shards of each batch, gradients all-reduced"
    table_order = 0.25
    reference = False
    parallelism = DATA_PARALLEL  # the layout: one module per replica, as many replicas as devices
    Options = ReplicaOptions

    @classmethod
    def ideal_speedup(cls, num_stages: int, options=None) -> float:
        # Over model-parallel BP on the same N devices: each replica does the whole step on B/N samples while
        # BP's N modules take turns (ALGORITHMS.md; the all-reduce is free, like every message in the cost model).
        return float(num_stages)

    @classmethod
    def check_run(cls, options: ReplicaOptions, num_stages: int, batch_size: int, devices: list) -> None:
        if options.sync_bn and any(torch.device(d).type != "cuda" for d in devices):
            raise DbenchError("sync_bn=true needs a CUDA device per replica (torch's SyncBatchNorm works on GPUs "
                              "only); drop it on the CPU")

    def join(self, group) -> None:
        """In the distributed engine, once the replicas' process group exists: SyncBatchNorm over it."""
        if self.options.sync_bn:
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module, process_group=group)
