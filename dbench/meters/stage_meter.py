"""One module's meters: its clock, its memory accounting and its σ capture."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

from dbench.meters.clock import COMM, COMPUTE, IDLE, PROBE, WAIT_GRAD, WAIT_INPUT, StageClock
from dbench.meters.memory import FixedTensors, SavedTensors, account
from dbench.meters.sigma import SigmaCapture
from dbench.method import INPUT_CHANNELS, Stage


# A ``window`` that never closes: the accounting runs at every iteration.
EVERY_ITERATION = math.inf


class StageMeter:
    """Installed as ``stage.observer``; the engine drives it at the stage's transitions.

    ``queued`` returns the messages waiting in the stage's inbox (the engine
    knows them, the stage does not).

    Memory is accounted in a window of ``window`` iterations at the start of every
    epoch (every segment of one, after a resume), not at every iteration: the
    saved-tensor hooks are a Python call per tensor a forward saves, and with the
    samples they cost 20-30% of a GPU step (benchmarks/RESULTS.md, runner overhead).
    The activations a module holds depend on shapes, not values, so an iteration in
    steady state holds what every other one does, and a window that reaches steady
    state finds the epoch's peak (tested against accounting at every iteration, for
    every method: tests/test_meters.py). The window's samples count only once every
    live graph was built with the hooks on: no graph outlives ``lifetime`` iterations (the
    method's ``graph_lifetime``: K + 1 for most, DDG's module k keeping K-k+1; 2(K-1) for FDG from K = 4),
    which the meter checks on every graph
    it tracks, so samples from ``lifetime`` iterations after the hooks were last off
    see everything. ``window=EVERY_ITERATION`` accounts at every iteration.
    """

    def __init__(self, stage: Stage, queued: Callable[[], Iterable[torch.Tensor]], window: float | None = None):
        self.stage = stage
        self.queued = queued
        self.clock = StageClock(stage.device)
        self.lifetime = stage.graph_lifetime(stage.num_stages)
        # Twice the lifetime and two more: the samples of lifetime + 2 iterations count in each window.
        self.window = 2 * self.lifetime + 2 if window is None else window
        self.iteration = 0  # this module's training iterations so far (probes do not count)
        self.window_start = 0
        self.untracked_at: int | None = None  # the last iteration that ran with the hooks off
        self.saved = SavedTensors(self)
        self.fixed: FixedTensors | None = None  # the module's parameters and buffers, taken at the epoch's start
        self.sigma = SigmaCapture()
        self.probing = False  # during the σ probe: its time is PROBE, its memory is not the method's
        self.peak_total = 0
        self.peak: dict[str, int] = {}
        stage.observer = self

    # The engine's calls, in the order a step makes them.
    def tracking(self):
        """Context for running the stage's code: records what its graphs save for backward (not the probe's),
        in the accounting window."""
        if self.probing:
            return contextlib.nullcontext()
        if not self.in_window:
            self.untracked_at = self.iteration
            return contextlib.nullcontext()
        return self.saved.hooks()

    @property
    def in_window(self) -> bool:
        return self.iteration < self.window_start + self.window

    @property
    def counts(self) -> bool:
        """This iteration's samples see every live graph: the hooks are on and were on when any of them was built."""
        if self.probing or not self.in_window:
            return False
        return self.untracked_at is None or self.iteration > self.untracked_at + self.lifetime

    def resumed(self) -> None:
        self.clock.mark(PROBE if self.probing else COMPUTE)

    def blocked(self, channel: str) -> None:
        self.sample()
        if not self.probing:
            self.clock.mark(WAIT_INPUT if channel in INPUT_CHANNELS else WAIT_GRAD)

    def op(self, op) -> None:
        """The program yielded ``op`` (a trace records it; the meters read the transitions that follow)."""

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
        self.iteration += 1

    # The stage's calls (Stage.backward, Stage.apply_update).
    def before_backward(self) -> None:
        self.sample()

    def before_update(self) -> None:
        self.sample()
        self.sigma.before_update(self.stage)

    def sample(self) -> None:
        if not self.counts:
            return
        if self.window != EVERY_ITERATION:
            self.saved.check_lifetime(self.iteration, self.lifetime, self.stage)
        if self.fixed is None:
            self.fixed = FixedTensors(self.stage.module)
        held = account(self.stage, self.saved, self.queued(), self.fixed)
        total = sum(held.values())
        if total > self.peak_total:
            self.peak_total, self.peak = total, held

    def reset_peak(self) -> None:
        """An epoch (or a segment of one) starts: a new peak, and a new accounting window."""
        self.peak_total, self.peak = 0, {}
        self.fixed = None  # taken anew at the next sample
        self.window_start = self.iteration
