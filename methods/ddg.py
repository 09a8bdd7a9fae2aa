"""DDG: decoupled parallel backpropagation with delayed gradients (Huo, Gu, Yang, Huang, ICML 2018)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from dbench.method import DELAYED_GRADIENT, DOWN, UNLOCKED, UP, Recv, Send, Stage, StepProgram
from dbench.method_tools import forward_on_snapshot, rebuild_stored
from dbench.registry import METHODS


@dataclass
class _Stored:
    """One iteration's forward, kept until its delayed gradient arrives."""

    x: torch.Tensor  # the module's input
    weights: dict[str, torch.Tensor]  # the weights the forward used (a snapshot)
    buffers: dict[str, torch.Tensor]  # the BN buffers as they were before the forward
    out: torch.Tensor  # the output, with its autograd graph


@METHODS.register("ddg")
class DelayedGradients(Stage):
    """Forward with a graph now, backpropagate the delayed ``δ_k`` through that old graph later.

    Module k (0-based, delay ``d = K-1-k``) keeps the graph of its last ``d+1``
    forwards. At iteration t it receives the ``δ_k`` that module k+1 computed at
    t-1, which belongs to the batch of iteration t-d, backpropagates it through
    the stored graph of that iteration and so gets the gradient at the weights
    of that iteration; ``δ_{k-1}`` goes down (used at t+1). The top module has
    no delay. Module k makes no update in its first d iterations.

    The optimizer updates the parameters in place, which would invalidate the
    old graphs (autograd's version check). So every forward of a delayed module
    runs on a snapshot of the current weights and buffers (``functional_call``),
    and that snapshot is kept with its graph: ``d+1`` weight copies are part of
    DDG's memory, next to the ``d+1`` graphs.
    """

    name = "ddg"
    summary = "delayed gradients: backprop late gradients through stored graphs at the stale weights"
    family = DELAYED_GRADIENT
    table_order = 2
    locking = UNLOCKED

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = self.num_stages - 1 - self.index
        self.stored: deque[_Stored] = deque()

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y))
        x = yield from self.receive_input(x, t=t)
        weights, before, out = forward_on_snapshot(self.module, x)
        self.stored.append(_Stored(x, weights, before, out))
        yield Send(UP, out, (t,))
        if len(self.stored) <= self.delay:
            return None  # warm-up: no gradient has reached this module yet
        grad = yield Recv(DOWN, expect=(t - self.delay,))  # δ_k from module k+1 at t-1, for the batch of t-d
        old = self.stored[0]  # dropped only after its backward: what it holds counts until then
        self.backward(old.out, grad)
        self.stored.popleft()
        for name, p in self.module.named_parameters():
            p.grad = old.weights[name].grad
        if not self.is_first:
            yield Send(DOWN, old.x.grad, (t - self.delay,))
        yield from self.apply_update()
        return None

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        # The stored inputs and activations are the graphs' own (counted as
        # activations); the weight and buffer copies are what DDG adds to keep
        # those graphs valid while the live weights move on.
        return {"weight_snapshots": [t for s in self.stored for t in (*s.weights.values(), *s.buffers.values())]}

    def state_dict(self) -> dict:
        # A graph cannot be saved; its inputs, weights and buffers can, and
        # rebuild it exactly (same ops on the same values).
        kept = [{"x": s.x.detach(), "weights": {n: w.detach() for n, w in s.weights.items()}, "buffers": s.buffers}
                for s in self.stored]
        return {**super().state_dict(), "stored": kept}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stored = deque(_Stored(*r) for r in rebuild_stored(self.module, state["stored"], self.device,
                                                                 not self.is_first))
