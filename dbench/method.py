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
    PROBE_UP, PROBE_DOWN  as UP and DOWN, for the σ probe's plain-BP pass (dbench.meters.sigma),
           kept apart so a probe never mixes with gradients queued for a later iteration.

Every channel is first in, first out, and a message is a value (the engine
detaches it: a graph never crosses a stage boundary). A stage therefore
computes from nothing but its own state and the ordered streams it receives,
which makes the network of stages a Kahn process network: the order in which an
engine runs the stages cannot change any number. That is why the sequential
local engine and the process-per-module engine must agree exactly.

Methods differ only in which signal a module learns from and when it arrives
(see ALGORITHMS.md): BP waits for this iteration's gradient from above, DDG and
FR consume the one sent in the previous iteration, DNI uses its own synthetic
gradient, DFA the broadcast output error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Union

import torch
from torch import nn

from dbench.errors import DbenchError
from dbench.optim import OptimConfig
from dbench.partition import forward_backward

UP = "up"
DOWN = "down"
ERROR = "error"
PROBE_UP = "probe_up"
PROBE_DOWN = "probe_down"
# Where a message on each channel goes: +1 the stage above, -1 the stage below,
# None every other stage (a broadcast).
ROUTES = {UP: +1, DOWN: -1, ERROR: None, PROBE_UP: +1, PROBE_DOWN: -1}
CHANNELS = tuple(ROUTES)
INPUT_CHANNELS = (UP, PROBE_UP)  # a stage blocked on these waits for an input; on the others, for a gradient


@dataclass(frozen=True)
class Send:
    channel: str
    tensor: torch.Tensor


@dataclass(frozen=True)
class Recv:
    channel: str


Op = Union[Send, Recv]


@dataclass(frozen=True)
class StepOutput:
    """What the top stage reports for the batch whose loss it computed."""

    loss: torch.Tensor  # 0-dim, detached, on the top stage's device
    logits: torch.Tensor  # detached


StepProgram = Generator[Op, Any, "StepOutput | None"]


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


# Families of methods (ALGORITHMS.md), what the report groups and compares by.
EXACT_GRADIENT = "exact gradient"
DELAYED_GRADIENT = "delayed gradient"
SYNTHETIC_GRADIENT = "synthetic gradient"
FEEDBACK_ALIGNMENT = "feedback alignment"
LOCAL_LOSS = "local loss"

# How the modules of one iteration wait for each other, for the ideal period of the cost model:
LOCKED = "locked"  # forward and backward run through the modules one after another (BP)
FORWARD_LOCKED = "forward locked"  # forwards in turn, then every module's backward at once (DFA)
UNLOCKED = "unlocked"  # every module works at once on its own part of a different batch (DDG, FR)
LOCKINGS = (LOCKED, FORWARD_LOCKED, UNLOCKED)


