"""The per-module rule that every method writes once and every engine drives.

A method is a subclass of :class:`Stage`. One instance lives with each module
(on that module's device, or in that module's process). Its ``train_step`` is a
generator: it computes, and when it needs to talk to a neighbour it yields a
:class:`Send` or a :class:`Recv` and lets the engine move the tensor.

Channels, seen from stage k:
    UP     activations: ``Send(UP, h)`` goes to stage k+1, ``Recv(UP)`` takes what k-1 sent.
    DOWN   error gradients: ``Send(DOWN, d)`` goes to k-1, ``Recv(DOWN)`` takes what k+1 sent.
    ERROR  the output error (DFA): ``Send(ERROR, e)`` from the top stage reaches every
           other stage, ``Recv(ERROR)`` takes it.
    PROBE_UP, PROBE_DOWN  as UP and DOWN, for passes outside training: the σ probe's plain-BP pass
           (dbench.meters.sigma) and the distributed engine's predict, kept apart so they never mix
           with activations or gradients queued for a later iteration.

Every channel is first in, first out, and a message is a value (the engine
detaches it: a graph never crosses a stage boundary) with a tag, a tuple of at
most two integers (the iteration, and the micro-batch where a batch is split),
that ``Recv(channel, expect=...)`` checks on receipt. A stage therefore
computes from nothing but its own state and the ordered streams it receives,
which makes the network of stages a Kahn process network: the order in which an
engine runs the stages cannot change any number. That is why the sequential
local engine and the process-per-module engine must agree exactly.

Methods differ only in which signal a module learns from and when it arrives
(see ALGORITHMS.md): BP waits for this iteration's gradient from above, DDG and
FR consume the one sent in the previous iteration, DNI uses its own synthetic
gradient, DFA the broadcast output error. The exact-gradient baselines are
methods too: GPipe and 1F1B pipeline micro-batches through the same channels;
DDP (``parallelism = DATA_PARALLEL``) puts a whole replica on each device and
leaves the gradient averaging to torch's DistributedDataParallel.

This module is the surface a method's author imports; it holds nothing of its own:
``dbench.stage`` (Stage, SideModel), ``dbench.protocol`` (Send, Recv, AllReduce,
Message, StepOutput), ``dbench.routes`` (the channels), ``dbench.families``
(family, locking, parallelism), ``dbench.options`` (option parsing) and
``dbench.method_tools`` (helpers methods share).
"""
from __future__ import annotations

from dbench.families import (DATA_PARALLEL, DELAYED_GRADIENT, EXACT_GRADIENT, FEEDBACK_ALIGNMENT,
                             FORWARD_LOCKED, LOCAL_LOSS, LOCKED, LOCKINGS, MODEL_PARALLEL, SYNTHETIC_GRADIENT,
                             UNLOCKED)
from dbench.method_tools import frozen_running_stats
from dbench.options import parse_options
from dbench.protocol import (INPUT_CHANNELS, AllReduce, Message, Op, Recv, Send, StepOutput,
                             StepProgram, Tag, check_tag)
from dbench.routes import CHANNELS, DOWN, ERROR, PROBE_DOWN, PROBE_UP, ROUTES, UP, Route, route
from dbench.stage import NoOptions, SideModel, Stage

__all__ = [
    "AllReduce", "CHANNELS", "DATA_PARALLEL", "DELAYED_GRADIENT", "DOWN", "ERROR", "EXACT_GRADIENT",
    "FEEDBACK_ALIGNMENT", "FORWARD_LOCKED", "INPUT_CHANNELS", "LOCAL_LOSS", "LOCKED", "LOCKINGS",
    "MODEL_PARALLEL", "Message", "NoOptions", "Op", "PROBE_DOWN", "PROBE_UP", "ROUTES", "Recv", "Route",
    "SYNTHETIC_GRADIENT", "Send", "SideModel", "Stage", "StepOutput", "StepProgram", "Tag", "UNLOCKED", "UP",
    "check_tag", "frozen_running_stats", "parse_options", "route",
]
