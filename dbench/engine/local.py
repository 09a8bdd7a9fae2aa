"""The local engine: K stages on K devices inside one process, run in a fixed order."""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from dbench.meters.sigma import true_gradient
from dbench.method import CHANNELS, ROUTES, Recv, Send, Stage, StepOutput


@dataclass
class _Running:
    """One stage's program for the current iteration and what it is waiting for."""

    program: Any
    reply: Any = None
    waiting_on: str | None = None
    done: bool = False
    output: Any = None


@dataclass
class _Inbox:
    queues: dict = field(default_factory=lambda: {c: deque() for c in CHANNELS})


class _NoMeter:
    """What the engine drives when nothing is measured."""

    probing = False

    def tracking(self):
        return contextlib.nullcontext()

    def resumed(self) -> None: ...
    def blocked(self, channel: str) -> None: ...
    def handed_step(self) -> None: ...
    def finished(self) -> None: ...


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
        self.inboxes = [_Inbox() for _ in stages]
        self.meters: list = [_NoMeter() for _ in stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def attach_meters(self, meters: list) -> None:
        self.meters = list(meters)

    def queued(self, k: int) -> Iterator[torch.Tensor]:
        """The messages waiting in stage k's inbox (for its memory accounting)."""
        for q in self.inboxes[k].queues.values():
            yield from q

    def train(self) -> None:
        for stage in self.stages:
            stage.module.train()

    def eval(self) -> None:
        for stage in self.stages:
            stage.module.eval()

    def train_step(self, t: int, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        programs = [
            stage.train_step(t, x.to(stage.device) if k == 0 else None, y.to(stage.device))
            for k, stage in enumerate(self.stages)
        ]
        outputs = self._run(programs, f"method {self.stages[0].name!r} at iteration {t}")
        top = outputs[-1]
        if not isinstance(top, StepOutput):
            raise RuntimeError(f"method {self.stages[0].name!r}: the top stage returned no StepOutput")
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
        running = [_Running(p) for p in programs]
        for m in self.meters:
            m.handed_step()
        while not all(r.done for r in running):
            progressed = False
            for k, r in enumerate(running):
                if not r.done:
                    progressed |= self._advance(k, r)
            if not progressed:
                waits = ", ".join(f"stage {k} on {r.waiting_on!r}" for k, r in enumerate(running) if not r.done)
                raise RuntimeError(f"deadlock in {what}: {waits}")
        return [r.output for r in running]

    def _advance(self, k: int, r: _Running) -> bool:
        """Run stage k until it blocks or finishes; True if it made progress."""
        inbox = self.inboxes[k].queues
        meter = self.meters[k]
        if r.waiting_on is not None:
            if not inbox[r.waiting_on]:
                return False
            r.reply = inbox[r.waiting_on].popleft()
            r.waiting_on = None
        meter.resumed()
        with meter.tracking():
            while True:
                try:
                    op = r.program.send(r.reply)  # send(None) starts a fresh generator
                except StopIteration as stop:
                    r.done, r.output = True, stop.value
                    meter.finished()
                    return True
                r.reply = None
                if isinstance(op, Send):
                    self._deliver(k, op)
                elif isinstance(op, Recv):
                    if not inbox[op.channel]:
                        r.waiting_on = op.channel
                        meter.blocked(op.channel)
                        return True
                    r.reply = inbox[op.channel].popleft()
                else:
                    raise TypeError(f"stage {k} yielded {op!r}; a method yields Send or Recv")

    def _deliver(self, k: int, op: Send) -> None:
        # The wire carries values only: detach, then copy to the receiver's device.
        value = op.tensor.detach()
        if op.channel not in ROUTES:
            raise ValueError(f"stage {k} sent on unknown channel {op.channel!r}; channels: {CHANNELS}")
        step = ROUTES[op.channel]
        targets = [j for j in range(self.num_stages) if j != k] if step is None else [k + step]
        for j in targets:
            if not 0 <= j < self.num_stages:
                raise RuntimeError(f"stage {k} sent {op.channel!r} past the end of the pipeline")
            self.inboxes[j].queues[op.channel].append(value.to(self.stages[j].device))

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
        pending = [{c: list(q) for c, q in inbox.queues.items()} for inbox in self.inboxes]
        return {"stages": [s.state_dict() for s in self.stages], "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        for k, (stage, s) in enumerate(zip(self.stages, state["stages"], strict=True)):
            with self.meters[k].tracking():  # a method may rebuild graphs (DDG): their memory counts
                stage.load_state_dict(s)
        for k, (inbox, pending) in enumerate(zip(self.inboxes, state["pending"], strict=True)):
            for c in CHANNELS:
                inbox.queues[c] = deque(t.to(self.stages[k].device) for t in pending.get(c, []))
