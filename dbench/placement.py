"""Where a run's processes go: the placement policy the planner, the runner and the launcher share.

A leaf module (``dbench.cpus`` only, and torch once a device is read), so that planning a run does not import
the launcher, and the CLI can ask ``under_torchrun`` before it imports torch.
"""
from __future__ import annotations

import os

from dbench.cpus import module_shares, usable_cpus


def _on_the_cpu(devices: list) -> bool:
    import torch  # here, not at the top: see the module's docstring

    return all(torch.device(d).type == "cpu" for d in devices)


def worker_threads(devices: list) -> int | None:
    """Torch threads of each worker process when every module is on the CPU: the CPUs of its share; where
    there are no shares (fewer CPUs than modules, or no affinity mask to read, as on macOS) the CPUs split
    evenly, at least one each. Else None (as is)."""
    if _on_the_cpu(devices):
        shares = worker_cpus(devices)
        return min(len(share) for share in shares) if shares else max(1, usable_cpus() // len(devices))
    return None


def worker_cpus(devices: list) -> list[list[int]] | None:
    """The CPUs each worker process is pinned to: a share of this process's affinity mask per module when
    every module is on the CPU and there are CPUs enough (``dbench.cpus.module_shares``), else None (as is).
    Module k on device k: on the CPU, a module's device is its share of the cores."""
    if _on_the_cpu(devices):
        return module_shares(len(devices))
    return None


def under_torchrun() -> bool:
    """True in a process that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def speaks() -> bool:
    """Whether this process prints the run's messages: always, except under torchrun where only the writer does."""
    return not under_torchrun() or int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
