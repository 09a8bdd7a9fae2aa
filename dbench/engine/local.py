"""The local engine: K stages on K devices inside one process, run in a fixed order."""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from dbench.engine.driver import Driven, NoMeter
from dbench.engine.messages import pack, unpack
from dbench.engine.modes import TrainingMode
from dbench.meters.sigma import true_gradient
from dbench.method import CHANNELS, Message, Send, Stage, StepOutput, route


class _Port:
    """Stage k's messages inside one process: sends go straight into the receivers' inboxes."""

    blocking = False  # an empty inbox suspends the program; the engine runs the other stages meanwhile

    def __init__(self, engine: "LocalEngine", k: int):
        self.engine, self.k = engine, k

    def send(self, op: Send) -> None:
        # The wire carries values only: detach, then copy to the receiver's device.
        value = op.tensor.detach()
        for j in route(op.channel).targets(op.channel, self.k, self.engine.num_stages):
            self.engine.inboxes[j][op.channel].append(Message(value.to(self.engine.stages[j].device), tuple(op.tag)))

    def poll(self, channel: str) -> Message | None:
        queue = self.engine.inboxes[self.k][channel]
        return queue.popleft() if queue else None

    def wait(self, channel: str, meter=None) -> Message:
        raise AssertionError("the local engine never blocks")


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

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.inboxes = [{c: deque() for c in CHANNELS} for _ in stages]
        self.ports = [_Port(self, k) for k in range(len(stages))]
        self.meters: list = [NoMeter() for _ in stages]
        self.modes = [TrainingMode(stage.module) for stage in stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

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
        """The top stage's StepOutput; None where it scored no batch in this iteration (see Stage.train_step)."""
        programs = [
            stage.train_step(t, x.to(stage.device) if k == 0 else None, y.to(stage.device))
            for k, stage in enumerate(self.stages)
        ]
        outputs = self._run(programs, f"method {self.stages[0].name!r} at iteration {t}")
        top = outputs[-1]
        if top is not None and not isinstance(top, StepOutput):
            raise RuntimeError(f"method {self.stages[0].name!r}: the top stage returned {type(top).__name__}, "
                               f"not a StepOutput or None")
        return top

    def true_gradients(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Each stage's true gradient on ``batches`` by plain BP (the σ probe); changes no state."""
        first = self.stages[0].device
        xs = [x.to(first) for x, _ in batches]
        programs = [
            true_gradient(stage, xs if k == 0 else None, [y.to(stage.device) for _, y in batches])
            for k, stage in enumerate(self.stages)
        ]
        for m in self.meters:
            m.probing = True
        try:
            return self._run(programs, "the σ probe")
        finally:
            for m in self.meters:
                m.probing = False

    def _run(self, programs: list, what: str) -> list:
        running = [Driven(k, p, self.ports[k], self.meters[k]) for k, p in enumerate(programs)]
        for m in self.meters:
            m.handed_step()
        while not all(r.done for r in running):
            progressed = False
            for r in running:
                if not r.done:
                    progressed |= r.advance()
            if not progressed:
                waits = ", ".join(f"stage {r.k} on {r.waiting.channel!r}" for r in running if not r.done)
                raise RuntimeError(f"deadlock in {what}: {waits}")
        return [r.output for r in running]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in self.stages:
            h = stage.predict(h.to(stage.device))
        return h

    def set_lr(self, lr: float) -> None:
        for stage in self.stages:
            stage.set_lr(lr)

    def state_dict(self) -> dict:
        # Messages still queued belong to the training state (a delayed
        # gradient in flight), so a resumed run must get them back.
        pending = [{c: [pack(m) for m in q] for c, q in inbox.items()} for inbox in self.inboxes]
        return {"stages": [s.state_dict() for s in self.stages], "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        for k, (stage, s) in enumerate(zip(self.stages, state["stages"], strict=True)):
            with self.meters[k].tracking():  # a method may rebuild graphs (DDG): their memory counts
                stage.load_state_dict(s)
        for k, (inbox, pending) in enumerate(zip(self.inboxes, state["pending"], strict=True)):
            for c in CHANNELS:
                inbox[c] = deque(unpack(m, self.stages[k].device) for m in pending.get(c, []))
