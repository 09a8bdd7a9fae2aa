"""The CPUs this process may run on."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (``taskset``, a container's cpuset), else every CPU of the machine.

    ``os.cpu_count()`` counts the machine's CPUs whatever the process may use: under ``taskset -c 4,5`` on a
    16-CPU machine, sharing 16 CPUs out among K modules would give each 8 threads on 2 cores.
    """
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
