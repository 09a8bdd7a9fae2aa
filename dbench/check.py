"""Compare a suite's runs with golden figures kept in the repository; say what regressed.

Golden figures live in ``results/golden/<suite>/<hardware>.json``, one file per
suite and hardware kind ("cpu", or the CUDA device's name such as
"nvidia-h200"): per run, the best test accuracy and each module's peak memory
(accounted bytes on the CPU, the allocator's peak allocated bytes on CUDA).
A run regresses when its best accuracy falls below golden minus the accuracy
tolerance, or a module's peak memory rises above golden times (1 + the memory
tolerance). A planned run that is missing or not complete fails the check too.
``--update`` writes the current figures as the new golden ones.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from dbench import summary as summaries
from dbench.errors import DbenchError
from dbench.record import atomic_write_json
from dbench.suites import Suite, status

GOLDEN_ROOT = Path("results/golden")
# Accuracy: absolute, in accuracy units (0.03 = 3 points). The runs are
# deterministic on one machine; the margin absorbs other CPUs' float rounding.
ACCURACY_TOLERANCE = 0.03
MEMORY_TOLERANCE = 0.05  # relative: accounted bytes are exact, measured CUDA peaks move a little


@dataclass
class Finding:
    run: str
    metric: str
    golden: float | None
    measured: float | None
    limit: float | None
    ok: bool
    note: str = ""


def hardware_kind(run_path: Path) -> str:
    env = json.loads((run_path / "environment.json").read_text())
    devices = env.get("devices", [])
    if all(d.get("device", "cpu") == "cpu" for d in devices):
        return "cpu"
    name = next(d.get("name", "cuda") for d in devices if d.get("device", "cpu") != "cpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def figures(run_path: Path) -> dict:
    """The figures of one run that the check compares."""
    summary = summaries.read(run_path)
    modules = summary.get("modules") or []
    cuda = bool(modules) and "cuda_peak_allocated_bytes" in modules[0]
    key = "cuda_peak_allocated_bytes" if cuda else "accounted_peak_bytes"
    return {
        "best_test_acc": summary["best_test_acc"],
        "memory_kind": "cuda peak allocated" if cuda else "accounted",
        "peak_bytes": [m[key] for m in modules],
    }


def golden_path(suite: Suite, kind: str, root: Path = GOLDEN_ROOT) -> Path:
    return root / suite.name / f"{kind}.json"


def collect(suite: Suite, results: Path) -> tuple[dict[str, dict], dict[str, str], str | None]:
    """Figures of the complete runs, the status of the others, and the hardware kind they ran on."""
    found, missing, kinds = {}, {}, set()
    for planned in suite.runs:
        path = planned.path(results)
        state = status(planned, results)
        if state != "complete":
            missing[planned.name] = state
            continue
        found[planned.name] = figures(path)
        kinds.add(hardware_kind(path))
    if len(kinds) > 1:
        raise DbenchError(f"suite {suite.name!r} under {results} mixes hardware kinds {sorted(kinds)}: check them apart")
    return found, missing, (kinds.pop() if kinds else None)


def update(suite: Suite, results: Path, golden_root: Path = GOLDEN_ROOT) -> Path:
    found, missing, kind = collect(suite, results)
    if missing:
        name, state = next(iter(missing.items()))
        raise DbenchError(f"cannot update the golden figures of {suite.name!r}: run {name} is {state}; "
                          f"finish the suite first (dbench suite {suite.name})")
    path = golden_path(suite, kind, golden_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {
        "suite": suite.name,
        "hardware": kind,
        "recorded": date.today().isoformat(),
        "tolerance": {"accuracy": ACCURACY_TOLERANCE, "memory": MEMORY_TOLERANCE},
        "runs": found,
    })
    return path


def check(suite: Suite, results: Path, golden_root: Path = GOLDEN_ROOT) -> tuple[list[Finding], Path]:
    found, missing, kind = collect(suite, results)
    if kind is None:
        raise DbenchError(f"no complete run of suite {suite.name!r} under {results}: run `dbench suite {suite.name}` first")
    path = golden_path(suite, kind, golden_root)
    if not path.exists():
        raise DbenchError(f"no golden figures for suite {suite.name!r} on {kind} ({path}): "
                          f"record them with `dbench check {suite.name} --update`")
    golden = json.loads(path.read_text())
    tol = golden["tolerance"]
    findings = [Finding(name, "status", None, None, None, False, f"run is {state}") for name, state in missing.items()]
    for name, now in found.items():
        want = golden["runs"].get(name)
        if want is None:
            findings.append(Finding(name, "golden", None, None, None, False, f"no golden figures for this run in {path}"))
            continue
        limit = want["best_test_acc"] - tol["accuracy"]
        findings.append(Finding(name, "best test accuracy", want["best_test_acc"], now["best_test_acc"], limit,
                                now["best_test_acc"] >= limit))
        if now["memory_kind"] != want["memory_kind"] or len(now["peak_bytes"]) != len(want["peak_bytes"]):
            findings.append(Finding(name, "peak memory", None, None, None, False,
                                    f"golden has {want['memory_kind']} of {len(want['peak_bytes'])} modules, "
                                    f"the run {now['memory_kind']} of {len(now['peak_bytes'])}"))
            continue
        for k, (g, m) in enumerate(zip(want["peak_bytes"], now["peak_bytes"])):
            limit = g * (1 + tol["memory"])
            findings.append(Finding(name, f"module {k} peak MiB ({now['memory_kind']})", g / 2**20, m / 2**20,
                                    limit / 2**20, m <= limit))
    return findings, path


def table(findings: list[Finding], only_failures: bool = False) -> str:
    rows = [f for f in findings if not (only_failures and f.ok)]
    lines = ["| run | figure | golden | measured | limit | result |", "|---|---|---|---|---|---|"]

    def num(v):
        return "–" if v is None else f"{v:.4g}"

    for f in rows:
        result = "ok" if f.ok else ("REGRESSED" if f.golden is not None else f"FAILED: {f.note}")
        lines.append(f"| {f.run} | {f.metric} | {num(f.golden)} | {num(f.measured)} | {num(f.limit)} | {result} |")
    return "\n".join(lines)
