"""FDG: fully decoupled training with delayed gradients and gradient shrinking (Zhuang, Wang, Liu, Lin, TNNLS 2021)."""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from dbench.errors import DbenchError
from dbench.method import DELAYED_GRADIENT, DOWN, UNLOCKED, UP, Recv, Send, Stage, StepProgram
from dbench.registry import METHODS
# The forward on a snapshot of the weights, whose graph survives the in-place updates (DDG's, see there).
from dbench.method_tools import QueuedLabels, forward_on_snapshot, rebuild_stored


@dataclass(frozen=True)
class FDGOptions:
    """Options of FDG."""

    shrink: float = field(default=1.0, metadata={
        "help": "gradient-shrinking factor β, 0 < β <= 1: every module below the top multiplies the gradient it "
                "receives by β, so module k (0-based) learns from β^(K-1-k) times its delayed gradient; 1 is no "
                "shrinking (the paper's best values: 0.2 to 0.8)"})

    def validate(self) -> None:
        # The paper shrinks (β < 1) or leaves alone (β = 1); β = 0 would stop every module below the top
        # from learning, and β > 1 amplifies, which is not the method.
        if not (math.isfinite(self.shrink) and 0 < self.shrink <= 1):
            raise DbenchError(f"bad shrink {self.shrink}: must be a number with 0 < shrink <= 1")


@dataclass
class _Stored:
    """One forward, kept until the gradient of its batch comes back down."""

    batch: int  # the index of the batch (the iteration the first module read it)
    x: torch.Tensor  # the module's input
    weights: dict[str, torch.Tensor]  # the weights the forward used (a snapshot)
    buffers: dict[str, torch.Tensor]  # the BN buffers as they were before the forward
    out: torch.Tensor  # the output, with its autograd graph


@METHODS.register("fdg")
class FullyDecoupled(Stage):
    """Forward and backward both pipelined: every module works on a different batch, every iteration.

    At iteration t module k (0-based, of K) runs the forward of batch t-k: the
    first module reads batch t, the others what the module below sent at t-1.
    So the top module scores batch t-(K-1) (the first K-1 iterations score
    none; the reported loss and logits come with that batch's labels, which the
    top module queues as they arrive with each iteration), and the gradient for
    module k's forward comes back 2(K-1-k) iterations after it.

    Module k < K-1 keeps its last 2(K-1-k) forwards. At iteration t it
    backpropagates the oldest (batch t-2(K-1)+k) with the gradient that module
    k+1 sent at t-1 multiplied by β (option ``shrink``), sends the gradient at
    its input down (already scaled: module k's gradient carries β^(K-1-k)),
    updates, and only then runs its new forward, stores it and sends its output
    up. The top module does forward, loss, backward and update on the batch it
    received, unscaled. Module k makes no update in its first 2(K-1-k)+k
    iterations; in its first k it has no batch and does nothing. Every message
    is tagged with its batch's index and checked on receipt.

    Memory: backward first, so module k holds at most 2(K-1-k) graphs and as
    many weight snapshots (the oldest is freed before the new forward is built;
    the other order would peak at 2(K-1-k)+1), about twice DDG's K-k at the
    same k. BatchNorm's running statistics move once per batch, in its forward.

    Where this differs from the released code (ZHUANGHP/FDG): as in DDG, every
    forward of a module below the top runs on a snapshot of the weights of that
    moment (``functional_call``), so the delayed backward computes the gradient
    at those stale weights. The released code backpropagates its stored graphs
    after in-place optimizer steps that the PyTorch it ran on did not detect,
    which mixes the old activations with the new weights. The released code
    also applies the top module's update at the start of the next iteration;
    that is the same update, only later.

    The pipeline keeps flowing across epoch boundaries (the released code does
    the same): the first batches of an epoch are scored in it while the last
    K-1 of the previous epoch's are scored at its start, so an epoch's train
    loss and accuracy cover the batches scored during it.
    """

    name = "fdg"
    summary = "fully decoupled: pipelined forwards and delayed gradients through stored graphs, shrunk by β per module"
    Options = FDGOptions
    family = DELAYED_GRADIENT
    table_order = 2.5  # after DDG (2), before DNI (3)
    locking = UNLOCKED

    @classmethod
    def graph_lifetime(cls, num_stages: int) -> int:
        # Module 0's forward of a batch waits 2(K-1) iterations for its gradient: longer than K + 1 from K = 4.
        return max(num_stages + 1, 2 * (num_stages - 1))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.options.validate()  # also when the Options come built, not parsed
        # Iterations between module k's forward of a batch and the gradient of that batch reaching it.
        self.delay = 2 * (self.num_stages - 1 - self.index)
        self.stored: deque[_Stored] = deque()
        self.labels = QueuedLabels(self.name)  # the top module's, of the batches not yet scored

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self._top(t, x, y))
        late = t - self.delay - self.index  # the batch whose gradient module k+1 sent at t-1
        if late >= 0:
            grad = yield Recv(DOWN, expect=(late,))
            old = self.stored[0]
            if old.batch != late:
                raise RuntimeError(f"fdg module {self.index} at iteration {t}: the oldest stored forward is of "
                                   f"batch {old.batch}, the gradient of batch {late}")
            self.backward(old.out, grad * self.options.shrink)
            self.stored.popleft()
            for name, p in self.module.named_parameters():
                p.grad = old.weights[name].grad
            if not self.is_first:
                yield Send(DOWN, old.x.grad, (late,))
            del old  # its graph is spent; the snapshot goes with it, before the new forward is built
            yield from self.apply_update()
        batch = t - self.index  # the batch this module forwards now; none yet in its first k iterations
        if batch < 0:
            return None
        x = yield from self.receive_input(x, t=batch)
        weights, before, out = forward_on_snapshot(self.module, x)  # stale weights, as DDG's
        self.stored.append(_Stored(batch, x, weights, before, out))
        yield Send(UP, out, (batch,))
        return None

    def _top(self, t, x, y) -> StepProgram:
        """The top module scores batch t-(K-1), whose labels arrived K-1 iterations ago."""
        due = self.labels.arrive(t, y, self.shard_weight, self.num_stages - 1)
        if due is None:
            return None  # nothing has reached the top module yet
        batch, labels, weight = due
        # Its messages tagged with the batch, as every other; its loss weighted as that batch's shard.
        out = yield from self.top_step(batch, x, labels, weight=weight)
        return dataclasses.replace(out, labels=labels)

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        # The stored inputs and activations are the graphs' own (counted as activations); the weight and
        # buffer copies keep those graphs valid while the live weights move on. The top module's queued
        # labels are FDG's too.
        held = {"weight_snapshots": [t for s in self.stored for t in (*s.weights.values(), *s.buffers.values())]}
        if self.is_last and self.num_stages > 1:
            held["stored_labels"] = self.labels.tensors()
        return held

    def state_dict(self) -> dict:
        # A graph cannot be saved; its input, weights and buffers can, and rebuild it exactly (same ops on
        # the same values).
        kept = [{"batch": s.batch, "x": s.x.detach(), "weights": {n: w.detach() for n, w in s.weights.items()},
                 "buffers": s.buffers} for s in self.stored]
        return {**super().state_dict(), "stored": kept,
                "labels": self.labels.state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.labels.load(state["labels"], self.device)
        rebuilt = rebuild_stored(self.module, state["stored"], self.device, not self.is_first)
        self.stored = deque(_Stored(int(s["batch"]), *r) for s, r in zip(state["stored"], rebuilt))
