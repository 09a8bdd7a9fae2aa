"""The local engine: K stages on K devices inside one process, run in a fixed order."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from dbench.method import CHANNELS, DOWN, ERROR, UP, Recv, Send, Stage, StepOutput


@dataclass
class _Running:
    """One stage's program for the current iteration and what it is waiting for."""

    program: object
    reply: object = None
    waiting_on: str | None = None
    done: bool = False
    output: StepOutput | None = None


@dataclass
class _Inbox:
    queues: dict = field(default_factory=lambda: {c: deque() for c in CHANNELS})


class LocalEngine:
    """Runs every stage's program cooperatively, stage 0 first, round robin.

    A stage runs until it waits for a message that has not arrived; then the
    next stage runs. Messages that a method sends for a later iteration (DDG's
    and FR's delayed gradients) stay queued across iterations. Because channels
    are FIFO and stages see nothing else, this sequential order gives the same
    numbers as running the stages truly in parallel (see dbench.method).
    """

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.inboxes = [_Inbox() for _ in stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def train(self) -> None:
        for stage in self.stages:
            stage.module.train()

    def eval(self) -> None:
        for stage in self.stages:
            stage.module.eval()

    def train_step(self, t: int, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        running = [
            _Running(stage.train_step(t, x.to(stage.device) if k == 0 else None, y.to(stage.device)))
            for k, stage in enumerate(self.stages)
        ]
        while not all(r.done for r in running):
            progressed = False
            for k, r in enumerate(running):
                if not r.done:
                    progressed |= self._advance(k, r)
            if not progressed:
                waits = ", ".join(f"stage {k} on {r.waiting_on!r}" for k, r in enumerate(running) if not r.done)
                raise RuntimeError(f"deadlock in method {self.stages[0].name!r} at iteration {t}: {waits}")
        top = running[-1].output
        if top is None:
            raise RuntimeError(f"method {self.stages[0].name!r}: the top stage returned no StepOutput")
        return top

    def _advance(self, k: int, r: _Running) -> bool:
        """Run stage k until it blocks or finishes; True if it made progress."""
        inbox = self.inboxes[k].queues
        if r.waiting_on is not None:
            if not inbox[r.waiting_on]:
                return False
            r.reply = inbox[r.waiting_on].popleft()
            r.waiting_on = None
        while True:
            try:
                op = r.program.send(r.reply)  # send(None) starts a fresh generator
            except StopIteration as stop:
                r.done, r.output = True, stop.value
                return True
            r.reply = None
            if isinstance(op, Send):
                self._deliver(k, op)
            elif isinstance(op, Recv):
                if not inbox[op.channel]:
                    r.waiting_on = op.channel
                    return True
                r.reply = inbox[op.channel].popleft()
            else:
                raise TypeError(f"stage {k} yielded {op!r}; a method yields Send or Recv")

    def _deliver(self, k: int, op: Send) -> None:
        # The wire carries values only: detach, then copy to the receiver's device.
        value = op.tensor.detach()
        if op.channel == UP:
            targets = [k + 1]
        elif op.channel == DOWN:
            targets = [k - 1]
        elif op.channel == ERROR:
            targets = [j for j in range(self.num_stages) if j != k]
        else:
            raise ValueError(f"stage {k} sent on unknown channel {op.channel!r}; channels: {CHANNELS}")
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
        for stage, s in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(s)
        for k, (inbox, pending) in enumerate(zip(self.inboxes, state["pending"], strict=True)):
            for c in CHANNELS:
                inbox.queues[c] = deque(t.to(self.stages[k].device) for t in pending[c])
