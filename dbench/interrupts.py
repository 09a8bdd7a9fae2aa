"""Stopping on Ctrl-C or SIGTERM, also when the signal lands where Python drops exceptions.

A signal handler's exception is raised in whatever Python code runs at that moment. When that is
a ``__del__`` (the memory meter's saved-tensor wrappers run thousands an iteration) or a weakref
callback, Python prints "Exception ignored" and carries on: a `kill` during set-up was seen to be
swallowed so, and the run went on training. So the handler also notes the request, and the loops
that run long (training steps, profiling blocks, timing candidate cuts) call :func:`check`, which
raises it again at the next safe point.
"""
from __future__ import annotations

import signal

requested = False


def request(signum=None, frame=None) -> None:
    """Signal handler: note the request, and raise it where the program is now."""
    global requested
    requested = True
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested (and perhaps swallowed where it landed)."""
    if requested:
        raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both stop the process through :func:`request`."""
    signal.signal(signal.SIGINT, request)
    signal.signal(signal.SIGTERM, request)
