"""One module's meters: its clock, its memory accounting and its σ capture."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from dbench.meters.clock import COMM, COMPUTE, IDLE, PROBE, WAIT_GRAD, WAIT_INPUT, StageClock
from dbench.meters.memory import FixedTensors, SavedTensors, account
from dbench.meters.sigma import SigmaCapture
from dbench.method import INPUT_CHANNELS, Stage


class StageMeter:
    """Installed as ``stage.observer``; the engine drives it at the stage's transitions.

    ``queued`` returns the messages waiting in the stage's inbox (the engine
    knows them, the stage does not).
    """

    def __init__(self, stage: Stage, queued: Callable[[], Iterable[torch.Tensor]]):
        self.stage = stage
        self.queued = queued
        self.clock = StageClock(stage.device)
        self.saved = SavedTensors()
        self.fixed: FixedTensors | None = None  # the module's parameters and buffers, taken at the epoch's start
        self.sigma = SigmaCapture()
        self.probing = False  # during the σ probe: its time is PROBE, its memory is not the method's
        self.peak_total = 0
        self.peak: dict[str, int] = {}
        stage.observer = self

    # The engine's calls, in the order a step makes them.
    def tracking(self):
        """Context for running the stage's code: records what its graphs save for backward (not the probe's)."""
        return contextlib.nullcontext() if self.probing else self.saved.hooks()

    def resumed(self) -> None:
        self.clock.mark(PROBE if self.probing else COMPUTE)

    def blocked(self, channel: str) -> None:
        self.sample()
        if not self.probing:
            self.clock.mark(WAIT_INPUT if channel in INPUT_CHANNELS else WAIT_GRAD)

    def communicating(self) -> None:
        """The stage hands a message to its transport, or receives one that has started to arrive."""
        if not self.probing:
            self.clock.mark(COMM)

    def handed_step(self) -> None:
        """The engine gave the stage its next step; until it runs, it waits for its turn (its input)."""
        self.clock.mark(PROBE if self.probing else WAIT_INPUT)

    def finished(self) -> None:
        if self.probing:
            return  # the probe's time runs on until the step it measures is handed out
        self.sample()
        self.clock.mark(IDLE)

    # The stage's calls (Stage.backward, Stage.apply_update).
    def before_backward(self) -> None:
        self.sample()

    def before_update(self) -> None:
        self.sample()
        self.sigma.before_update(self.stage)

    def sample(self) -> None:
        if self.probing:
            return
        if self.fixed is None:
            self.fixed = FixedTensors(self.stage.module)
        held = account(self.stage, self.saved, self.queued(), self.fixed)
        total = sum(held.values())
        if total > self.peak_total:
            self.peak_total, self.peak = total, held

    def reset_peak(self) -> None:
        self.peak_total, self.peak = 0, {}
        self.fixed = None  # taken anew at the next sample