class Stage:
    """Module ``index`` of ``num_stages``: its weights, optimizer and method state.

    Subclasses set ``summary`` (one line for ``dbench list``), optionally
    ``Options`` (a frozen dataclass whose fields, defaults and docstring are the
    method's documented options) and implement :meth:`train_step`.

    The facts the reports read are class attributes, so a method from another
    package is reported like a built-in one: ``family``, ``table_order`` (its
    place in tables and legends), ``reference`` (the baseline that speedups are
    measured against: model-parallel BP) and the cost model behind
    :meth:`ideal_speedup` (``step_cost`` and ``locking``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    family: ClassVar[str] = ""
    table_order: ClassVar[float] = 100.0  # built-in methods 0..99, in ALGORITHMS.md's order; others after
    reference: ClassVar[bool] = False
    locking: ClassVar[str] = UNLOCKED
    # Seconds of one training step of module ``index`` of ``num_stages``, given
    # its forward and backward seconds: what the ``time`` partition balances.
    # One forward and one backward, unless a method overrides it.
    step_cost = staticmethod(forward_backward)
    # None, or a classmethod ``(output_shape, device, options, num_classes) ->
    # seconds`` that a module below the top spends per step at its output
    # beyond forward and backward (DNI's synthesizer). It depends on where a
    # cut falls, so the ``time`` partition profiles it at each candidate cut.
    boundary_cost: ClassVar[Any] = None

    @classmethod
    def ideal_speedup(cls, num_stages: int, options: Any = None) -> float | None:
        """Speedup over model-parallel BP with ``num_stages`` balanced modules, from ALGORITHMS.md's cost model.

        The whole model's forward costs 1 and its backward 2, split evenly over
        the modules; communication is free. Each module's cost per step is
        ``step_cost``; the period of one iteration follows from ``locking``:
        the sum of the modules' costs when locked (BP: 3), the whole forward
        plus the slowest module's backward when only the forward is locked,
        the slowest module's cost when unlocked. None where the cost model has
        no closed form: a cost at the module boundary (``boundary_cost``) is
        known only by profiling. At K=1 every method is BP.
        """
        k = num_stages
        if k == 1:
            return 1.0
        if cls.boundary_cost is not None:
            return None
        costs = [cls.step_cost(1 / k, 2 / k, j, k) for j in range(k)]
        if cls.locking == LOCKED:
            period = sum(costs)
        elif cls.locking == FORWARD_LOCKED:
            period = 1 + max(c - 1 / k for c in costs)
        elif cls.locking == UNLOCKED:
            period = max(costs)
        else:
            raise ValueError(f"method {cls.name!r}: unknown locking {cls.locking!r}; known: {', '.join(LOCKINGS)}")
        return 3.0 / period

    @classmethod
    def facts(cls, num_stages: int, options: Any = None) -> dict:
        """What a run records about its method, for reports that must not need the method installed."""
        return {"family": cls.family, "table_order": cls.table_order, "reference": cls.reference,
                "locking": cls.locking, "ideal_speedup": cls.ideal_speedup(num_stages, options)}

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        device: torch.device,
        optim: OptimConfig,
        loss_fn: nn.Module,
        options: Any = None,
        num_classes: int | None = None,
    ):
        self.index = index
        self.num_classes = num_classes  # what the labels range over (cDNI's conditioning)
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.loss_fn = loss_fn
        self.options = options if options is not None else self.Options()
        self.optimizer = optim.make(self.module.parameters())
        # Set by dbench.meters when a run measures: told before every backward
        # (memory peaks there) and before every update (σ reads the gradient there).
        self.observer: Any = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def train_step(self, t: int, x: torch.Tensor | None, y: torch.Tensor) -> StepProgram:
        """One training iteration ``t`` of this module.

        ``x`` is the input batch for the first stage and None for the others;
        ``y`` (the labels) is given to every stage on its device. The top stage
        returns a :class:`StepOutput`; the others return None.
        """
        raise NotImplementedError

    def receive_input(self, x: torch.Tensor | None, needs_grad: bool = True) -> StepProgram:
        """The module's input: the batch for the first module, else what the module below sent.

        ``needs_grad``: track it, to send the error gradient at the input down.
        Use as ``x = yield from self.receive_input(x)``.
        """
        if self.is_first:
            return x
        x = yield Recv(UP)
        if needs_grad:
            x.requires_grad_()
        return x

    def top_step(self, x: torch.Tensor | None, y: torch.Tensor) -> StepProgram:
        """The top module in every method but DFA: forward, loss, true backward, update.

        Sends the error gradient at its input down (unless it is also the
        first module) before it updates, so the module below can start.
        """
        x = yield from self.receive_input(x)
        out = self.module(x)
        loss = self.loss_fn(out, y)
        self.backward(loss)
        if not self.is_first:
            yield Send(DOWN, x.grad)
        self.apply_update()
        return StepOutput(loss=loss.detach(), logits=out.detach())

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """``tensor.backward(grad)``, telling the meters first. Methods call this, not ``.backward``."""
        self.before_backward()
        tensor.backward(grad)

    def before_backward(self) -> None:
        """A backward is about to start: every activation its graph saved is still alive (the memory peak)."""
        if self.observer is not None:
            self.observer.before_backward()

    def apply_update(self) -> None:
        """Hand ``p.grad`` to the optimizer; this gradient is the method's ``g_k^t``."""
        if self.observer is not None:
            self.observer.before_update()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The method's own state by memory category (stored inputs, weight snapshots, ...).

        What the memory meter reports beside parameters, gradients, optimizer
        state, queued messages and activations saved for backward. A tensor
        named here is not counted again as an activation.
        """
        return {}

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly; methods with state extend it."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module):
    """Inside, BatchNorm layers normalize with batch statistics but leave their running statistics alone.

    For recomputations (FR's replay): the batch was already counted once, when
    it was first played. Detaching the buffers is what ``F.batch_norm`` reads as
    "no running statistics to update"; they are put back untouched.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


def parse_options(stage_cls: type[Stage], raw: dict[str, str]) -> Any:
    """Turn ``{"name": "text"}`` from the command line into the method's Options, by each field's declared type."""
    fields = {f.name: f for f in dataclasses.fields(stage_cls.Options)}
    hints = typing.get_type_hints(stage_cls.Options)
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise DbenchError(f"option {key!r} does not apply to method {stage_cls.name!r}; its options: {known}")
        kinds = _accepted_types(hints[key], stage_cls.name, key)
        try:
            values[key] = _parse_value(kinds, text)
        except ValueError:
            expected = " or ".join("none" if k is type(None) else k.__name__ for k in kinds)
            raise DbenchError(f"bad value {text!r} for option {key!r} of {stage_cls.name!r}: expected {expected}") from None
    options = stage_cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


PARSEABLE = (bool, int, float, str, type(None))


def _accepted_types(hint: Any, method: str, key: str) -> tuple[type, ...]:
    """The types an option's text may become: its declared type, or each member of a union (``int | None``)."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    unsupported = [k for k in kinds if k not in PARSEABLE]
    if unsupported:
        raise DbenchError(f"method {method!r} declares option {key!r} as {hint}: options may be "
                          f"bool, int, float, str or None and unions of these")
    return kinds


def _parse_value(kinds: tuple[type, ...], text: str) -> Any:
    """The first of ``kinds`` (in a fixed order: none, bool, int, float, str) that reads ``text``."""
    for kind in sorted(kinds, key=PARSEABLE.index):
        try:
            return _parse_as(kind, text)
        except ValueError:
            continue
    raise ValueError(text)


def _parse_as(kind: type, text: str) -> Any:
    if kind is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise ValueError(text)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    return kind(text)
