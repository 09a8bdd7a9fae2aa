"""The exact pipeline schedules large-model training uses, run by torch.distributed.pipelining's own runner.

Interleaved 1F1B, looped BFS, interleaved zero bubble, ZB-V and DualPipeV
(ALGORITHMS.md, "Frontier exact schedules"). Each computes GPipe's update: the
batch split into M micro-batches by ``torch.tensor_split``, each micro-batch's
loss weighted by its share of the batch, gradients accumulated, one update per
batch. They differ in which modules a device holds (the model is cut into V·K
modules: looped, device k holds k, k+K, ...; V-shaped, device k holds k and
2K−1−k) and in the order of forwards and backwards, which is torch's: dbench
builds torch's ``PipelineStage`` for each module a device holds and calls the
schedule's ``step``, so what is timed is the runner users run, not a third
implementation. Then dbench's own update (the optimizer, and the average over
replicas) runs as for every other method.

What the meters see, and what they do not. Torch's runner posts and waits on
its own point-to-point operations between compute actions, so a device's clock
counts as compute the forward, backward, input-backward and weight-backward of
each micro-batch (the stage's chunk calls, wrapped) and the update, and as
waiting everything in between: communication and waiting are not separated.
Memory: the saved-tensor hooks account what the runner's in-flight
micro-batches hold (on every device, within the meter's window), and the
allocator's peak on a GPU. σ is not measured: the σ probe passes through the
modules in order over neighbouring devices, which a looped or V-shaped layout
does not have. The local engine cannot run them (torch's runner needs a process
per device): they run under ``--engine distributed`` or torchrun, which ``auto``
picks for them.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from dbench.errors import DbenchError
from dbench.method import DOWN, EXACT_GRADIENT, LOCKED, UP, Stage, StepOutput, StepProgram
from dbench.method_tools import MicrobatchOptions
from dbench.registry import METHODS

# A tensor handed between two processes outside the runner: ndim, then the shape (padded), then the dtype.
MAX_DIMS = 6
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ScheduleOptions(MicrobatchOptions):
    """Options of every schedule (the V-shaped ones, whose V is 2, take no more)."""

    microbatches: int | None = field(default=None, metadata={
        "help": "M, micro-batches per batch (M <= batch size) [default: 4K]"})


@dataclass(frozen=True)
class LoopedOptions(ScheduleOptions):
    """Options of the looped schedules (device k holds modules k, k+K, ..., k+(V-1)K)."""

    virtual: int = field(default=2, metadata={"help": "V, modules per device (V*K <= the model's blocks)"})

    def validate(self) -> None:
        super().validate()
        if self.virtual < 1:
            raise DbenchError(f"bad virtual {self.virtual}: must be an integer >= 1")


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@functools.cache
def _pipelining() -> tuple[Any, type]:
    """torch's ``schedules`` module and dbench's metered ``PipelineStage``, imported at first use: importing
    torch.distributed.pipelining costs about half a second of CPU (it loads torch._dynamo and DTensor), paid
    otherwise by every dbench process that loads the method registry, whatever method it runs."""
    from torch.distributed.pipelining import PipelineStage, schedules

    class _Metered(PipelineStage):
        """Torch's stage, telling dbench's meter where each compute action starts and ends (see the module's
        docstring): the runner's waits and transfers fall between them."""

        def __init__(self, owner: "TorchSchedule", *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.owner = owner

        def forward_one_chunk(self, *args, **kwargs):
            self.owner.computing()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                self.owner.waiting(UP)

        def backward_one_chunk(self, *args, **kwargs):
            self.owner.computing()
            self.owner.before_backward()  # the activations its graph saved are all alive: the memory peak
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                self.owner.waiting(DOWN)

        def backward_weight_one_chunk(self, *args, **kwargs):
            self.owner.computing()
            try:
                return super().backward_weight_one_chunk(*args, **kwargs)
            finally:
                self.owner.waiting(DOWN)

    return schedules, _Metered


class TorchSchedule(Stage):
    """Device ``index``'s modules under one of torch's multi-stage schedules (``schedule``, the class name)."""

    family = EXACT_GRADIENT
    locking = LOCKED
    engines = ("distributed",)
    measures_sigma = False
    schedule: ClassVar[str] = ""
    # Whether the schedule splits the backward into input (I) and weight (W) gradients. Under torch 2.14's
    # split, the autograd graphs that carried the meter's saved-tensor records stay alive across steps (one
    # micro-batch's a step, growing; whether they also hold memory without the hooks was not settled:
    # a 12-step run's resident memory showed no growth beyond its noise), so the meter's lifetime check fails
    # and its records would grow with the run: these schedules' activations are not accounted.
    splits_backward: ClassVar[bool] = False

    @classmethod
    def facts(cls, num_stages: int, options: Any = None) -> dict:
        # read by the verdict: a run whose activations were not accounted has no accounted peak to compare
        return {**super().facts(num_stages, options), "accounts_activations": not cls.splits_backward}

    @classmethod
    def holder(cls, piece: int, num_stages: int, options: Any = None) -> int:
        """The device that holds module ``piece`` of the V·K."""
        return next(k for k in range(num_stages) if piece in cls.placement(k, num_stages, options))

    @classmethod
    def bubble(cls, num_stages: int, m: int, v: int) -> float | None:
        """The idle share of the ideal pipelined time M·(t_F + t_B) with t_F = t_I = t_W (ALGORITHMS.md)."""
        raise NotImplementedError

    @classmethod
    def ideal_speedup(cls, num_stages: int, options: Any = None) -> float | None:
        """K / (1 + bubble) over model-parallel BP on the K devices, the bubble from the schedule's paper."""
        options = options or cls.Options()
        if num_stages == 1:
            return 1.0
        bubble = cls.bubble(num_stages, options.microbatch_count(num_stages), cls.modules_per_device(options))
        return None if bubble is None else num_stages / (1 + bubble)

    @classmethod
    def check_microbatches(cls, m: int, num_stages: int, v: int) -> None:
        """Refuse (one line) an M the schedule cannot run, before torch's runner would."""

    @classmethod
    def check_run(cls, options: Any, num_stages: int, batch_size: int, devices: list) -> None:
        if not hasattr(_pipelining()[0], cls.schedule):  # pyproject's torch bound is pipelining's (2.4), older than some
            raise DbenchError(f"method {cls.name!r} runs torch's {cls.schedule}, which torch {torch.__version__} "
                              f"does not have: install a newer torch (dbench is tested with 2.14)")
        m = options.microbatch_count(num_stages)
        if m > batch_size:
            raise DbenchError(f"bad microbatches {m}: a batch of {batch_size} splits into at most {batch_size} "
                              f"micro-batches (1 <= M <= batch size)")
        cls.check_microbatches(m, num_stages, cls.modules_per_device(options))

    @classmethod
    def check_epoch(cls, options: Any, num_stages: int, sizes: set[int]) -> None:
        # torch's runner splits every batch into M micro-batches of one shape (its stages' receive buffers are
        # sized once, from the first), an epoch's smaller last batch too
        m = options.microbatch_count(num_stages)
        for size in sorted(sizes):
            if size % m:
                raise DbenchError(f"bad --batch-size for {cls.name}: a batch (or replica shard) of {size} samples "
                                  f"does not split into M = {m} micro-batches of equal size, which torch's runner "
                                  f"needs; pick a batch size (and one for the epoch's last batch) that M divides")

    def __init__(self, index, num_stages, module, device, optim, loss_fn, options=None, num_classes=None):
        super().__init__(index, num_stages, module, device, optim, loss_fn, options, num_classes)
        self.pieces = self.placement(index, num_stages, self.options)
        self.chunks = list(self.module) if isinstance(self.module, nn.ModuleList) else [self.module]
        self.runners: dict[int, Any] = {}  # batch size -> torch's schedule (its stages' buffers fit one shape)
        self.batch = 0

    @property
    def last_holder(self) -> int:
        return self.holder(self.modules_per_device(self.options) * self.num_stages - 1, self.num_stages,
                           self.options)

    def computing(self) -> None:
        if self.observer is not None:
            self.observer.resumed()

    def waiting(self, channel: str) -> None:
        if self.observer is not None:
            self.observer.blocked(channel)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The micro-batch's share of the batch's mean (of its replica's shard, weighted as every replica loss),
        # GPipe's; the runner sums them (scale_grads=False), as dbench's GPipe accumulates them.
        return self.weighted(self.loss_fn(out, y) * (len(y) / self.batch))

    def runner(self, batch: int):
        """Torch's schedule for batches of ``batch`` samples: its stages keep buffers of one micro-batch shape,
        so an epoch's smaller last batch gets its own (built once, on every device at the same batch)."""
        if batch not in self.runners:
            schedules, metered = _pipelining()
            total = self.modules_per_device(self.options) * self.num_stages
            stages = [metered(self, chunk, piece, total, self.device, group=self.pipeline_group)
                      for chunk, piece in zip(self.chunks, self.pieces)]
            m = self.options.microbatch_count(self.num_stages)
            self.runners[batch] = getattr(schedules, self.schedule)(stages, n_microbatches=m, loss_fn=self.loss,
                                                                    scale_grads=False)
        return self.runners[batch]

    def train_step(self, t, x, y) -> StepProgram:
        self.batch = len(y)
        fresh = len(y) not in self.runners
        runner = self.runner(len(y))
        holds_last = self.index == self.last_holder
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        # A runner's first step infers its stages' shapes with a real forward whose graph torch 2.14 keeps for
        # the rest of the run on the first device (one micro-batch of module 0): innermost saved-tensor hooks
        # that do nothing keep that step out of the memory meter, whose later iterations see every graph the
        # schedule builds (the window spans 2K + 4 of them). A split backward is kept out at every step.
        unaccounted = fresh or self.splits_backward
        with torch.autograd.graph.saved_tensors_hooks(_same, _same) if unaccounted else contextlib.nullcontext():
            out = runner.step(*args, target=y if holds_last else None, losses=losses if holds_last else None)
        self.computing()  # the update is this device's compute
        yield from self.apply_update()  # one update per batch, with the gradients of all micro-batches accumulated
        loss = self.share(torch.stack(losses).detach().sum()) if holds_last else None
        logits = out.detach() if holds_last else None
        loss, logits = self.hand_to_top(loss), self.hand_to_top(logits)
        if self.is_last:
            return StepOutput(loss=loss, logits=logits)
        return None

    @torch.no_grad()
    def predict_step(self, x: torch.Tensor | None) -> StepProgram:
        """The V·K modules in order, each on its device; an output crosses to the next module's device by
        torch's point-to-point (the runner's own forward-only path keeps buffers of the training shape)."""
        h = x
        total = self.modules_per_device(self.options) * self.num_stages
        for piece in range(total):
            here = self.holder(piece, self.num_stages, self.options)
            if piece > 0:
                h = self.move(h, self.holder(piece - 1, self.num_stages, self.options), here)
            if here == self.index:
                h = self.chunks[self.pieces.index(piece)](h)
        out = self.hand_to_top(h if self.index == self.last_holder else None)
        return out if self.is_last else None
        yield  # a program that sends nothing on dbench's channels

    def hand_to_top(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """What the device holding the last module computed, on the top device (K−1), which the engine asks for
        the batch's output: the V-shaped schedules end on device 0."""
        return self.move(tensor, self.last_holder, self.num_stages - 1)

    def move(self, tensor: torch.Tensor | None, src: int, dst: int) -> torch.Tensor | None:
        """``tensor`` from device ``src`` on device ``dst`` (this replica's); unchanged where src == dst."""
        if src == dst or self.index not in (src, dst):
            return tensor
        group = self.pipeline_group or dist.group.WORLD
        wire = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        peer = dist.get_global_rank(group, dst if self.index == src else src)
        if self.index == src:
            header = torch.zeros(2 + MAX_DIMS, dtype=torch.int64)
            header[0], header[1] = tensor.dim(), DTYPES.index(tensor.dtype)
            header[2:2 + tensor.dim()] = torch.tensor(tensor.shape)
            dist.send(header.to(wire), peer, group=group)
            dist.send(tensor.detach().to(wire).contiguous(), peer, group=group)
            return None
        header = torch.empty(2 + MAX_DIMS, dtype=torch.int64, device=wire)
        dist.recv(header, peer, group=group)
        ndim, dtype = int(header[0]), DTYPES[int(header[1])]
        received = torch.empty(tuple(int(d) for d in header[2:2 + ndim]), dtype=dtype, device=wire)
        dist.recv(received, peer, group=group)
        return received.to(self.device)


class LoopedSchedule(TorchSchedule):
    """Device k holds modules k, k+K, ..., k+(V−1)K."""

    Options = LoopedOptions

    @classmethod
    def modules_per_device(cls, options: Any = None) -> int:
        return (options or cls.Options()).virtual

    @classmethod
    def placement(cls, index: int, num_stages: int, options: Any = None) -> list[int]:
        return [index + v * num_stages for v in range(cls.modules_per_device(options))]


class VShapeSchedule(TorchSchedule):
    """Device k holds modules k and 2K−1−k (V = 2)."""

    Options = ScheduleOptions

    @classmethod
    def modules_per_device(cls, options: Any = None) -> int:
        return 2

    @classmethod
    def placement(cls, index: int, num_stages: int, options: Any = None) -> list[int]:
        return [index, 2 * num_stages - 1 - index]


def _check_rounds(name: str, m: int, k: int) -> None:
    # torch's interleaved schedules run M in rounds of max(1, M // K) (schedules.py, ScheduleInterleaved1F1B)
    rounds = max(1, m // k)
    if m % rounds:
        raise DbenchError(f"bad microbatches {m} for {name} at K = {k}: torch's runner needs M to be a multiple of "
                          f"its rounds max(1, M // K) = {rounds} (M < K, or M a multiple of M // K, as M = K, 2K, 4K)")


@METHODS.register("interleaved-1f1b")
class Interleaved1F1B(LoopedSchedule):
    """Interleaved 1F1B (Narayanan et al., SC 2021, §2.2.2): 1F1B over V·K looped modules, depth first."""

    name = "interleaved-1f1b"
    summary = "Interleaved 1F1B (torch's runner): exact gradient, V modules per device looped, 1F1B depth first"
    table_order = 0.8
    schedule = "ScheduleInterleaved1F1B"

    @classmethod
    def bubble(cls, num_stages, m, v):
        return (num_stages - 1) / (v * m)  # Narayanan et al. 2021, §2.2.2

    @classmethod
    def check_microbatches(cls, m, num_stages, v):
        _check_rounds(cls.name, m, num_stages)


@METHODS.register("looped-bfs")
class LoopedBFS(LoopedSchedule):
    """Looped BFS (Lamy-Poirier, arXiv 2211.05953): GPipe on each loop, the earlier module's micro-batches first."""

    name = "looped-bfs"
    summary = "Looped BFS (torch's runner): exact gradient, V modules per device looped, breadth first"
    table_order = 0.81
    schedule = "ScheduleLoopedBFS"

    @classmethod
    def bubble(cls, num_stages, m, v):
        return (num_stages - 1) / (v * m)  # Lamy-Poirier 2022, §3: the interleaved bubble, GPipe's memory


@METHODS.register("zb-interleaved")
class InterleavedZeroBubble(LoopedSchedule):
    """Interleaved zero bubble (Qi et al., ICLR 2024): the backward split into input (I) and weight (W) gradients,
    W deferred into the bubbles."""

    name = "zb-interleaved"
    summary = "Interleaved zero bubble (torch's runner): exact gradient, backward split in I and W, W in the bubbles"
    table_order = 0.82
    schedule = "ScheduleInterleavedZeroBubble"
    splits_backward = True

    @classmethod
    def bubble(cls, num_stages, m, v):
        # ZB-H1 (Qi et al. 2024, §3): (K−1)(t_F + t_I − t_W) / (M (t_F + t_B)), a third of 1F1B's at equal
        # times; the interleaved order (V > 1) has no closed form there.
        return (num_stages - 1) / (3 * m) if v == 1 else None

    @classmethod
    def check_microbatches(cls, m, num_stages, v):
        _check_rounds(cls.name, m, num_stages)


@METHODS.register("zbv")
class ZeroBubbleV(VShapeSchedule):
    """ZB-V (Qi et al., arXiv 2401.10241 §6): two modules per device in a V, the backward split in I and W."""

    name = "zbv"
    summary = "ZB-V zero bubble (torch's runner): exact gradient, two modules per device in a V, I/W split"
    table_order = 0.83
    schedule = "ScheduleZBVZeroBubble"
    splits_backward = True

    @classmethod
    def bubble(cls, num_stages, m, v):
        # ≈ 0 with t_F = t_I = t_W once M >= 2K − 1 (the schedule's steady state fills every slot); below that
        # the warm-up is not filled and the paper gives no closed form.
        return 0.0 if m >= 2 * num_stages - 1 else None


@METHODS.register("dualpipev")
class DualPipeV(VShapeSchedule):
    """DualPipeV (DeepSeek-V3 report, arXiv 2412.19437; the DualPipe repository's V variant): two modules per
    device in a V, a forward of one micro-batch overlapped with a backward of another."""

    name = "dualpipev"
    summary = "DualPipeV (torch's runner): exact gradient, two modules per device in a V, forward/backward overlap"
    table_order = 0.84
    schedule = "ScheduleDualPipeV"
    splits_backward = True

    @classmethod
    def bubble(cls, num_stages, m, v):
        # (K−1)(t_F&B + t_B − 3 t_W) / (M (t_F + t_B)) with t_F&B = t_F + t_B (no overlap gain in the unit
        # model), t_F = 1, t_B = 2, t_W = 1: 2(K−1)/(3M) (DeepSeek-V3 report, Table 2).
        return 2 * (num_stages - 1) / (3 * m)

    @classmethod
    def check_microbatches(cls, m, num_stages, v):
        if m < 2 * num_stages:
            raise DbenchError(f"bad microbatches {m} for dualpipev at K = {num_stages}: torch's runner needs at least "
                              f"as many micro-batches as modules (M >= 2K = {2 * num_stages})")
