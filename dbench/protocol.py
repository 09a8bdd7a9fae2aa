"""The message protocol between a method's stages and the engines: what a step program yields and gets.

A stage's ``train_step`` is a generator: it computes, and when it needs to talk to a neighbour it yields a
:class:`Send` or a :class:`Recv` (or, with replicas, an :class:`AllReduce`) and lets the engine move the
tensor. Channels and their routes are in ``dbench.routes`` (torch-free); see ``dbench.method`` for what
each channel carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Union

import torch

from dbench.routes import PROBE_UP, UP

INPUT_CHANNELS = (UP, PROBE_UP)  # a stage blocked on these waits for an input; on the others, for a gradient


Tag = tuple  # of ints: which iteration (and micro-batch) a message belongs to; () when untagged


@dataclass(frozen=True)
class Send:
    """Send ``tensor`` on ``channel``, tagged with ``tag`` (e.g. the iteration of the batch it belongs to)."""

    channel: str
    tensor: torch.Tensor
    tag: Tag = ()


@dataclass(frozen=True)
class Recv:
    """Take the next message of ``channel``; the engine checks its tag when ``expect`` is given.

    Tags do not route or reorder anything (channels stay FIFO): they let a stage
    assert that what it received is the batch it expects, so a schedule that is
    off by one fails loudly instead of training on the wrong batch.
    """

    channel: str
    expect: Tag | None = None


@dataclass(frozen=True)
class AllReduce:
    """Average ``tensors`` in place over the D copies of this module (one per replica); the engine does it.

    Yielded by ``Stage.apply_update`` (and ``side_update``) before an optimizer
    steps, when the run has replicas (ALGORITHMS.md, "At scale"): the gradient
    a module hands its optimizer is first averaged over the copies of that
    module in every replica. Every copy runs the same program, so they all
    yield it at the same point, with tensors of the same shapes; the engine
    answers once the last of them has. ``what`` names it in errors and traces.
    """

    tensors: tuple
    what: str = "gradients"


@dataclass(frozen=True)
class Message:
    """What travels on a channel: a value (never a graph) and its tag."""

    tensor: torch.Tensor
    tag: Tag = ()


def check_tag(stage: int, op: Recv, message: Message) -> torch.Tensor:
    """The message's tensor, after checking its tag against what the stage expects."""
    # An untagged message (from a checkpoint written before messages carried tags) cannot be checked.
    if op.expect is not None and message.tag and tuple(op.expect) != tuple(message.tag):
        raise RuntimeError(f"stage {stage} expected a message tagged {tuple(op.expect)} on {op.channel!r} "
                           f"but received one tagged {tuple(message.tag)}: the method's schedule is off")
    return message.tensor


Op = Union[Send, Recv, AllReduce]


@dataclass(frozen=True)
class StepOutput:
    """What the top stage reports for the batch whose loss it computed.

    Usually that batch is the iteration's own. A method whose top module works
    on an earlier batch (FDG's forward reaches it K-1 iterations late) gives
    that batch's labels in ``labels``; the epoch's train loss and accuracy are
    taken against them. An iteration in which the top module scored no batch
    returns None instead of a StepOutput.
    """

    loss: torch.Tensor  # 0-dim, detached, on the top stage's device
    logits: torch.Tensor  # detached
    labels: torch.Tensor | None = None  # the scored batch's labels, on the top stage's device; None: the iteration's


StepProgram = Generator[Op, Any, "StepOutput | None"]
