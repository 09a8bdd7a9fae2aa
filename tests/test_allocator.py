"""Training processes keep freed memory (glibc), unless the user chose the allocator; the run records which."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from dbench import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def in_fresh_process(env: dict) -> str:
    code = "from dbench import allocator; print(allocator.keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_glibc_keeps_freed_memory(monkeypatch):
    for name in (*allocator.USER_SETTINGS, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    said = in_fresh_process(dict(__import__("os").environ))
    assert said == (f"glibc mallopt: mmap threshold {allocator.MMAP_THRESHOLD} bytes (set), "
                    f"trim threshold {allocator.TRIM_THRESHOLD} bytes (set)")


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
@pytest.mark.parametrize("name,value", [("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "131072"),
                                        ("LD_PRELOAD", "libjemalloc.so.2")])
def test_the_user_s_choice_of_allocator_is_left_alone(monkeypatch, name, value):
    import os

    env = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_SETTINGS, "LD_PRELOAD")}
    if name == "LD_PRELOAD":
        # a preloaded library must exist for a process to start: checked in this one, which loads nothing
        for other in allocator.USER_SETTINGS:
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv("LD_PRELOAD", value)
        assert allocator.keep_freed_memory() == f"left as is: LD_PRELOAD={value}"
        return
    said = in_fresh_process({**env, name: value})
    assert said == f"left as is: the user set {name}"


def test_a_run_records_what_its_processes_do_to_the_allocator(tmp_path):
    from dbench import run as runner
    from dbench.config import RunConfig

    path = runner.start(RunConfig(model="mlp", epochs=1, batch_size=512, dataset="synthetic-small"), tmp_path / "run", quiet=True)
    recorded = json.loads((path / "environment.json").read_text())["allocator"]
    assert recorded == allocator.keep_freed_memory()
