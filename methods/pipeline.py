"""GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush, Narayanan et al. 2021): exact gradients, pipelined.

Both cut every batch into M micro-batches and pass them through the K modules
as a pipeline; they differ only in the order in which a module runs its
micro-batches' forwards and backwards. Each is written on dbench's own stage
protocol (tagged messages, one driver for both engines) rather than through
``torch.distributed.pipelining``, so that the meters see every module's
compute, waits and saved activations and the σ probe and checkpoints work as
for every other method; a test checks both schedules against
``torch.distributed.pipelining`` (ScheduleGPipe, Schedule1F1B) weight for
weight on a BatchNorm-free model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dbench.errors import DbenchError
from dbench.method import DOWN, EXACT_GRADIENT, LOCKED, UP, Recv, Send, Stage, StepOutput, StepProgram
from dbench.method_tools import MicrobatchOptions
from dbench.registry import METHODS

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True)
class PipelineOptions(MicrobatchOptions):
    """Options of GPipe and 1F1B."""

    microbatches: int | None = field(default=None, metadata={
        "help": "M, micro-batches per batch (1 <= M <= batch size; M=1 is BP) [default: 4K]"})


class Pipeline(Stage):
    """Module k runs its micro-batches in the schedule's order; gradients accumulate, one update per batch.

    A micro-batch's forward: receive its input (tagged with the iteration and
    the micro-batch), compute, keep the graph, send the output up; the top
    module also computes the micro-batch's loss, weighted by its share of the
    batch (``loss_m · n_m / B``, so the accumulated gradient is the whole
    batch's mean even when the last batch of an epoch does not split evenly).
    A micro-batch's backward: receive the error gradient at the output (the
    top module backpropagates its loss), backpropagate into the accumulated
    ``.grad``, send the gradient at the input down. After all M backwards the
    module updates once. The gradient is BP's except that BatchNorm normalizes
    each micro-batch on its own (and updates its running statistics once per
    micro-batch). Micro-batches are as ``torch.tensor_split`` makes them; a
    batch smaller than M (an epoch's last) is split into as many micro-batches
    as it has samples.
    """

    family = EXACT_GRADIENT
    locking = LOCKED
    Options = PipelineOptions

    @classmethod
    def ideal_speedup(cls, num_stages: int, options: PipelineOptions | None = None) -> float | None:
        """K·M/(M+K−1) over model-parallel BP: the bubble takes (K−1)/(M+K−1) of the period (ALGORITHMS.md)."""
        k, m = num_stages, (options or cls.Options()).microbatch_count(num_stages)
        return k * m / (m + k - 1)

    @classmethod
    def check_run(cls, options: PipelineOptions, num_stages: int, batch_size: int, devices: list) -> None:
        m = options.microbatch_count(num_stages)
        if m > batch_size:
            raise DbenchError(f"bad microbatches {m}: a batch of {batch_size} splits into at most {batch_size} "
                              f"micro-batches (1 <= M <= batch size)")

    def order(self, m: int) -> list[tuple[str, int]]:
        """This module's forwards and backwards of micro-batches 0..m-1, in the schedule's order."""
        raise NotImplementedError

    def train_step(self, t, x, y) -> StepProgram:
        m = min(self.options.microbatch_count(self.num_stages), len(y))
        ys = y.tensor_split(m)
        xs = x.tensor_split(m) if self.is_first else [None] * m
        batch = len(y)
        kept: dict[int, tuple] = {}  # micro-batch -> (input, output, loss): its graph, until its backward
        losses, logits = [], []
        for kind, i in self.order(m):
            if kind == FORWARD:
                h = xs[i] if self.is_first else (yield Recv(UP, expect=(t, i))).requires_grad_()
                out = self.module(h)
                loss = None
                if self.is_last:
                    # the micro-batch's share of the mean (of its replica's shard, weighted as every replica loss)
                    loss = self.weighted(self.loss_fn(out, ys[i]) * (len(ys[i]) / batch))
                    losses.append(loss.detach())
                    logits.append(out.detach())
                else:
                    yield Send(UP, out, (t, i))
                kept[i] = (h, out, loss)
            else:
                h, out, loss = kept.pop(i)
                if self.is_last:
                    self.backward(loss)
                else:
                    grad = yield Recv(DOWN, expect=(t, i))
                    self.backward(out, grad)
                if not self.is_first:
                    yield Send(DOWN, h.grad, (t, i))
        yield from self.apply_update()  # one update per batch, with the gradients of all micro-batches accumulated
        if self.is_last:
            return StepOutput(loss=self.share(torch.stack(losses).sum()), logits=torch.cat(logits))
        return None


@METHODS.register("gpipe")
class GPipe(Pipeline):
    """GPipe: every module runs all M forwards, then all M backwards (in micro-batch order)."""

    name = "gpipe"
    summary = "GPipe: exact gradient, each batch pipelined as M micro-batches, all forwards then all backwards"
    table_order = 0.5

    def order(self, m: int) -> list[tuple[str, int]]:
        return [(FORWARD, i) for i in range(m)] + [(BACKWARD, i) for i in range(m)]


@METHODS.register("1f1b")
class OneForwardOneBackward(Pipeline):
    """1F1B (PipeDream-Flush): module k warms up with min(M, K−k) forwards, then alternates one backward and
    one forward, then finishes the backwards; so it holds at most K−k micro-batches' activations (k 0-based)."""

    name = "1f1b"
    summary = "1F1B: exact gradient, each batch pipelined as M micro-batches, one forward one backward"
    table_order = 0.75

    def order(self, m: int) -> list[tuple[str, int]]:
        warmup = min(m, self.num_stages - self.index)
        steps = [(FORWARD, i) for i in range(warmup)]
        forward, backward = warmup, 0
        while backward < m:
            steps.append((BACKWARD, backward))
            backward += 1
            if forward < m:
                steps.append((FORWARD, forward))
                forward += 1
        return steps
