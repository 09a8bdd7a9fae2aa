"""The ``time`` cut, checked by timing each candidate's modules running the method itself.

The per-block profile (dbench.partition) predicts a module's step as a sum of
its blocks' forward and backward times under the method's cost model. A whole
module does not cost exactly that sum: a forward without a graph (FR's play)
is cheaper than one that records it, a module's blocks share caches, the
method adds work the cost model does not see (the update, snapshots of
weights, memory accounting, staging messages). So the cut chosen from the
profile is then *measured*: the method trains a few steps on the local engine
with the candidate's modules, one module at a time, and each module's compute
and communication per step is read from dbench's own meters. Where a module
measured heavier than predicted, its blocks' profiled times are scaled by that
ratio and the cut is chosen again (or, once that repeats itself, the slowest
module hands a block to its lighter neighbour); the candidate whose slowest
module measured fastest wins. Balance is reported as the slowest module's step time over the
mean module's (1.00 is perfect): predicted from the profile, and measured.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dbench.devices import synchronize
from dbench.partition import BlockTime, Ranges, StepCost, balance_time, split_modules, step_costs
from dbench import interrupts

MEASURED_STEPS = 2  # timed steps per candidate, after the warm-up
MAX_CANDIDATES = 4  # cuts timed at most (each costs 2K + 2 training steps of the whole model)


@dataclass(frozen=True)
class Balance:
    """The chosen cut, with what the profile predicted and what timing the method measured for it."""

    ranges: Ranges
    predicted: list[float]  # seconds per step of each module, from the per-block profile
    measured: list[float]  # seconds per step of each module, the method timed on the whole module
    candidates: int  # cuts timed

    def record(self) -> dict:
        return {"predicted_s": self.predicted, "measured_s": self.measured, "candidates": self.candidates,
                "predicted_balance": imbalance(self.predicted), "measured_balance": imbalance(self.measured)}


def imbalance(costs: Sequence[float]) -> float:
    """The slowest module's cost over the mean module's: 1.0 when balanced."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0


def method_step_seconds(blocks: Sequence[nn.Module], ranges: Ranges, method: str, options: Any,
                        devices: Sequence[torch.device], batch: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                        optim: dict) -> list[float]:
    """Seconds per training step that each module of this cut spends computing and moving its messages.

    The method runs on copies of the blocks on the local engine, module k on ``devices[k]`` (where the
    run will put it: a model cut because it does not fit one GPU is timed without having to), one
    module at a time, so each module's clock holds its own work only. Warm-up: 2K steps, past every
    method's start (no delayed module updates before K-1 steps; FDG's first module, before 2(K-1)),
    then the kernels and the allocator are warm too. The global generator is left as it was: a run's
    numbers must not depend on its cut having been timed.
    """
    from dbench.trainer import Trainer  # the trainer imports the engines, which import this package's peers

    k = len(ranges)
    devices = [torch.device(d) for d in devices]
    x, y = batch
    with torch.random.fork_rng(devices=sorted({d for d in devices if d.type == "cuda"}, key=str)):
        torch.manual_seed(0)
        trainer = Trainer(split_modules(copy.deepcopy(list(blocks)), ranges), method, devices=devices,
                          options=options, num_classes=num_classes, measure=True, **optim)
        for meter in trainer.meters.stages:
            meter.window = 0  # the clocks only: a run's steps past its accounting window carry no memory hooks
        for _ in range(2 * k):
            interrupts.check()  # a stop swallowed where it landed (dbench/interrupts.py)
            trainer.step_output(x, y)
        synchronize(*devices)
        trainer.meters.start_epoch()
        for _ in range(MEASURED_STEPS):
            interrupts.check()
            trainer.step_output(x, y)
        synchronize(*devices)
        records = trainer.meters.stop_epoch()
    return [(r["compute_s"] + r["comm_s"]) / MEASURED_STEPS for r in records]


def balance_measured(times: Sequence[BlockTime], k: int, step_cost: StepCost, boundaries: Sequence[float] | None,
                     measure: Callable[[Ranges], list[float]]) -> Balance:
    """The profile's balanced cut, then better cuts where timing the method shows a module off its prediction.

    ``measure(ranges)`` times the method on a cut (``method_step_seconds``). After each timing the next
    candidate is the cut balanced on the profile with each module's blocks scaled by its measured over
    predicted time; once that gives nothing new, the slowest module of the best cut so far gives one
    block to its lighter neighbour (a ratio per module cannot say which of its blocks is heavy). At most
    ``MAX_CANDIDATES`` cuts are timed; the one whose slowest module measured fastest is chosen.
    """
    edges = list(boundaries) if boundaries is not None else [0.0] * len(times)
    scaled_times, scaled_edges = list(times), list(edges)
    ranges: Ranges | None = balance_time(times, k, step_cost, edges)
    tried: list[tuple[Ranges, list[float]]] = []
    while ranges is not None and len(tried) < MAX_CANDIDATES:
        measured = measure(ranges)
        tried.append((ranges, measured))
        # What the (scaled) profile predicted for this cut, module by module: the ratio corrects its blocks.
        predicted = step_costs(scaled_times, ranges, step_cost, scaled_edges)
        for (a, b), m, p in zip(ranges, measured, predicted):
            ratio = m / p if p > 0 else 1.0
            for i in range(a, b):
                t = scaled_times[i]
                scaled_times[i] = BlockTime(t.forward * ratio, t.backward * ratio, t.output_shape)
                scaled_edges[i] *= ratio
        seen = [r for r, _ in tried]
        ranges = balance_time(scaled_times, k, step_cost, scaled_edges)
        if ranges in seen:
            ranges = _lighten_slowest(*min(tried, key=lambda t: max(t[1])))
            if ranges in seen:
                ranges = None
    best, measured = min(tried, key=lambda t: max(t[1]))
    return Balance(ranges=best, predicted=step_costs(times, best, step_cost, edges), measured=measured,
                   candidates=len(tried))


def _lighten_slowest(ranges: Ranges, measured: list[float]) -> Ranges | None:
    """``ranges`` with the slowest module's edge block moved to its lighter neighbour (None: it has one block)."""
    j = max(range(len(ranges)), key=lambda i: measured[i])
    a, b = ranges[j]
    if b - a < 2:
        return None
    bounds = [r[0] for r in ranges] + [ranges[-1][1]]
    left = measured[j - 1] if j > 0 else float("inf")
    right = measured[j + 1] if j + 1 < len(ranges) else float("inf")
    if left == right == float("inf"):
        return None
    if left <= right:
        bounds[j] += 1  # its first block goes to the module below
    else:
        bounds[j + 1] -= 1  # its last block goes to the module above
    return list(zip(bounds, bounds[1:]))
