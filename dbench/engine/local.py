"""The local engine: K stages on K devices inside one process, run in a fixed order; with D replicas, the
D·K stages of the N = K·D devices (module k of replica d at position d·K + k), the same way."""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from dbench.engine.driver import Driven, NoMeter
from dbench.errors import DbenchError
from dbench.engine.messages import pack, unpack
from dbench.engine.trace import Recorder, Traced
from dbench.engine.modes import TrainingMode
from dbench.meters.sigma import true_gradient
from dbench.method import CHANNELS, AllReduce, Message, Send, Stage, StepOutput, route


class _Joined:
    """One all-reduce of the copies of a module: the tensors of each replica that has joined, in replica order."""

    def __init__(self, replicas: int):
        self.parts: list = [None] * replicas
        self.done = False

    def join(self, replica: int, op: AllReduce) -> None:
        self.parts[replica] = op.tensors
        if any(p is None for p in self.parts):
            return
        shapes = [[tuple(t.shape) for t in p] for p in self.parts]
        if any(s != shapes[0] for s in shapes):
            raise RuntimeError(f"the replicas' copies of a module averaged {op.what} of different shapes: {shapes}")
        # The sum in replica order, then the division: what the distributed engine's all-reduce computes
        # (the same float result for D = 2; for more replicas its ring may add in another order).
        for i in range(len(self.parts[0])):
            total = self.parts[0][i].clone()
            for p in self.parts[1:]:
                total += p[i].to(total.device)
            total /= len(self.parts)
            for p in self.parts:
                p[i].copy_(total)
        self.done = True


class _Port:
    """Stage p's messages inside one process (module k of replica d, p = d·K + k): sends go straight into the
    receivers' inboxes, which are the same replica's stages; all-reduces gather the module's copies."""

    blocking = False  # an empty inbox suspends the program; the engine runs the other stages meanwhile

    def __init__(self, engine: "LocalEngine", p: int):
        self.engine, self.p = engine, p
        self.k, self.replica = p % engine.num_stages, p // engine.num_stages
        self.base = self.replica * engine.num_stages  # the replica's first position

    def send(self, op: Send) -> None:
        # The wire carries values only: detach, then copy to the receiver's device.
        value = op.tensor.detach()
        for j in route(op.channel).targets(op.channel, self.k, self.engine.num_stages):
            j += self.base
            self.engine.inboxes[j][op.channel].append(Message(value.to(self.engine.stages[j].device), tuple(op.tag)))

    def poll(self, channel: str) -> Message | None:
        queue = self.engine.inboxes[self.p][channel]
        return queue.popleft() if queue else None

    def wait(self, channel: str, meter=None) -> Message:
        raise AssertionError("the local engine never blocks")

    def all_reduce(self, op: AllReduce, meter=None) -> _Joined:
        pending = self.engine.joins
        joined = pending.get(self.k)
        if joined is None:
            joined = pending[self.k] = _Joined(self.engine.replicas)
        elif joined.parts[self.replica] is not None:
            raise RuntimeError(f"module {self.k} of replica {self.replica} joined a second all-reduce before the "
                               f"other replicas joined the first")
        joined.join(self.replica, op)
        if joined.done:
            del pending[self.k]
        return joined


