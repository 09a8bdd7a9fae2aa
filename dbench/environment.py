"""What a run ran on: software versions, devices, and the source revision."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import dbench
from dbench import allocator
from dbench.cpus import usable_cpus

_SOURCE = Path(__file__).resolve().parent.parent


def git_revision() -> dict:
    """HEAD of the checkout dbench runs from, and whether it had local changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(_SOURCE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return {"revision": None, "why": f"not a git checkout: {head.stderr.strip()}"}
        status = subprocess.run(
            ["git", "-C", str(_SOURCE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except FileNotFoundError:
        return {"revision": None, "why": "git is not installed"}
    return {"revision": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "device": str(device),
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
        }
    return {"device": str(device), "name": platform.processor() or platform.machine()}


def collect(devices: list[torch.device]) -> dict:
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "dbench": dbench.__version__,
        "torch": torch.__version__,
        # the installed distribution's version, read without importing torchvision: its import pulls in
        # torch._dynamo (2 s of every run's start on a small CPU) and no model or data set of the run needs it
        "torchvision": importlib.metadata.version("torchvision"),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": usable_cpus(),  # the CPUs the run may use (its affinity mask)
        "machine_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # what every training process of the run does to the C allocator (each applies it at its start)
        "allocator": allocator.keep_freed_memory(),
        "devices": [device_info(d) for d in devices],
        "git": git_revision(),
        "argv": sys.argv,
    }
