"""The sufficient-direction constant σ, measured as ALGORITHMS.md defines it.

At a probe iteration t, before any module updates:

1. the true gradient ``∇f(w^t)`` is computed by plain backpropagation through
   all modules on a fixed probe set (a few training batches, without
   augmentation), with BatchNorm in training mode but its running statistics
   untouched, and with ``torch.autograd.grad`` so no ``.grad`` is written;
2. the iteration then runs as usual, and when module k hands its gradient
   ``g_k^t`` to the optimizer, the meter reads three numbers on the device:
   ``<∇_k, g_k>``, ``||∇_k||²`` and ``||g_k||²``.

From these, per module ``σ_k = <∇_k, g_k> / ||∇_k||²`` and the cosine, and for
the whole network the same over the concatenated vectors. A module that makes
no update at that iteration (the warm-up of DDG and FR) has no σ. Nothing the
probe does reaches the training state, so the losses are the same with probing
on or off (a test checks this for every method).

The probe pass travels on its own channels (PROBE_UP, PROBE_DOWN), so it runs
through any engine exactly like a training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dbench.method import PROBE_DOWN, PROBE_UP, Recv, Send, Stage, frozen_running_stats


def true_gradient(stage: Stage, xs: list[torch.Tensor] | None, ys: list[torch.Tensor]):
    """Stage k's share of a plain-BP pass over the probe batches; returns ``∇_{w_k}`` of the mean loss.

    A generator for the engine, like ``Stage.train_step``. ``xs`` are the probe
    inputs (first stage only), ``ys`` the labels on this stage's device.
    """
    params = [p for p in stage.module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i, y in enumerate(ys):
        if stage.is_first:
            h = xs[i]
        else:
            h = (yield Recv(PROBE_UP)).requires_grad_()
        inputs = params if stage.is_first else [*params, h]
        # Batch statistics, as in training, but the running statistics stay as they are.
        with frozen_running_stats(stage.module):
            out = stage.module(h)
        if stage.is_last:
            loss = stage.loss_fn(out, y) / len(ys)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        else:
            yield Send(PROBE_UP, out)
            delta = yield Recv(PROBE_DOWN)
            grads = torch.autograd.grad(out, inputs, grad_outputs=delta, allow_unused=True)
        if not stage.is_first:
            yield Send(PROBE_DOWN, grads[-1])
        for acc, g in zip(total, grads[: len(params)]):
            if g is not None:
                acc.add_(g)
    return total


class SigmaCapture:
    """Holds a module's true gradient for one probe iteration and reads ``g_k`` when the module updates."""

    def __init__(self):
        self.true_grad: list[torch.Tensor] | None = None
        self.sums: torch.Tensor | None = None  # (<∇,g>, ||∇||², ||g||²) on the device

    def arm(self, true_grad: list[torch.Tensor]) -> None:
        self.true_grad, self.sums = true_grad, None

    def before_update(self, stage: Stage) -> None:
        if self.true_grad is None or self.sums is not None:
            return
        params = [p for p in stage.module.parameters() if p.requires_grad]
        dot = nn_ = gg = torch.zeros((), dtype=torch.float64, device=stage.device)
        for p, t in zip(params, self.true_grad, strict=True):
            t = t.double()
            nn_ = nn_ + t.pow(2).sum()
            if p.grad is not None:
                g = p.grad.double()
                dot = dot + (t * g).sum()
                gg = gg + g.pow(2).sum()
        self.sums = torch.stack([dot, nn_, gg])

    def take(self) -> tuple[tuple[float, float, float], bool] | None:
        """``((<∇,g>, ||∇||², ||g||²), updated)`` as numbers (a host sync), or None if not armed; disarms.

        A module that made no update this iteration applied the direction 0:
        its sums are ``(0, ||∇||², 0)`` and ``updated`` is False.
        """
        true_grad, sums = self.true_grad, self.sums
        self.true_grad = self.sums = None
        if true_grad is None:
            return None
        if sums is None:
            norm = sum(t.double().pow(2).sum() for t in true_grad)
            return (0.0, float(norm), 0.0), False
        dot, nn_, gg = sums.tolist()
        return (dot, nn_, gg), True


@dataclass(frozen=True)
class SigmaResult:
    """σ and cosine of one module, or of the whole network (module None)."""

    module: int | None
    sigma: float | None
    cosine: float | None
    true_grad_norm: float | None
    method_grad_norm: float | None


def sigma_of(module: int | None, sums: tuple[float, float, float], updated: bool = True) -> SigmaResult:
    """σ and cosine from the three sums; a module that made no update has none (only its true gradient's norm)."""
    dot, nn_, gg = sums
    if not updated:
        return SigmaResult(module, None, None, math.sqrt(nn_), None)
    sigma = dot / nn_ if nn_ > 0 else None
    cosine = dot / math.sqrt(nn_ * gg) if nn_ > 0 and gg > 0 else None
    return SigmaResult(module, sigma, cosine, math.sqrt(nn_), math.sqrt(gg))


def combine(per_module: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The whole network's sums: the same products over the concatenated vectors.

    A module in warm-up contributes its true gradient and a zero update, which
    is the direction the network really took at that iteration.
    """
    return tuple(sum(s[i] for s in per_module) for i in range(3))
