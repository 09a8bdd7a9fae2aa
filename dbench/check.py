"""Compare a suite's runs with golden figures kept in the repository; say what regressed.

Golden figures live in ``results/golden/<suite>/<hardware>.json``, one file per
suite and hardware kind ("cpu", or the CUDA device's name such as
"nvidia-h200"): per run, the best test accuracy and each module's peak memory
(accounted bytes on the CPU, the allocator's peak allocated bytes on CUDA).
A run regresses when its best accuracy falls below golden minus the accuracy
tolerance, or a module's peak memory rises above golden times (1 + the memory
tolerance). A run of another task (its summary names it: ``"task": "language
model"``) is judged by that task's criterion (dbench.task.Criterion: a language
model's best test loss in bits per byte, with ``"task"`` and ``best_test_bpb``
in its golden entry, regressing when it rises above golden plus the
bits-per-byte tolerance).
A planned run that is missing or not complete fails the check too.
``--update`` writes the current figures as the new golden ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from dbench import summary as summaries
from dbench import task as tasks
from dbench.errors import DbenchError
from dbench.files import atomic_write_json
from dbench.suites import Suite, status

GOLDEN_ROOT = Path("results/golden")
# Relative: accounted bytes are exact, measured CUDA peaks move a little. Each task's own tolerance (and why
# it is what it is) is its criterion's: dbench/tasks/.
MEMORY_TOLERANCE = 0.05


@dataclass
class Finding:
    run: str
    metric: str
    golden: float | None
    measured: float | None
    limit: float | None
    ok: bool
    note: str = ""


# What the user can do about a complete run whose files are damaged.
DAMAGED_RUN = "restore the file, or remove the run directory and run the suite again"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; a DbenchError names the file, the damage and ``fix``, what the user can do."""
    try:
        return summaries.read_object(path)
    except summaries.SummaryUnreadable as e:
        raise DbenchError(f"{path} {e.reason}: {fix}") from None


def hardware_kind(run_path: Path) -> str:
    path = run_path / "environment.json"
    devices = _read_json(path, DAMAGED_RUN).get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise DbenchError(f"{path}: \"devices\" is not a list of objects, so the run's hardware is unknown: "
                          f"{DAMAGED_RUN}")
    if all(d.get("device", "cpu") == "cpu" for d in devices):
        return "cpu"
    name = next(d.get("name", "cuda") for d in devices if d.get("device", "cpu") != "cpu")
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def figures(run_path: Path) -> dict:
    """The figures of one complete run that the check compares."""
    summary = summaries.read(run_path)
    modules = summary.get("modules") or []
    kind = tasks.of_summary(summary)
    quality = kind.criterion.key
    # A complete run's summary has these; without them it is damaged, and a KeyError would not say where.
    damaged = DbenchError(f"{run_path / summaries.SUMMARY} says complete but lacks a number {quality} or "
                          f"each module's peak bytes: {DAMAGED_RUN}")
    if not _number(summary.get(quality)) or not isinstance(modules, list) or \
            not all(isinstance(m, dict) for m in modules):
        raise damaged
    cuda = bool(modules) and "cuda_peak_allocated_bytes" in modules[0]
    key = "cuda_peak_allocated_bytes" if cuda else "accounted_peak_bytes"
    if not all(_number(m.get(key)) for m in modules):
        raise damaged
    memory = {"memory_kind": "cuda peak allocated" if cuda else "accounted", "peak_bytes": [m[key] for m in modules]}
    # the default task's entry has no "task", as golden files recorded before tasks hold it
    return {**tasks.recorded(kind), quality: summary[quality], **memory}


def task_of(figures: dict) -> tasks.Task:
    """The task of a run's figures or golden entry (none recorded: the default, as before "task" existed)."""
    return tasks.of_summary(figures)


def read_golden(path: Path, suite: str) -> dict:
    """The golden figures at ``path``, their shape checked: a DbenchError names the file and what is wrong."""
    fix = f"restore this golden file from version control, or record it again with `dbench check {suite} --update`"
    golden = _read_json(path, fix)
    # A golden file copied under another suite's folder would compare this suite's runs with figures of
    # other settings (and pass wherever the names happen to match): it must name the suite it was made for.
    if golden.get("suite") != suite:
        recorded = golden.get("suite")
        raise DbenchError(f"{path} holds the golden figures of " + (f"suite {recorded!r}" if isinstance(recorded, str)
                          else "no named suite (no \"suite\" key)") + f", not of {suite!r}: {fix}")
    tolerance = golden.get("tolerance")
    required = (tasks.default().criterion.tolerance_key, "memory")  # every golden file has had these
    if not isinstance(tolerance, dict) or not all(_number(tolerance.get(k)) for k in required):
        raise DbenchError(f"{path} has no \"tolerance\" with numbers " + " and ".join(f'"{k}"' for k in required)
                          + f": {fix}")
    for key in sorted(set(tolerance) - set(required)):  # another task's, where the suite runs one
        if not _number(tolerance[key]):
            raise DbenchError(f"{path}: \"tolerance\" has a \"{key}\" that is not a number: {fix}")
    runs = golden.get("runs")
    if not isinstance(runs, dict):
        raise DbenchError(f"{path} has no \"runs\" object: {fix}")
    for name, want in runs.items():
        quality = task_of(want).criterion.key if isinstance(want, dict) else tasks.default().criterion.key
        if not (isinstance(want, dict) and _number(want.get(quality)) and isinstance(want.get("memory_kind"), str)
                and isinstance(want.get("peak_bytes"), list) and all(_number(b) for b in want["peak_bytes"])):
            raise DbenchError(f"{path}: run {name} lacks a number {quality}, a memory_kind or a list "
                              f"of numbers peak_bytes: {fix}")
    return golden


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
    # the default task's tolerance always (every golden file has it), then each other task's the suite runs
    criteria = [tasks.default().criterion, *(task_of(f).criterion for f in found.values())]
    tolerance = {criteria[0].tolerance_key: criteria[0].tolerance, "memory": MEMORY_TOLERANCE}
    tolerance.update((c.tolerance_key, c.tolerance) for c in criteria[1:] if c.tolerance_key not in tolerance)
    atomic_write_json(path, {
        "suite": suite.name,
        "hardware": kind,
        "recorded": date.today().isoformat(),
        "tolerance": tolerance,
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
    golden = read_golden(path, suite.name)
    tol = golden["tolerance"]
    findings = [Finding(name, "status", None, None, None, False, f"run is {state}") for name, state in missing.items()]
    for name, now in found.items():
        want = golden["runs"].get(name)
        if want is None:
            findings.append(Finding(name, "golden", None, None, None, False, f"no golden figures for this run in {path}"))
            continue
        if task_of(now) is not task_of(want):
            findings.append(Finding(name, "task", None, None, None, False,
                                    f"golden has a {task_of(want).kind} run, the run is a {task_of(now).kind}"))
        else:
            criterion = task_of(now).criterion
            limit = criterion.limit(want[criterion.key], tol.get(criterion.tolerance_key, criterion.tolerance))
            findings.append(Finding(name, criterion.name, want[criterion.key], now[criterion.key], limit,
                                    criterion.passes(now[criterion.key], limit)))
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
