"""A trace of what each stage did on the local engine, for the projection (dbench.projection).

The local engine runs every stage's real program, one stage at a time, on one
device. A trace records, per stage and in program order:

- ``compute``: a segment of the program, from its resumption to its next
  Send, Recv, AllReduce or end, with its measured seconds (host clock on the
  CPU; on CUDA, events on the stage's stream, read once the step is done);
- ``data``: the loader's seconds for this step's batch (every stage's process
  loads its batch on the distributed engine, so every stage pays it);
- ``send`` (channel, tag, bytes), ``recv`` (channel, tag), ``allreduce``
  (bytes: the module's gradients averaged over its copies in the replicas;
  on a run without replicas, where they would be: ``Stage.on_average``, so
  that the projection can lay the run out on D replicas);
- ``end``: the step is over.

Time a stage spends suspended (waiting for a message that another stage has
yet to compute) is not in any segment: on K devices that is exactly what the
projection replays. Recording reads a clock at each of these points and
changes no number (tested); its cost is measured in benchmarks/RESULTS.md.
"""
from __future__ import annotations

from typing import Any

import torch

from dbench.meters.clock import now
from dbench.method import AllReduce, Recv, Send

TRACE = "trace.json"


class StageTrace:
    """One stage's events; installed around its meter (``Traced``) while the engine runs training steps."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.events: list[dict] = []
        self._start: Any = None
        self._pending: list[tuple[dict, Any, Any]] = []  # CUDA: (event record, start, end) to read after a sync

    def begin(self) -> None:
        self._start = now(self.device)

    def end_segment(self) -> None:
        """The running segment ends here (nothing runs: a blocked or finished stage has none)."""
        if self._start is None:
            return
        end = now(self.device)
        record = {"op": "compute", "s": 0.0}
        if self.cuda:
            self._pending.append((record, self._start, end))
        else:
            record["s"] = end - self._start
        self.events.append(record)
        self._start = None

    def add(self, record: dict) -> None:
        self.events.append(record)

    def resolve(self) -> None:
        """CUDA: read the segments' events (call after synchronizing the device)."""
        for record, start, end in self._pending:
            record["s"] = start.elapsed_time(end) / 1000.0
        self._pending = []


def describe(op) -> dict:
    """What the projection needs of an op: its kind, channel and tag, and the bytes it moves."""
    if isinstance(op, Send):
        return {"op": "send", "channel": op.channel, "tag": list(op.tag), "bytes": _bytes(op.tensor)}
    if isinstance(op, Recv):
        return {"op": "recv", "channel": op.channel}
    if isinstance(op, AllReduce):
        return {"op": "allreduce", "bytes": sum(_bytes(t) for t in op.tensors), "what": op.what}
    raise TypeError(f"cannot trace {op!r}")


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traced:
    """A stage's meter with its trace: forwards every call to ``meter`` and records the segments and ops."""

    def __init__(self, meter: Any, trace: StageTrace):
        self.meter, self.trace = meter, trace

    def __getattr__(self, name: str) -> Any:  # probing, tracking, communicating, handed_step: the meter's
        return getattr(self.meter, name)

    def resumed(self) -> None:
        self.meter.resumed()
        if self.trace._start is None:
            self.trace.begin()

    def op(self, op) -> None:
        """The program yielded ``op``: its segment ends, the op is recorded, and what follows is a new segment."""
        self.meter.op(op)
        self.trace.end_segment()
        self.trace.add(describe(op))
        self.trace.begin()

    def averaged(self, op: AllReduce) -> None:
        """Without replicas: the stage's program reached an update, where replicas would average ``op``'s tensors
        (``Stage.on_average``). Recorded as the all-reduce it would be, at its place between segments."""
        self.trace.end_segment()
        self.trace.add(describe(op))
        self.trace.begin()

    def blocked(self, channel: str) -> None:
        self.meter.blocked(channel)
        self.trace._start = None  # until it resumes, the other stages run: not this stage's time

    def finished(self) -> None:
        self.meter.finished()
        self.trace.end_segment()
        self.trace.add({"op": "end"})


class Recorder:
    """The traces of every stage of a local engine over the steps it records (``LocalEngine.recorder``)."""

    def __init__(self, devices: list[torch.device], modules: int, replicas: int):
        self.stages = [StageTrace(d) for d in devices]
        self.modules, self.replicas = modules, replicas
        self.steps = 0

    def data(self, seconds: float) -> None:
        """The loader took ``seconds`` for this step's batch."""
        for s in self.stages:
            s.add({"op": "data", "s": seconds})

    def step_done(self) -> None:
        self.steps += 1
        if any(s.cuda for s in self.stages):
            for d in {s.device for s in self.stages if s.cuda}:
                torch.cuda.synchronize(d)  # the segments' events must have run before they are read
            for s in self.stages:
                s.resolve()

    def record(self) -> dict:
        return {"modules": self.modules, "replicas": self.replicas, "steps": self.steps,
                "devices": [str(s.device) for s in self.stages],
                "clock": "cuda events" if any(s.cuda for s in self.stages) else "host perf_counter",
                "stages": [s.events for s in self.stages]}
