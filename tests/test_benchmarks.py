"""Every benchmark script runs and prints its table (tiny settings: this checks that they work, not how fast)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# The scripts that train whole runs do it on synthetic-small (the built-in recipe at 2k / 400 images): the same
# code paths as on the default synthetic at a fifth of the steps. What is left of their time is mostly process
# start-up (torch, and torch._dynamo on an optimizer's first construction), one per run or module process.
TINY = {
    "contention.py": ["--model", "resnet8", "--batch-size", "8", "--k", "2", "--rounds", "1", "--steps", "1",
                      "--warmup", "1"],
    "overhead.py": ["--model", "resnet8", "--batch-size", "8", "--rounds", "1", "--steps", "1"],
    "ddp_overlap.py": ["--model", "resnet8", "--batch-size", "8", "--rounds", "1", "--steps", "1", "--warmup", "0"],
    "partition_balance.py": ["--models", "resnet8", "--k", "2", "--batch-size", "4", "--repeats", "1"],
    "data_path.py": ["--model", "resnet8", "--samples", "256", "--batch-size", "32", "--steps", "1", "--rounds", "1",
                     "--workers", "0"],
    "sigma_cost.py": ["--model", "mlp", "--k", "2", "--methods", "bp", "--dataset", "synthetic-small",
                      "--root", "{tmp}/sigma"],
    "speedup.py": ["--model", "mlp", "--k", "2", "--batch-size", "512", "--methods", "bp,ddg,ddp", "--rounds", "1",
                   "--split", "blocks", "--dataset", "synthetic-small", "--root", "{tmp}/speed"],
    "learning.py": ["--model", "mlp", "--epochs", "1", "--ks", "2", "--methods", "bp", "--dataset", "synthetic-small",
                    "--root", "{tmp}/learning"],
    "projection.py": ["--model", "mlp", "--k", "2", "--methods", "bp", "--rounds", "1", "--batch-size", "1000",
                      "--dataset", "synthetic-small", "--link", "pcie4", "--root", "{tmp}/projection"],
    "baselines_parity.py": ["--model", "resnet8", "--k", "2", "--microbatches", "2", "--batch-size", "8", "--rounds",
                            "1", "--steps", "1", "--warmup", "0"],
    "startup.py": ["--rounds", "1", "--workers", "1"],
    "breakdown.py": ["--model", "mlp", "--k", "2", "--batch-size", "512", "--methods", "ddg", "--split", "blocks",
                     "--device", "cpu", "--dataset", "synthetic-small", "--root", "{tmp}/breakdown"],
}
GPU_ONLY = {"memory_accuracy.py": ["--models", "resnet8", "--batches", "8"]}


def test_every_script_is_covered():
    assert sorted([*TINY, *GPU_ONLY]) == sorted(p.name for p in BENCHMARKS.glob("*.py"))


def test_a_gpu_benchmark_without_cuda_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "memory_accuracy.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("script", [*sorted(TINY), *(pytest.param(s, marks=pytest.mark.gpu) for s in GPU_ONLY)])
def test_benchmark_prints_its_table(script, tmp_path):
    args = (TINY | GPU_ONLY)[script]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("### ") for line in lines), done.stdout
    assert any(line.startswith("Machine:") for line in lines), done.stdout  # every table names where it ran
    assert any(re.match(r"\|\s*---", line) for line in lines), done.stdout  # a Markdown table


BAD_INPUT = [
    ("overhead.py", ["--steps", "0"]),
    ("contention.py", ["--k", "1"]),
    ("baselines_parity.py", ["--pairs", "ddp,nope"]),
    ("baselines_parity.py", ["--batch-size", "100", "--microbatches", "8"]),
    ("ddp_overlap.py", ["--replicas", "1"]),
    ("projection.py", ["--methods", "ddp", "--root", "{tmp}/projection"]),
    ("ddp_overlap.py", ["--model", "nope"]),
    ("contention.py", ["--model", "nope"]),
    ("overhead.py", ["--model", "nope"]),
    ("breakdown.py", ["--methods", "fr,nope", "--root", "{tmp}/breakdown"]),
    ("breakdown.py", ["--k", "1", "--root", "{tmp}/breakdown"]),
    ("overhead.py", ["--device", "bogus"]),
    ("partition_balance.py", ["--models", "resnet8,nope"]),
    ("partition_balance.py", ["--models", "resnet8", "--k", "99"]),
    ("speedup.py", ["--methods", "bp,nope", "--root", "{tmp}/speed"]),
    ("speedup.py", ["--methods", "fr", "--root", "{tmp}/speed"]),
    ("learning.py", ["--ks", "a", "--root", "{tmp}/learning"]),
    ("learning.py", ["--methods", "bp,fdg[shrink=2]", "--root", "{tmp}/learning"]),
    ("learning.py", ["--methods", "fdg[shrink", "--root", "{tmp}/learning"]),
    ("memory_accuracy.py", ["--batches", "x"]),
    ("memory_accuracy.py", ["--batches", "64,0"]),
    ("speedup.py", ["--methods", "bp,ddg", "--devices", "tpu:0,tpu:0", "--root", "{tmp}/speed"]),
    # --dataset (TINY's synthetic-small) is checked against the registry before the first run starts
    ("speedup.py", ["--dataset", "nope", "--root", "{tmp}/speed"]),
    ("breakdown.py", ["--dataset", "nope", "--root", "{tmp}/breakdown"]),
    ("sigma_cost.py", ["--dataset", "nope", "--root", "{tmp}/sigma"]),
    ("learning.py", ["--dataset", "nope", "--root", "{tmp}/learning"]),
    ("projection.py", ["--dataset", "nope", "--root", "{tmp}/projection"]),
]

# Each case as the script's own process would run it (``python SCRIPT ARGS``: runpy as __main__, its argv,
# a fresh working folder), but all of them in one interpreter: torch and dbench are imported once instead of
# once per case (about 6 s each on CI's 2 cores). A case that raised instead of exiting is reported as such,
# as the traceback a process would print.
_DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
cases, out = json.loads(sys.argv[1]), []
for script, args, folder in cases:
    os.chdir(folder)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it: the scripts import each other
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException:
            err.write(traceback.format_exc())
    out.append({"code": code, "stderr": err.getvalue(), "left": sorted(os.listdir(folder))})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory) -> dict[int, dict]:
    folders = [tmp_path_factory.mktemp(f"bad{i}") for i in range(len(BAD_INPUT))]
    cases = [[str(BENCHMARKS / script), [a.replace("{tmp}", str(folder)) for a in args], str(folder)]
             for (script, args), folder in zip(BAD_INPUT, folders)]
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(enumerate(json.loads(done.stdout.splitlines()[-1])))


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[f"{s}-{i}" for i, (s, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_line_and_exit_2(case, bad_input_results):
    done = bad_input_results[case]
    assert done["code"] == 2, done["stderr"]
    assert done["stderr"].startswith("error: ") and done["stderr"].count("\n") == 1, done["stderr"]
    assert done["left"] == []  # nothing half-made