"""Where each module's wall-clock goes: computing, communicating, waiting for an input or a gradient, idle, probing.

A :class:`StageClock` is marked at every transition of its stage (the engine
marks it when the stage resumes, blocks on a message or finishes its step), and
the time between two marks goes to the state the stage was in. The marks cover
the epoch without gaps, so the states add up to the epoch's training time.

On the CPU a mark reads ``time.perf_counter``. On CUDA a mark records an event
on the device's current stream, and the intervals are read once the epoch's
work has been synchronized: a host clock would time the launching of
asynchronous kernels, not their execution.
"""
from __future__ import annotations

import time

import torch

COMPUTE = "compute"  # forward, backward or replay, update
# Moving messages: handing a message to the transport (staging it for the wire, posting the send), and
# receiving one once it has started to arrive (its header is in: the sender has posted it). Time blocked
# before that is waiting, not communication: the peer had not sent yet.
COMM = "comm"
WAIT_INPUT = "wait_input"  # blocked until the module below sends an activation
WAIT_GRAD = "wait_grad"  # blocked until a teaching signal arrives (gradient from above, DFA's error)
IDLE = "idle"  # its step is done (or not handed out yet): the runner, other modules in a sequential engine
PROBE = "probe"  # the σ probe's extra plain-BP pass (not part of any method's cost)
# This process's loader producing the next batch (reading, augmenting; labels only, above the first module):
# told apart from idle so that a first module's time spent on the data is not mistaken for slack.
DATA = "data"
STATES = (COMPUTE, WAIT_INPUT, WAIT_GRAD, IDLE, PROBE, COMM, DATA)


class StageClock:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.running = False
        self.state = IDLE
        self.totals = dict.fromkeys(STATES, 0.0)
        self._last: float | torch.cuda.Event | None = None
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        """Begin an epoch in the idle state; call right after the runner's synchronization."""
        self.totals = dict.fromkeys(STATES, 0.0)
        self._pending = []
        self.state = IDLE
        self._last = self._now()
        self.running = True

    def mark(self, state: str) -> None:
        """From now on the stage is in ``state``."""
        if not self.running or state == self.state:
            return
        now = self._now()
        if self.cuda:
            self._pending.append((self.state, self._last, now))
        else:
            self.totals[self.state] += now - self._last
        self.state, self._last = state, now

    def stop(self) -> dict[str, float]:
        """Seconds per state since :meth:`start`. On CUDA call it after synchronizing the device."""
        if not self.running:
            return dict(self.totals)
        now = self._now()
        if self.cuda:
            self._pending.append((self.state, self._last, now))
            for state, begin, end in self._pending:
                self.totals[state] += begin.elapsed_time(end) / 1000.0  # ms -> s
            self._pending = []
        else:
            self.totals[self.state] += now - self._last
        self.running = False
        return dict(self.totals)

    def _now(self):
        return now(self.device)


def now(device: torch.device) -> "float | torch.cuda.Event":
    """A mark of the present on ``device``: an event recorded on its current stream on CUDA (what a kernel
    queued before it must finish to pass), the host clock elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()
