"""Keep freed memory in a training process (glibc), so a step does not fault its activations back in.

A training step frees most of what it allocates (activations, gradients) and
allocates it again in the next step. glibc's malloc hands large freed blocks
back to the kernel (through ``munmap`` above its mmap threshold, and by
trimming the heap's top), so each step touches fresh pages again: on the
2-core machine, FR at K=2 on ResNet-20 took 3 to 4 million minor page faults
and 10 to 12 s of system time per epoch of 50 s, varying from run to run with
the allocator's state. With the mmap threshold fixed at its largest value and
trimming put off, the same run took 1 million faults and 4 s (benchmarks/RESULTS.md,
"The allocator"). PyTorch's CPU tuning guide gives the same advice (or a
caching allocator such as jemalloc).

Every training process (the local engine's, each module's under the
distributed engine or torchrun) calls :func:`keep_freed_memory` before it
builds its share of the run. It changes no number, only where freed memory
goes. It does nothing where the user chose the allocator already (glibc's
``MALLOC_*`` variables, or another allocator through ``LD_PRELOAD``), or where
the C library is not glibc. What it did is recorded in the run's environment.json.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused; glibc's largest allowed value on 64-bit systems.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the heap's top up to this stays with the process (the largest value mallopt's int holds).
TRIM_THRESHOLD = 2**31 - 1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory; returns what was done, for the run's record."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left as is: not glibc"
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return f"left as is: the user set {', '.join(chosen)}"
    if os.environ.get("LD_PRELOAD"):
        return f"left as is: LD_PRELOAD={os.environ['LD_PRELOAD']}"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success and 0 for a value it refuses; a refusal leaves glibc's default in place.
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return (f"glibc mallopt: mmap threshold {MMAP_THRESHOLD} bytes ({'set' if mmap_ok else 'refused'}), "
            f"trim threshold {TRIM_THRESHOLD} bytes ({'set' if trim_ok else 'refused'})")
