"""bench.toml suites: named grids of runs, validated, expanded and run (skipping what is done).

A suite is ``[suite.NAME]`` with shared training settings (any ``RunConfig``
field but the grid's own) and one or more ``[[suite.NAME.grid]]`` tables, each
``methods × models × datasets × gpus × seeds`` with optional setting
overrides. Every run has a fixed directory, ``<root>/<suite>/<method>-<model>-
<dataset>-k<K>-s<seed>``, so running a suite again skips complete runs and
resumes unfinished ones.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dbench import summary as summaries
from dbench.config import RunConfig
from dbench.errors import DbenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GRID_KEYS = {"methods": "method", "models": "model", "datasets": "dataset", "gpus": "gpus", "seeds": "seed"}
SUITE_KEYS = {"description", "grid"}
# Settings a suite may share or a grid may override: every RunConfig field but the grid's own.
SETTINGS = {f.name for f in dataclasses.fields(RunConfig)} - set(GRID_KEYS.values())


@dataclass(frozen=True)
class PlannedRun:
    suite: str
    config: RunConfig

    @property
    def name(self) -> str:
        c = self.config
        return f"{c.method}-{c.model}-{c.dataset}-k{c.gpus}-s{c.seed}"

    def path(self, root: Path) -> Path:
        return root / self.suite / self.name


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    runs: list[PlannedRun]


def load(path: Path, name: str) -> Suite:
    """Suite ``name`` of the file at ``path``, validated; a DbenchError names the file and the key."""
    suites = load_all(path)
    if name not in suites:
        raise DbenchError(f"{path}: no suite {name!r}; suites: {', '.join(suites) or 'none'}")
    return suites[name]


def load_all(path: Path) -> dict[str, Suite]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DbenchError(f"{path} not found: suites live in bench.toml (give another with --file)") from None
    except tomllib.TOMLDecodeError as e:
        raise DbenchError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"suite"})
    if unknown:
        raise DbenchError(f"{path}: unknown top-level key {unknown[0]!r}; suites are [suite.NAME] tables")
    suites = data.get("suite", {})
    _expect(path, "suite", suites, dict, "a table of suites")
    return {name: _suite(path, name, body) for name, body in suites.items()}


def _suite(path: Path, name: str, body: Any) -> Suite:
    where = f"suite.{name}"
    _expect(path, where, body, dict, "a table")
    unknown = sorted(set(body) - SUITE_KEYS - SETTINGS)
    if unknown:
        raise DbenchError(f"{path}: {where}: unknown key {unknown[0]!r}; a suite holds description, grid "
                          f"and run settings ({', '.join(sorted(SETTINGS))})")
    description = body.get("description", "")
    _expect(path, f"{where}.description", description, str, "a string")
    grids = body.get("grid")
    if not grids:
        raise DbenchError(f"{path}: {where} has no [[{where}.grid]]: a suite needs at least one grid")
    _expect(path, f"{where}.grid", grids, list, "an array of tables ([[...grid]])")
    shared = {k: v for k, v in body.items() if k in SETTINGS}
    runs: list[PlannedRun] = []
    for i, grid in enumerate(grids):
        runs += _grid(path, name, f"{where}.grid[{i}]", grid, shared)
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DbenchError(f"{path}: {where}: run {repeated[0]} appears in two grids; each run must be planned once")
    return Suite(name, description, runs)


def _grid(path: Path, suite: str, where: str, grid: Any, shared: dict) -> list[PlannedRun]:
    _expect(path, where, grid, dict, "a table")
    unknown = sorted(set(grid) - GRID_KEYS.keys() - SETTINGS)
    if unknown:
        raise DbenchError(f"{path}: {where}: unknown key {unknown[0]!r}; a grid holds "
                          f"{', '.join(GRID_KEYS)} and run settings to override")
    axes = []
    for key, field in GRID_KEYS.items():
        values = grid.get(key)
        kind = int if key in ("gpus", "seeds") else str
        if values is None:
            raise DbenchError(f"{path}: {where}: missing {key!r} (a list of {kind.__name__}s)")
        if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise DbenchError(f"{path}: {where}.{key}: expected a list of {kind.__name__}s, got {values!r}")
        if not values:
            raise DbenchError(f"{path}: {where}.{key} is empty: the grid would hold no run")
        axes.append([(field, v) for v in values])
    settings = {**shared, **{k: v for k, v in grid.items() if k in SETTINGS}}
    runs = []
    for combo in itertools.product(*axes):
        values = {**settings, **dict(combo)}
        config = _config(path, where, values)
        runs.append(PlannedRun(suite, config))
    return runs


def _config(path: Path, where: str, values: dict) -> RunConfig:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    defaults = RunConfig()
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        if getattr(defaults, key) is None or isinstance(getattr(defaults, key), (list, dict)):
            continue  # optional or container fields: RunConfig.validate judges them
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise DbenchError(f"{path}: {where}: {key} = {value!r} should be {expected.__name__}")
    config = RunConfig(**{k: v for k, v in values.items() if k in fields})
    try:
        config.validate()
    except DbenchError as e:
        raise DbenchError(f"{path}: {where}: {e}") from None
    return config


def _expect(path: Path, where: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise DbenchError(f"{path}: {where} should be {what}, got {value!r}")


# --- running -------------------------------------------------------------------------------------

def status(run: PlannedRun, root: Path) -> str:
    """What is on disk for a planned run: missing, or the status in its summary."""
    return summaries.status_of(run.path(root))


def run_suite(suite: Suite, root: Path, *, quiet: bool = True, data_dir: str | None = None,
              echo: Callable[[str], None] = print, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, str]:
    """Run every planned run that is not complete; returns {run name: final status}.

    A complete run is skipped, an unfinished one resumed, a diverged one
    recorded and left (the suite goes on); any other failure stops the suite.
    """
    from dbench import run as runner

    final = {}
    total = len(suite.runs)
    for i, planned in enumerate(suite.runs, 1):
        path = planned.path(root)
        before = status(planned, root)
        label = f"[{i}/{total}] {planned.name}"
        if before in ("complete", "diverged"):
            echo(f"{label}: {before}, skipped")
            final[planned.name] = before
            continue
        config = planned.config
        if data_dir is not None:
            config = dataclasses.replace(config, data_dir=data_dir)
        echo(f"{label}: {'resuming' if before != 'missing' else 'starting'}")
        try:
            if before == "missing":
                runner.start(config, path, quiet=quiet, on_epoch_end=on_epoch_end)
            else:
                runner.resume(path, quiet=quiet, on_epoch_end=on_epoch_end)
        except DbenchError:
            if status(planned, root) != "diverged":
                raise
        final[planned.name] = status(planned, root)
        best = summaries.read(path).get("best_test_error")
        echo(f"{label}: {final[planned.name]}" + (f", best test error {100 * best:.2f}%" if best is not None else ""))
    return final
