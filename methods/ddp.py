"""DDP: K replicas of the whole model, the batch split in K shards, gradients averaged by torch's
DistributedDataParallel (gloo on the CPU, NCCL on CUDA)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dbench.errors import DbenchError
from dbench.method import DATA_PARALLEL, EXACT_GRADIENT, LOCKED, Stage, StepOutput, StepProgram
from dbench.registry import METHODS


@dataclass(frozen=True)
class ReplicaOptions:
    """Options of DDP."""

    sync_bn: bool = field(default=False, metadata={
        "help": "normalize BatchNorm over the whole batch (SyncBatchNorm) instead of each replica's shard"})


@METHODS.register("ddp")
class DataParallel(Stage):
    """Replica k holds the whole model and trains on shard k of every batch; DDP averages the gradients.

    Shards are ``torch.tensor_split(batch, K)[k]``. DDP averages the replicas'
    gradients (a sum divided by K), which is the full batch's mean gradient
    only when the shards are equal; so each replica weights its shard's mean
    loss by ``K·n_k/B``, and the average is the batch mean for any split (an
    epoch's last batch need not divide by K, and may be smaller than K: a
    replica without a sample contributes a gradient of zeros). The gradient
    is then BP's on the full batch except for BatchNorm, which normalizes each shard on its own
    (``sync_bn=true``: over the batch, through SyncBatchNorm). DDP broadcasts
    replica 0's buffers before every forward, so the running statistics are
    replica 0's; dbench also broadcasts them before evaluating and saving.
    The reported loss is the whole batch's mean and the logits the whole
    batch's, gathered on the writer. Memory per device: the whole model, its
    gradients and optimizer state, the activations of B/K samples (DDP's
    gradient buckets are not in the accounted figure; CUDA's allocator peak
    has them).
    """

    name = "ddp"
    summary = "DDP: exact gradient, K whole-model replicas on K shards of each batch, gradients all-reduced"
    family = EXACT_GRADIENT
    table_order = 0.25
    locking = LOCKED
    parallelism = DATA_PARALLEL
    Options = ReplicaOptions

    @classmethod
    def ideal_speedup(cls, num_stages: int, options=None) -> float:
        # Each replica does the whole step on B/K samples while model-parallel BP's K modules take turns: K
        # (ALGORITHMS.md; the all-reduce is taken as free, like every message in the cost model).
        return float(num_stages)

    @classmethod
    def check_run(cls, options: ReplicaOptions, num_stages: int, batch_size: int, devices: list) -> None:
        if options.sync_bn and any(torch.device(d).type != "cuda" for d in devices):
            raise DbenchError("sync_bn=true needs a CUDA device per replica (torch's SyncBatchNorm works on GPUs "
                              "only); drop it on the CPU")
        # A batch of at least K samples (a shard per replica) is checked by dbench.plan for every data-parallel method.

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replica: nn.Module | None = None  # the DDP wrapper, made once the process group exists

    # Each replica is a whole model: it is both the first module (it reads images) and the last (its loss).
    @property
    def is_first(self) -> bool:
        return True

    @property
    def is_last(self) -> bool:
        return True

    def wrap(self) -> None:
        """Wrap the module in DDP (and SyncBatchNorm) inside the joined process group, before the first step."""
        if self.options.sync_bn:
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.replica = DistributedDataParallel(self.module, device_ids=device_ids)

    def train_step(self, t, x, y) -> StepProgram:
        k, world = self.index, self.num_stages
        batch = len(y)
        xs, ys = x.tensor_split(world)[k], y.tensor_split(world)[k]
        out = self.replica(xs)
        if len(ys):
            shard_loss = self.loss_fn(out, ys)
        else:
            # An epoch's last batch smaller than K leaves this replica no sample. It must still take part in
            # DDP's all-reduce (every replica's backward does), with a gradient of zeros: a loss that is 0 with
            # a graph through every parameter (the mean of no sample would be NaN and poison every replica).
            shard_loss = out.sum() * 0.0
        self.backward(shard_loss * (world * len(ys) / batch))  # DDP's average of these is the batch mean
        self.apply_update()
        return StepOutput(loss=(shard_loss * (len(ys) / batch)).detach(), logits=out.detach())
        yield  # a generator like every method's step, though it sends nothing: DDP's all-reduce is in backward

    def sync_buffers(self) -> None:
        """Every replica takes replica 0's buffers (BatchNorm running statistics), as DDP's next forward would."""
        for buffer in self.module.buffers():
            dist.broadcast(buffer, src=0)
