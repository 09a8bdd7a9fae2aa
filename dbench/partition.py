"""Cut a flat list of blocks into K contiguous modules.

A partition is a list of K half-open block ranges ``(start, stop)`` that cover
every block once, in order. It is saved with the run.

- ``blocks``: equal block count per module (the original FR/DDG code's rule);
  when the count does not divide, the first modules get one block more.
- ``params``: minimise the largest parameter count of a module.
- ``counted`` (the default, ``auto``): minimise the slowest module's cost per
  training step of the method being run, as ``time`` does, with each block's
  forward and backward counted instead of timed: its FLOPs
  (``torch.utils.flop_counter``: matrix products, convolutions, attention)
  plus ``ELEMENT_FLOPS`` per element its operations write (the memory-bound
  work FLOPs miss), on the meta device from the sample batch's shape.
  Computed from the model alone, so the cut is the same on every machine,
  device and engine, and a decoupled method's numbers (for which the cut is
  part of the algorithm) with it.
- ``time``: profile the forward and the backward of every block on the target
  device and minimise the slowest module's cost *per training step of the
  method being run* (torchgpipe's balance-by-time idea, made method-aware):
  each method says what one step costs a module, given the module's forward
  and backward times (:meth:`dbench.method.Stage.step_cost`). For BP, DDG or
  DFA that is forward + backward; FR's modules below the top add a second
  forward (play, then replay), so FR's balanced cut gives its top module more
  blocks than BP's does. DNI's modules below the top also run their
  synthesizer, whose cost depends on the shape at the cut (a full-resolution
  cut costs many times a low-resolution one), so it is profiled once per
  candidate output shape and added at each candidate cut.
- explicit cut points, e.g. ``4,8`` for K=3: modules [0,4), [4,8), [8,n);
  or ``from:RUN_DIR``, the cut a recorded run trained with (dbench.plan).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dbench.devices import synchronize
from dbench.errors import DbenchError
from dbench import interrupts

RULES = ("blocks", "params", "counted", "time")
AUTO = "auto"  # the default: "counted", a cut from the model alone (the same on every machine and engine)
FROM = "from:"  # --split from:RUN_DIR, the cut of a recorded run
Ranges = list[tuple[int, int]]
# step_cost(forward_s, backward_s, index, num_modules) -> seconds of one training step of that module
StepCost = Callable[[float, float, int, int], float]


class BlockTime(NamedTuple):
    forward: float  # seconds, forward with autograd recording (as in training)
    backward: float  # seconds
    output_shape: tuple[int, ...] = ()  # of the block's output, batch first: where a cut after it would send


# boundary_cost(output_shape) -> the cost per step (seconds or FLOPs, as the blocks') a module below the top
# spends at its output, beyond its forward and backward (DNI's synthesizer); it depends on where the cut
# falls, not on the blocks inside
BoundaryCost = Callable[[tuple[int, ...]], float]


def forward_backward(forward: float, backward: float, index: int, num_modules: int) -> float:
    """BP's cost of one step of a module: one forward, one backward."""
    return forward + backward


def parse_split(spec: str) -> str | list[int]:
    """``auto``/``blocks``/``params``/``counted``/``time``, ``from:RUN_DIR``, or comma-separated cut points."""
    if spec in (AUTO, *RULES):
        return spec
    if spec.startswith(FROM):
        if not spec[len(FROM):]:
            raise DbenchError(f"bad --split {spec!r}: name the run whose cut to reuse, as from:RUN_DIR")
        return spec
    try:
        cuts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise DbenchError(
            f"bad --split {spec!r}: expected one of {', '.join((AUTO, *RULES))}, from:RUN_DIR, or increasing cut "
            f"points like 4,8"
        ) from None
    return cuts


def resolve_auto(split: str | list[int], engine: str, k: int) -> tuple[str | list[int], str | None]:
    """``--split auto`` as a rule, and the line that tells the user which and why (None: nothing to say).

    The default must not depend on the machine, its load or the engine: for a decoupled method the cut is
    part of the algorithm, so a cut chosen by the clock would change a run's numbers from one machine (or
    one try) to the next. FLOPs are counted from the model alone; ``time`` stays an explicit choice.
    """
    if split != AUTO:
        return split, None
    if k == 1:
        return "blocks", None
    return "counted", ("--split auto: balanced by the blocks' counted cost (FLOPs and elements written, from the "
                       "model alone: the same cut on every machine and engine); --split time balances this "
                       "machine's measured time instead")


def check_k(k: int, num_blocks: int, model: str = "the model") -> None:
    if k < 1:
        raise DbenchError(f"bad number of modules {k}: must be at least 1")
    if k > num_blocks:
        raise DbenchError(f"cannot cut {model} ({num_blocks} blocks) into {k} modules: K must be at most {num_blocks}")


