"""The one driver of a stage's program, shared by every engine.

A method's ``train_step`` (and the σ probe's pass) is a generator that yields
``Send`` and ``Recv``. The driver steps it, hands each ``Send`` to a *port*
and answers each ``Recv`` from the port, checking the message's tag, and it
marks the stage's meter at every transition (resumed, blocked, finished). The
engines differ only in their port: the local engine's cannot block (the
program is suspended, and the engine runs another stage until the message is
there), a distributed process's port blocks on the stream from the sender.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

from dbench.method import AllReduce, Message, Recv, Send, check_tag


class Port(Protocol):
    """How one stage's messages travel."""

    blocking: bool  # True: ``wait`` blocks until the message is there; False: the driver suspends the program

    def send(self, op: Send) -> None: ...
    def poll(self, channel: str) -> Message | None: ...
    # ``meter``: marked communicating while a message arrives, and blocked again if it was another channel's
    def wait(self, channel: str, meter: Any) -> Message: ...
    # Average the tensors over the module's copies in every replica; returns something with ``done``: True at
    # once on a blocking port, else once the last copy has joined (the driver suspends the program until then).
    def all_reduce(self, op: AllReduce, meter: Any) -> Any: ...


class NoMeter:
    """What the driver marks when nothing is measured."""

    probing = False

    def tracking(self):
        return contextlib.nullcontext()

    def resumed(self) -> None: ...
    def blocked(self, channel: str) -> None: ...
    def communicating(self) -> None: ...
    def op(self, op) -> None: ...
    def handed_step(self) -> None: ...
    def finished(self) -> None: ...


class Driven:
    """One stage's program for the current iteration, what it waits for, and what it returned."""

    def __init__(self, k: int, program, port: Port, meter: Any):
        self.k, self.program, self.port, self.meter = k, program, port, meter
        self.reply: Any = None
        self.waiting: Recv | None = None
        self.joined: Any = None  # an all-reduce this program waits on (a non-blocking port's)
        self.done = False
        self.output: Any = None

    def advance(self) -> bool:
        """Run until the program finishes or needs a message that is not there yet; True if it ran at all.

        With a blocking port this returns only when the program has finished.
        """
        if self.joined is not None:
            if not self.joined.done:
                return False
            self.joined = None
        elif self.waiting is not None:
            message = self.port.poll(self.waiting.channel)
            if message is None:
                return False
            self.reply, self.waiting = check_tag(self.k, self.waiting, message), None
        meter = self.meter
        meter.resumed()
        with meter.tracking():
            while True:
                try:
                    op = self.program.send(self.reply)  # send(None) starts a fresh generator
                except StopIteration as stop:
                    self.done, self.output = True, stop.value
                    meter.finished()
                    return True
                self.reply = None
                meter.op(op)  # the program's segment ends at its op (what a trace records)
                if isinstance(op, Send):
                    meter.communicating()
                    self.port.send(op)
                    meter.resumed()
                elif isinstance(op, Recv):
                    message = self.port.poll(op.channel)
                    if message is None:
                        meter.blocked(op.channel)
                        if not self.port.blocking:
                            self.waiting = op
                            return True
                        message = self.port.wait(op.channel, meter)
                        meter.resumed()
                    self.reply = check_tag(self.k, op, message)
                elif isinstance(op, AllReduce):
                    joined = self.port.all_reduce(op, meter)
                    if not joined.done:
                        meter.blocked("all-reduce")  # waiting for the other replicas' copies of this module
                        self.joined = joined
                        return True
                    meter.resumed()
                else:
                    raise TypeError(f"stage {self.k} yielded {op!r}; a method yields Send, Recv or AllReduce")
