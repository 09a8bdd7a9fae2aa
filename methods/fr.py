"""FR: features replay (Huo, Gu, Huang, NeurIPS 2018)."""
from __future__ import annotations

from collections import deque

import torch

from dbench.method import DELAYED_GRADIENT, DOWN, UNLOCKED, UP, Recv, Send, Stage, StepProgram
from dbench.method_tools import frozen_running_stats
from dbench.registry import METHODS


@METHODS.register("fr")
class FeaturesReplay(Stage):
    """Play forward without a graph, replay the stored input later with the current weights.

    Module k (0-based, delay ``d = K-1-k``) at iteration t:
    - play: ``h = F_k(h_in^t; w^t)`` with no graph, sent up; ``h_in^t`` is stored
      (a history of ``d+1`` inputs);
    - replay: the input of iteration ``t-d`` is run again through ``F_k`` with
      the *current* weights ``w^t``, the ``δ_k`` that module k+1 sent at
      iteration t-1 is backpropagated through it, ``δ_{k-1}`` goes down (to be
      used at t+1), and the module updates.
    The top module has no delay: play and replay are one forward with a graph.
    Module k makes no update in its first d iterations. BatchNorm running
    statistics are updated by the play only; the replay normalizes with batch
    statistics. Unlike the released code, the first module does not get twice
    the learning rate.
    """

    name = "fr"
    summary = "features replay: replay stored inputs with current weights, gradients one iteration late per module"
    family = DELAYED_GRADIENT
    table_order = 1
    locking = UNLOCKED

    @staticmethod
    def step_cost(forward: float, backward: float, index: int, num_stages: int) -> float:
        # Below the top a step is play (a forward without a graph), replay (a
        # forward with one) and backward; the top module does one of each. The
        # no-graph play is counted as a full forward: it does the same arithmetic.
        forwards = 1 if index == num_stages - 1 else 2
        return forwards * forward + backward

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = self.num_stages - 1 - self.index
        self.history: deque[torch.Tensor] = deque()

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y))
        x = yield from self.receive_input(x, needs_grad=False, t=t)  # play keeps no graph
        with torch.no_grad():
            out = self.module(x)  # play: the only pass that updates BN running statistics
        yield Send(UP, out, (t,))
        self.history.append(x)
        if len(self.history) <= self.delay:
            return None  # warm-up: no gradient has reached this module yet
        # δ_k that module k+1 computed at iteration t-1, for the batch of iteration t-d.
        grad = yield Recv(DOWN, expect=(t - self.delay,))
        stored = self.history.popleft()
        if not self.is_first:
            stored.requires_grad_()
        with frozen_running_stats(self.module):
            replayed = self.module(stored)  # current weights w^t
        self.backward(replayed, grad)
        if not self.is_first:
            yield Send(DOWN, stored.grad, (t - self.delay,))
        yield from self.apply_update()
        return None

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"stored_inputs": list(self.history)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": [h.detach() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = deque(h.to(self.device) for h in state["history"])