def by_count(num_blocks: int, k: int) -> Ranges:
    base, extra = divmod(num_blocks, k)
    sizes = [base + (1 if i < extra else 0) for i in range(k)]
    return _ranges_from_sizes(sizes)


def from_cuts(cuts: Sequence[int], num_blocks: int, k: int) -> Ranges:
    cuts = list(cuts)
    if len(cuts) != k - 1:
        raise DbenchError(f"bad --split {','.join(map(str, cuts))}: K={k} modules need {k - 1} cut points")
    bounds = [0, *cuts, num_blocks]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise DbenchError(
            f"bad --split {','.join(map(str, cuts))}: cut points must increase strictly within 1..{num_blocks - 1}"
        )
    return list(zip(bounds, bounds[1:]))


def min_max(costs: Sequence[float], k: int) -> Ranges:
    """Contiguous cut of ``costs`` into k non-empty parts minimising the largest part sum."""
    prefix = _prefix(costs)
    return min_max_by(len(costs), k, lambda j, a, b: prefix[b] - prefix[a])


def min_max_by(n: int, k: int, part_cost: Callable[[int, int, int], float]) -> Ranges:
    """Contiguous cut of n blocks into k non-empty parts minimising the largest ``part_cost(j, a, b)``.

    ``part_cost(j, a, b)`` is the cost of blocks [a, b) as part j (0-based);
    it may depend on j (FR's top module does less per block than the others).
    Dynamic programme over (blocks used, parts): exact for any part cost that
    does not decrease when a part grows, O(k·n²), instant for the few hundred
    blocks a model has. Ties go to the earliest cut.
    """
    inf = float("inf")
    # best[j][i]: smallest possible max-part over the first i blocks in j parts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], part_cost(j - 1, s, i))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    bounds.reverse()
    return list(zip(bounds, bounds[1:]))


def step_costs(times: Sequence[BlockTime], ranges: Ranges, step_cost: StepCost = forward_backward,
               boundaries: Sequence[float] | None = None) -> list[float]:
    """Each module's cost per training step under ``step_cost``, for blocks cut as ``ranges``.

    ``boundaries[i]`` is added to a module below the top that ends with block i.
    """
    cost = _part_cost(times, len(ranges), step_cost, boundaries)
    return [cost(j, a, b) for j, (a, b) in enumerate(ranges)]


def balance_time(times: Sequence[BlockTime], k: int, step_cost: StepCost = forward_backward,
                 boundaries: Sequence[float] | None = None) -> Ranges:
    """The contiguous cut that minimises the slowest module's ``step_cost`` (plus its boundary cost)."""
    return min_max_by(len(times), k, _part_cost(times, k, step_cost, boundaries))


def boundary_costs(times: Sequence[BlockTime], boundary_cost: BoundaryCost) -> list[float]:
    """``boundary_cost`` after each block but the last (no cut falls there), profiled once per output shape."""
    seen: dict[tuple[int, ...], float] = {}
    costs = []
    for t in times[:-1]:
        if t.output_shape not in seen:
            seen[t.output_shape] = boundary_cost(t.output_shape)
        costs.append(seen[t.output_shape])
    return [*costs, 0.0]


def _part_cost(times: Sequence[BlockTime], k: int, step_cost: StepCost,
               boundaries: Sequence[float] | None) -> Callable[[int, int, int], float]:
    forward, backward = _prefix([t.forward for t in times]), _prefix([t.backward for t in times])
    edge = boundaries if boundaries is not None else [0.0] * len(times)

    def cost(j: int, a: int, b: int) -> float:
        own = step_cost(forward[b] - forward[a], backward[b] - backward[a], j, k)
        return own + (edge[b - 1] if j < k - 1 else 0.0)

    return cost


def _prefix(values: Sequence[float]) -> list[float]:
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    return prefix


def param_costs(blocks: Sequence[nn.Module]) -> list[float]:
    return [float(sum(p.numel() for p in b.parameters())) for b in blocks]


def time_costs(
    blocks: Sequence[nn.Module], sample: torch.Tensor, device: torch.device, repeats: int = 3
) -> list[BlockTime]:
    """Forward and backward seconds of each block on ``device``, each the median of ``repeats``.

    Blocks are profiled on copies so that BatchNorm statistics and the
    training trajectory are untouched.
    """
    costs = []
    h = sample.to(device)
    for block in blocks:
        interrupts.check()  # a stop swallowed where it landed (dbench/interrupts.py)
        probe = copy.deepcopy(block).to(device).train()
        # Token ids (a language model's input) carry no gradient; features do, as between modules.
        x = h.detach().requires_grad_() if h.is_floating_point() else h
        runs = [time_forward_backward(probe, x, device) for _ in range(repeats + 1)]
        # The first run warms up kernels and the allocator and is left out.
        with torch.no_grad():
            h = probe(x)
        costs.append(BlockTime(_median([r.forward for r in runs[1:]]), _median([r.backward for r in runs[1:]]),
                               tuple(h.shape)))
    return costs