class LocalEngine:
    """Runs every stage's program cooperatively, stage 0 first, round robin.

    A stage runs until it waits for a message that has not arrived; then the
    next stage runs. Messages that a method sends for a later iteration (DDG's
    and FR's delayed gradients) stay queued across iterations. Because channels
    are FIFO and stages see nothing else, this sequential order gives the same
    numbers as running the stages truly in parallel (see dbench.method).

    With meters attached (``attach_meters``), each stage's clock is marked when
    it resumes, blocks or finishes. Here only one stage runs at a time, so a
    stage's waits are the time the others compute: the local engine shows
    where work serializes; the distributed engine shows real overlap.
    """

    def __init__(self, stages: list[Stage], replicas: int = 1):
        if replicas < 1 or len(stages) % replicas:
            raise ValueError(f"{len(stages)} stages do not make {replicas} replicas of the same modules")
        self.stages = stages
        self.replicas = replicas
        for p, stage in enumerate(stages):
            stage.place(p // self.num_stages, replicas)
        self.inboxes = [{c: deque() for c in CHANNELS} for _ in stages]
        self.ports = [_Port(self, p) for p in range(len(stages))]
        self.joins: dict[int, _Joined] = {}  # module -> the all-reduce its copies are joining
        self.meters: list = [NoMeter() for _ in stages]
        self.modes = [TrainingMode(stage.module) for stage in stages]
        self.recorder: Recorder | None = None  # set to record the training steps' trace (dbench.engine.trace)

    @property
    def num_stages(self) -> int:
        """K, the modules of one replica."""
        return len(self.stages) // self.replicas

    @property
    def first_replica(self) -> list[Stage]:
        """Replica 0's stages: what predicts, and what the σ probe measures."""
        return self.stages[:self.num_stages]

    def attach_meters(self, meters: list) -> None:
        self.meters = list(meters)

    def queued(self, k: int) -> Iterator[torch.Tensor]:
        """The messages waiting in stage k's inbox (for its memory accounting)."""
        for q in self.inboxes[k].values():
            yield from (m.tensor for m in q)

    def train(self) -> None:
        for mode in self.modes:
            mode.ensure()

    def eval(self) -> None:
        for stage in self.stages:
            stage.module.eval()

    def train_step(self, t: int, x: torch.Tensor, y: torch.Tensor) -> StepOutput | None:
        """The top stage's StepOutput; None where it scored no batch in this iteration (see Stage.train_step).

        With replicas, replica d trains on shard d of the batch (``torch.tensor_split``), and the output is
        the batch's: the replicas' shares of the loss summed, their logits (and labels) concatenated.
        """
        K, D = self.num_stages, self.replicas
        xs, ys = (x, ), (y, )
        if D > 1:
            check_shards(len(y), D)
            xs, ys = x.tensor_split(D), y.tensor_split(D)
            for p, stage in enumerate(self.stages):
                stage.shard_weight = shard_weight(len(ys[p // K]), len(y), D)
        programs = [
            stage.train_step(t, xs[p // K].to(stage.device) if p % K == 0 else None, ys[p // K].to(stage.device))
            for p, stage in enumerate(self.stages)
        ]
        outputs = self._run(programs, f"method {self.stages[0].name!r} at iteration {t}", traced=True)
        tops = outputs[K - 1::K]
        for top in tops:
            if top is not None and not isinstance(top, StepOutput):
                raise RuntimeError(f"method {self.stages[0].name!r}: the top stage returned {type(top).__name__}, "
                                   f"not a StepOutput or None")
        return combine(tops)

    def true_gradients(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Each stage's true gradient on ``batches`` by plain BP (the σ probe); changes no state."""
        first = self.stages[0].device
        xs = [x.to(first) for x, _ in batches]
        # Replica 0's modules (the whole model once): every replica holds the same weights.
        programs = [
            true_gradient(stage, xs if k == 0 else None, [y.to(stage.device) for _, y in batches])
            for k, stage in enumerate(self.first_replica)
        ]
        meters = self.meters[:self.num_stages]
        for m in meters:
            m.probing = True
        try:
            return self._run(programs, "the σ probe")
        finally:
            for m in meters:
                m.probing = False

    def _run(self, programs: list, what: str, traced: bool = False) -> list:
        meters = self.meters
        if traced and self.recorder is not None:
            meters = [Traced(m, s) for m, s in zip(self.meters, self.recorder.stages, strict=True)]
            if self.replicas == 1:
                for stage, meter in zip(self.stages, meters):
                    stage.on_average = meter.averaged  # where replicas would average: the trace marks it
        try:
            return self._drive(programs, what, meters, traced)
        finally:
            for stage in self.stages:
                stage.on_average = None

    def _drive(self, programs: list, what: str, meters: list, traced: bool) -> list:
        running = [Driven(p, program, self.ports[p], meters[p]) for p, program in enumerate(programs)]
        for m in self.meters[:len(programs)]:
            m.handed_step()
        while not all(r.done for r in running):
            progressed = False
            for r in running:
                if not r.done:
                    progressed |= r.advance()
            if not progressed:
                waits = ", ".join(f"stage {r.k} on {r.waiting.channel!r}" if r.waiting is not None
                                  else f"stage {r.k} in an all-reduce" for r in running if not r.done)
                raise RuntimeError(f"deadlock in {what}: {waits}")
        for stage in self.stages[:len(programs)]:
            stage.check_updates()
        if traced and self.recorder is not None:
            self.recorder.step_done()
        return [r.output for r in running]

    def sync_buffers(self) -> None:
        """Every replica takes replica 0's buffers (BatchNorm's running statistics), as before evaluating and
        saving (ALGORITHMS.md: running statistics are replica 0's)."""
        if self.replicas == 1:
            return
        with torch.no_grad():
            for p in range(self.num_stages, len(self.stages)):
                source = self.stages[p % self.num_stages].module.buffers()
                for mine, theirs in zip(self.stages[p].module.buffers(), source, strict=True):
                    mine.copy_(theirs)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_buffers()
        h = x
        for stage in self.first_replica:
            h = stage.predict(h.to(stage.device))
        return h

    def set_lr(self, lr: float) -> None:
        for stage in self.stages:
            stage.set_lr(lr)

    def state_dict(self) -> dict:
        # Messages still queued belong to the training state (a delayed
        # gradient in flight), so a resumed run must get them back.
        self.sync_buffers()  # saved as evaluated: every replica with replica 0's running statistics
        pending = [{c: [pack(m) for m in q] for c, q in inbox.items()} for inbox in self.inboxes]
        return {"stages": [s.state_dict() for s in self.stages], "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        for k, (stage, s) in enumerate(zip(self.stages, state["stages"], strict=True)):
            with self.meters[k].tracking():  # a method may rebuild graphs (DDG): their memory counts
                stage.load_state_dict(s)
        for k, (inbox, pending) in enumerate(zip(self.inboxes, state["pending"], strict=True)):
            for c in CHANNELS:
                inbox[c] = deque(unpack(m, self.stages[k].device) for m in pending.get(c, []))


def check_shards(batch: int, replicas: int) -> None:
    """Every replica needs a sample of every batch (``dbench run`` refuses such a batch size before starting)."""
    if batch < replicas:
        raise DbenchError(f"a batch of {batch} sample(s) for {replicas} replicas: every replica needs a shard of at "
                          f"least one sample (batch size >= {replicas})")


def shard_weight(shard: int, batch: int, replicas: int) -> float:
    """D·n_d/B: what a replica's losses are multiplied by so that the replicas' mean gradient is the batch's."""
    return replicas * shard / batch


def combine(tops: list[StepOutput | None]) -> StepOutput | None:
    """The batch's output from each replica's top stage: shares of the loss summed, logits (and the labels of
    the batch scored, where a method reports them) concatenated in replica order, which is the batch's."""
    if len(tops) == 1:
        return tops[0]
    if all(top is None for top in tops):
        return None
    if any(top is None for top in tops):
        raise RuntimeError("some replicas scored a batch in this iteration and others none: their programs differ")
    # On the last replica's top device: where the runner keeps the epoch's sums (the engine's last device).
    device = tops[-1].loss.device
    labels = None
    if tops[0].labels is not None:
        labels = torch.cat([top.labels.to(device) for top in tops])
    return StepOutput(loss=torch.stack([top.loss.to(device) for top in tops]).sum(),
                      logits=torch.cat([top.logits.to(device) for top in tops]), labels=labels)
