"""Helpers that several methods share, kept in the framework so that no method imports another.

- ``frozen_running_stats``: recompute a forward without counting the batch in BatchNorm's statistics
  again (FR's replay).
- ``forward_on_snapshot``, ``forward_with``, ``rebuild_stored``: a forward whose graph survives the
  optimizer's in-place updates, and its rebuilding from a checkpoint (DDG's and FDG's stored forwards).
- ``SynthBatchNorm1d``/``2d``: BatchNorm that accepts a batch of one value per channel (the side models
  of DNI and DGL).
- ``MicrobatchOptions``: the option (and its default, 4K) of every method that cuts each batch into
  micro-batches (GPipe, 1F1B, torch's schedules, PipeDream-2BW).
- ``QueuedLabels``: the top module's labels of the batches still climbing a fully pipelined forward (FDG's
  and PETRA's schedule).
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dbench.errors import DbenchError


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module):
    """Inside, BatchNorm layers normalize with batch statistics but leave their running statistics alone.

    For recomputations (FR's replay): the batch was already counted once, when
    it was first played. Detaching the buffers is what ``F.batch_norm`` reads as
    "no running statistics to update"; they are put back untouched.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


def forward_on_snapshot(module: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """A forward that stays backpropagatable after the module's weights move on: ``(weights, buffers, out)``.

    It runs on a snapshot of the current weights and of the BatchNorm buffers
    (``functional_call``), so the optimizer's in-place updates cannot
    invalidate its graph (autograd's version check). BatchNorm's backward reads
    the running statistics it was given, so the graph gets copies of the
    buffers too; the updated copies then become the module's statistics (one
    update per batch, as in BP). ``buffers`` are the statistics as they were
    before: with ``x`` and ``weights`` they rebuild the same graph on resume.
    """
    weights = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    before = {n: b.clone() for n, b in module.named_buffers()}
    out, after = forward_with(module, x, weights, before)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(after[name])
    return weights, before, out


def forward_with(module: torch.nn.Module, x: torch.Tensor, weights: dict, buffers: dict) -> tuple[torch.Tensor, dict]:
    """Forward on given weights and on copies of given buffers; returns the output and the updated copies."""
    copies = {n: b.clone() for n, b in buffers.items()}
    return functional_call(module, {**weights, **copies}, (x,)), copies


def rebuild_stored(module: torch.nn.Module, saved: list[dict], device: torch.device, input_grad: bool) -> list[tuple]:
    """``(x, weights, buffers, out)`` of each saved forward, its graph built again from what a checkpoint kept.

    A graph cannot be saved; its input, weights and buffers can, and give the same graph (the same ops on
    the same values), in training mode as it was built. ``input_grad``: the input needs a gradient (the
    module sends one down).
    """
    rebuilt = []
    was_training = module.training
    module.train()
    try:
        for s in saved:
            x = s["x"].to(device)
            if input_grad:
                x.requires_grad_()
            weights = {n: w.to(device).requires_grad_() for n, w in s["weights"].items()}
            buffers = {n: b.to(device) for n, b in s["buffers"].items()}
            out, _ = forward_with(module, x, weights, buffers)
            rebuilt.append((x, weights, buffers, out))
    finally:
        module.train(was_training)
    return rebuilt


class _SingleValueSafe:
    """BatchNorm that, in training mode, normalizes a batch holding one value per channel with its running
    statistics, as in evaluation mode.

    The synthesizer is trained on every batch a module sees, also a batch of one sample of flat features
    (batch size 1, or an epoch's last batch of one). Batch statistics of a single value are undefined (its
    variance is 0, and torch refuses it), so such a batch is normalized with the statistics of the batches
    seen before it, which is what those statistics estimate; with none seen yet they are BatchNorm's initial
    (mean 0, variance 1), which leaves only the affine part: BatchNorm skipped. Running statistics are left
    untouched by such a batch, since it gives no estimate of a variance. Any batch with more than one value
    per channel is normalized exactly as ``nn.BatchNorm`` does, so the numbers of every other run are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:  # one value per channel
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


class SynthBatchNorm1d(_SingleValueSafe, nn.BatchNorm1d):
    pass


class SynthBatchNorm2d(_SingleValueSafe, nn.BatchNorm2d):
    pass


class QueuedLabels:
    """The top module's labels of the batches still climbing the modules: under a fully pipelined forward
    (module k forwards batch t-k at iteration t) the top module scores batch t-(K-1) with labels that arrived
    K-1 iterations earlier. Each entry: (batch, labels, the shard weight of that batch's iteration)."""

    def __init__(self, method: str):
        self.method = method  # named in the error of a schedule gone wrong
        self.queue: deque[tuple[int, torch.Tensor, float]] = deque()

    def push(self, t: int, y: torch.Tensor, weight: float) -> None:
        # A copy: the labels wait K-1 iterations, and whatever made ``y`` may reuse its memory meanwhile.
        self.queue.append((t, y.clone(), weight))

    def pop(self, batch: int, t: int) -> tuple[torch.Tensor, float]:
        """The labels and shard weight of ``batch``, which the top module scores at iteration ``t``."""
        tagged, labels, weight = self.queue.popleft()
        if tagged != batch:
            raise RuntimeError(f"{self.method} top module at iteration {t}: queued labels of batch {tagged}, "
                               f"scoring batch {batch}")
        return labels, weight

    def arrive(self, t: int, y: torch.Tensor, weight: float, delay: int) -> tuple[int, torch.Tensor, float] | None:
        """Queue iteration ``t``'s labels; return (batch, labels, shard weight) of the batch the top module scores
        now, ``delay`` (K-1) iterations back, or None while no batch has reached it yet."""
        self.push(t, y, weight)
        batch = t - delay
        if batch < 0:
            return None
        return (batch, *self.pop(batch, t))

    def tensors(self) -> list[torch.Tensor]:
        return [labels for _, labels, _ in self.queue]

    def state(self) -> list[list]:
        return [[b, labels, weight] for b, labels, weight in self.queue]

    def load(self, saved: list, device: torch.device) -> None:
        # A checkpoint from before replicas holds no weights: 1, as without replicas.
        self.queue = deque((int(b), labels.to(device), float(rest[0]) if rest else 1.0) for b, labels, *rest in saved)


@dataclass(frozen=True)
class MicrobatchOptions:
    """The option of a method that cuts every batch into M micro-batches. A method redeclares the field only to
    state its own bounds in the help text."""

    microbatches: int | None = field(default=None, metadata={
        "help": "M, micro-batches per batch (1 <= M <= batch size) [default: 4K]"})

    def validate(self) -> None:
        if self.microbatches is not None and self.microbatches < 1:
            raise DbenchError(f"bad microbatches {self.microbatches}: must be an integer >= 1")

    def microbatch_count(self, num_stages: int) -> int:
        """M: the option, or ALGORITHMS.md's default of 4K."""
        return self.microbatches if self.microbatches is not None else 4 * num_stages
