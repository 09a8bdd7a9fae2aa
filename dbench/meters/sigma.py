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
the whole network the same over the concatenated vectors.

The probe set's gradient is itself an estimate of the true gradient, and its
noise inflates ``||∇_k||²``: with a few batches, BP's σ comes out well below 1
whenever per-sample gradients disagree (a noisy data set, late training). So
the probe set is also split in two halves A and B, and ``<∇_A, ∇_B>`` (the
product of two independent estimates) estimates ``||∇f||²`` without that
bias. ``sigma_corrected = <∇_k, g_k> / <∇_A, ∇_B>`` is centred on 1 for BP;
``sigma`` is the plug-in value the definition reads literally. Both are
recorded; over a run, the corrected one is a ratio of sums over the probes
(one probe's cross term can be near zero or negative). A module that makes
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
    """Stage k's share of a plain-BP pass over the probe batches.

    Returns ``(half_a, half_b, n_a, n_b)``: the gradients of the mean loss over
    all batches summed over the first ``n_a`` and the last ``n_b`` batches, so
    ``∇_{w_k} = half_a + half_b``. A generator for the engine, like
    ``Stage.train_step``; ``xs`` are the probe inputs (first stage only), ``ys``
    the labels on this stage's device.
    """
    params = [p for p in stage.module.parameters() if p.requires_grad]
    halves = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    n = len(ys)
    n_a = n - n // 2
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
            loss = stage.loss_fn(out, y) / n
            grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
        else:
            yield Send(PROBE_UP, out)
            delta = yield Recv(PROBE_DOWN)
            # No inputs: the first module has no trainable parameters, so nothing to differentiate here.
            grads = torch.autograd.grad(out, inputs, grad_outputs=delta, allow_unused=True) if inputs else ()
        if not stage.is_first:
            yield Send(PROBE_DOWN, grads[-1])
        for acc, g in zip(halves[0 if i < n_a else 1], grads[: len(params)]):
            if g is not None:
                acc.add_(g)
    return halves[0], halves[1], n_a, n - n_a


class SigmaCapture:
    """Holds a module's true gradient for one probe iteration and reads ``g_k`` when the module updates."""

    def __init__(self):
        self.truth: tuple | None = None  # what true_gradient returned
        self.sums: torch.Tensor | None = None  # (<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²) on the device

    def arm(self, truth: tuple) -> None:
        self.truth, self.sums = truth, None

    @staticmethod
    def _true_sums(truth: tuple, device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``∇`` (the whole probe set), ``||∇||²`` and ``<∇_A, ∇_B>`` (NaN with a single batch)."""
        half_a, half_b, n_a, n_b = truth
        total = [a.double() + b.double() for a, b in zip(half_a, half_b)]
        sq = sum((t.pow(2).sum() for t in total), torch.zeros((), dtype=torch.float64, device=device))
        if n_b == 0:
            cross = torch.full((), float("nan"), dtype=torch.float64, device=device)
        else:
            # ∇_A = half_a·n/n_a and ∇_B = half_b·n/n_b: the means over each half.
            n = n_a + n_b
            raw = sum(((a.double() * b.double()).sum() for a, b in zip(half_a, half_b)),
                      torch.zeros((), dtype=torch.float64, device=device))
            cross = raw * (n * n / (n_a * n_b))
        return total, sq, cross

    def before_update(self, stage: Stage) -> None:
        if self.truth is None or self.sums is not None:
            return
        params = [p for p in stage.module.parameters() if p.requires_grad]
        total, sq, cross = self._true_sums(self.truth, stage.device)
        dot = gg = torch.zeros((), dtype=torch.float64, device=stage.device)
        for p, t in zip(params, total, strict=True):
            if p.grad is not None:
                g = p.grad.double()
                dot = dot + (t * g).sum()
                gg = gg + g.pow(2).sum()
        self.sums = torch.stack([dot, sq, cross, gg])

    def take(self) -> tuple[tuple[float, float, float, float], bool] | None:
        """``((<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²), updated)`` as numbers (a host sync), or None if not armed; disarms.

        A module that made no update this iteration applied the direction 0:
        its sums are ``(0, ||∇||², <∇_A,∇_B>, 0)`` and ``updated`` is False.
        """
        truth, sums = self.truth, self.sums
        self.truth = self.sums = None
        if truth is None:
            return None
        if sums is None:
            _, sq, cross = self._true_sums(truth, truth[0][0].device if truth[0] else "cpu")
            return (0.0, float(sq), float(cross), 0.0), False
        dot, sq, cross, gg = sums.tolist()
        return (dot, sq, cross, gg), True


@dataclass(frozen=True)
class SigmaResult:
    """σ and cosine of one module, or of the whole network (module None), with the sums they come from."""

    module: int | None
    sigma: float | None  # <∇,g> / ||∇||², ∇ the probe set's gradient (the plug-in value)
    sigma_corrected: float | None  # <∇,g> / <∇_A,∇_B>: the probe's own noise taken out of ||∇f||²
    cosine: float | None
    true_grad_norm: float | None
    method_grad_norm: float | None
    sums: tuple[float, float, float, float]  # (<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²)


def sigma_of(module: int | None, sums: tuple[float, float, float, float], updated: bool = True) -> SigmaResult:
    """σ and cosine from the sums; a module that made no update has none (only its true gradient's norm)."""
    dot, sq, cross, gg = sums
    if not updated:
        return SigmaResult(module, None, None, None, math.sqrt(sq), None, sums)
    sigma = dot / sq if sq > 0 else None
    corrected = dot / cross if math.isfinite(cross) and cross > 0 else None
    cosine = dot / math.sqrt(sq * gg) if sq > 0 and gg > 0 else None
    return SigmaResult(module, sigma, corrected, cosine, math.sqrt(sq), math.sqrt(gg), sums)


def results(taken: list[tuple[tuple[float, ...], bool]]) -> tuple[list[SigmaResult], SigmaResult]:
    """σ per module and of the whole network from every module's ``SigmaCapture.take()``, in module order."""
    modules = [sigma_of(k, sums, updated) for k, (sums, updated) in enumerate(taken)]
    return modules, sigma_of(None, combine([sums for sums, _ in taken]))


def combine(per_module: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The whole network's sums: the same products over the concatenated vectors.

    A module in warm-up contributes its true gradient and a zero update, which
    is the direction the network really took at that iteration.
    """
    return tuple(sum(s[i] for s in per_module) for i in range(len(per_module[0])))
