"""Place module k on device k: CUDA when present, the CPU when not, never silently."""
from __future__ import annotations

import torch

from dbench.errors import DbenchError


def resolve_devices(k: int, explicit: list[str] | None = None) -> tuple[list[torch.device], str | None]:
    """The device of each of the K modules, and a one-line note to show the user (or None).

    ``explicit`` (from ``--devices``) is the only way to put several modules on
    one device: it must name K devices, e.g. ``cuda:0,cuda:0,cuda:1,cuda:1``.
    """
    if explicit:
        if len(explicit) != k:
            raise DbenchError(f"--devices names {len(explicit)} devices but --gpus is {k}: name one device per module")
        return [parse_device(d) for d in explicit], None
    if not torch.cuda.is_available():
        return [torch.device("cpu")] * k, f"no CUDA device found: running the {k} module(s) on the CPU"
    found = torch.cuda.device_count()
    if found < k:
        raise DbenchError(
            f"--gpus {k} needs {k} CUDA devices but {found} are visible; "
            f"to share devices name them with --devices (e.g. {','.join(f'cuda:{i % found}' for i in range(k))})"
        )
    return [torch.device("cuda", i) for i in range(k)], None


def parse_device(text: str) -> torch.device:
    """``cpu`` or ``cuda:N`` (``cuda`` is ``cuda:0``), present on this machine; else a one-line DbenchError."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DbenchError(f"bad device {text!r}: expected cpu or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DbenchError(f"bad device {text!r}: no CUDA device is available here; use cpu")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise DbenchError(f"bad device {text!r}: only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DbenchError(f"bad device {text!r}: expected cpu or cuda:N")
    return device


def synchronize(*devices: torch.device) -> None:
    """Wait for the queued work of every CUDA device given, so that a host clock read next sees it finished.

    A no-op for the CPU, whose work is done when the call that launched it returns.
    """
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)
