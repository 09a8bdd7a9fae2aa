"""The CPUs this process may run on, and their share-out among the module processes of a CPU run."""
from __future__ import annotations

import os
from pathlib import Path

_run_cpus: int | None = None  # the affinity mask's size before this process was pinned to its module's share


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (``taskset``, a container's cpuset), else every CPU of the machine.

    ``os.cpu_count()`` counts the machine's CPUs whatever the process may use: under ``taskset -c 4,5`` on a
    16-CPU machine, sharing 16 CPUs out among K modules would give each 8 threads on 2 cores.
    """
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_cpus() -> int:
    """CPUs the whole run may use: in a module process pinned by ``pin``, the mask it had before."""
    return _run_cpus if _run_cpus is not None else usable_cpus()


def module_shares(modules: int) -> list[list[int]] | None:
    """Disjoint, equal slices of this process's affinity mask, one per module process, made of whole physical
    cores; None where the mask cannot be read or has fewer CPUs than there are modules (they then share every
    CPU, unpinned).

    Whole cores: two hyperthreads of one core share its arithmetic units, so modules given one sibling each
    would slow each other as two processes on one core do. Linux numbers a core's siblings apart (cpu i and
    i + cores on most x86 machines), so the CPUs are grouped by core first. With fewer cores than modules
    but CPUs enough, each module gets single CPUs. Cores (or CPUs) left over by the floor division stay
    unused.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < modules:
        return None
    cores: dict[tuple[str, str], list[int]] = {}
    for cpu in cpus:
        cores.setdefault(_core_of(cpu), []).append(cpu)
    units = list(cores.values()) if len(cores) >= modules else [[cpu] for cpu in cpus]
    size = len(units) // modules
    return [sorted(cpu for unit in units[i * size:(i + 1) * size] for cpu in unit) for i in range(modules)]


def _core_of(cpu: int) -> tuple[str, str]:
    """(package, core) of a CPU, from Linux's sysfs; the CPU itself where that is not there to read."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
    except OSError:  # not Linux, or a container without sysfs: every CPU counts as a core of its own
        return "", str(cpu)


def pin(cpus: list[int]) -> None:
    """Confine this process to ``cpus``: its module's share of a CPU run (module k on device k).

    Why: unpinned, the K processes' torch threads (a share's worth each) and gloo's threads are placed by the
    scheduler, which may put two modules' threads on one core while another core idles, or move a module
    away from the cache that holds its working set. Pinned, a module's cores compute for it alone. (On the
    2-core machine, where each module has one thread, pinned and unpinned runs measured the same.) Threads
    started after this call (torch's intra-op pool, gloo's) inherit the mask; call it before either exists.
    """
    global _run_cpus
    _run_cpus = usable_cpus()
    os.sched_setaffinity(0, cpus)