# What writing one element costs, in FLOPs, in the counted cost model (``counted_costs``): element-wise work
# (normalization, activations, additions, copies) is bound by memory, not arithmetic, and a block's time
# follows its FLOPs plus this many per element its operations write. A constant of the model, fitted once to
# timed blocks (benchmarks/RESULTS.md, "The deterministic default cut"), the same on every machine: not a
# property of the one it runs on.
ELEMENT_FLOPS = 200.0


def counted_costs(blocks: Sequence[nn.Module], sample: torch.Tensor) -> list[BlockTime]:
    """Each block's forward and backward cost at ``sample``'s shape and dtype, counted, not timed
    (``BlockTime`` in FLOP-equivalents: ``count_work``).

    Counted on copies of the blocks on the meta device, which computes shapes only: no data, no clock, the
    same count on every machine. The backward is counted with the gradient of the block's input, as between
    modules.
    """
    costs = []
    h = torch.empty(sample.shape, dtype=sample.dtype, device="meta")
    for block in blocks:
        probe = copy.deepcopy(block).to("meta").train()
        x = h.detach().requires_grad_() if h.is_floating_point() else h
        out: list[torch.Tensor] = []
        forward = count_work(lambda: out.append(probe(x)))
        backward = count_work(lambda: out[0].backward(torch.ones_like(out[0]))) if out[0].requires_grad else 0.0
        h = out[0].detach()
        costs.append(BlockTime(forward, backward, tuple(h.shape)))
    return costs


class _Written(TorchDispatchMode):
    """Counts the elements every operation writes (its outputs; a view writes nothing)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def count_work(run: Callable[[], object]) -> float:
    """What ``run()`` costs in the counted model: the FLOPs ``torch.utils.flop_counter`` counts (matrix
    products, convolutions, attention) plus ``ELEMENT_FLOPS`` per element its operations write."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, _Written() as written:
        run()
    return float(counter.get_total_flops()) + ELEMENT_FLOPS * written.elements


def time_forward_backward(module: nn.Module, x: torch.Tensor, device: torch.device) -> BlockTime:
    """Seconds of one forward and one backward (of a gradient of ones) of ``module`` on ``x``.

    Host clocks around device synchronizations, not ``torch.utils.benchmark.Timer``: the two phases are
    timed apart within one call (the backward needs that forward's graph), where a Timer times a statement
    as a whole."""
    # Synchronize around each phase so the host clock measures finished GPU work, not launches.
    synchronize(device)
    start = time.perf_counter()
    out = module(x)
    synchronize(device)
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    synchronize(device)
    x.grad = None
    return BlockTime(middle - start, time.perf_counter() - middle)


def median_seconds(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``run()`` on ``device`` over ``repeats`` calls, after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize(device)  # the host clock must see the device's work finish, not just its launch
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return _median(times[1:])


def _median(values: list[float]) -> float:
    # The higher of the two middle values for an even count, as the cuts recorded so far were taken with.
    return statistics.median_high(values)




def partition(
    blocks: Sequence[nn.Module],
    k: int,
    split: str | list[int],
    *,
    sample: torch.Tensor | None = None,
    device: torch.device | None = None,
    model: str = "the model",
    step_cost: StepCost = forward_backward,
    boundary_cost: BoundaryCost | None = None,
) -> Ranges:
    """Cut ``blocks`` into k modules by ``split``.

    For ``counted`` and ``time``, ``step_cost`` and ``boundary_cost`` (in the same unit) are the method's
    cost model, and ``sample`` a batch (``counted`` reads its shape and dtype only).
    """
    check_k(k, len(blocks), model)
    if isinstance(split, list):
        return from_cuts(split, len(blocks), k)
    if split == "blocks":
        return by_count(len(blocks), k)
    if split == "params":
        return min_max(param_costs(blocks), k)
    if split == "counted":
        if sample is None:
            raise ValueError("a counted split needs a sample batch")
        counted = counted_costs(blocks, sample)
        boundaries = boundary_costs(counted, boundary_cost) if boundary_cost is not None else None
        return balance_time(counted, k, step_cost, boundaries)
    if split == "time":
        if sample is None or device is None:
            raise ValueError("split by time needs a sample batch and a device")
        times = time_costs(blocks, sample, device)
        boundaries = boundary_costs(times, boundary_cost) if boundary_cost is not None else None
        return balance_time(times, k, step_cost, boundaries)
    raise DbenchError(f"unknown split {split!r}; known: {', '.join(RULES)} or cut points like 4,8")


def split_modules(blocks: Sequence[nn.Module], ranges: Ranges) -> list[nn.Sequential]:
    return [nn.Sequential(*blocks[a:b]) for a, b in ranges]


def _ranges_from_sizes(sizes: Sequence[int]) -> Ranges:
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges
