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
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dbench import summary as summaries
from dbench import task as tasks
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
# The type of each setting is RunConfig's own annotation: declared once, checked here for every key.
SETTING_TYPES = {name: hint for name, hint in typing.get_type_hints(RunConfig).items() if name in SETTINGS}
# A suite's name is a folder under the results: no path separator, no leading dot (hidden, skipped by reports).
SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a suite does with a run directory, by the status in its summary.json.
SKIPPED = ("complete", "diverged")  # left as they are
RESUMED = summaries.RESUMABLE  # continued from the last finished epoch


@dataclass(frozen=True)
class PlannedRun:
    suite: str
    config: RunConfig
    where: str  # the grid that planned it, e.g. suite.NAME.grid[0], for error messages

    @property
    def name(self) -> str:
        """The run's folder: method (with the options it sets, so variants of a method in one suite are
        kept apart, e.g. ``fdg-shrink0.5``), model, data set, devices (and replicas) and seed."""
        c = self.config
        options = "".join(f"-{key}{value}" for key, value in sorted(c.method_options.items()))
        return f"{c.method}{options}-{c.model}-{c.dataset}-{c.layout_name()}-s{c.seed}"

    def path(self, root: Path) -> Path:
        return root / self.suite / self.name


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    runs: list[PlannedRun]
    source: Path  # the bench.toml it came from, for error messages


def load(path: Path, name: str) -> Suite:
    """Suite ``name`` of the file at ``path``, validated; a DbenchError names the file and the key."""
    suites = load_all(path)
    if name not in suites:
        raise DbenchError(f"{path}: no suite {name!r}; suites: {', '.join(suites) or 'none'}")
    return suites[name]


def load_all(path: Path) -> dict[str, Suite]:
    try:
        text = Path(path).read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise DbenchError(f"{path} not found: suites live in bench.toml (give another with --file)") from None
    except tomllib.TOMLDecodeError as e:
        raise DbenchError(f"{path} is not valid TOML: {_toml_problem(text, e)}") from None
    unknown = sorted(set(data) - {"suite"})
    if unknown:
        raise DbenchError(f"{path}: unknown top-level key {unknown[0]!r}; suites are [suite.NAME] tables")
    suites = data.get("suite", {})
    _expect(path, "suite", suites, dict, "a table of suites")
    return {name: _suite(path, name, body) for name, body in suites.items()}


def _toml_problem(text: str, error: Exception) -> str:
    """The parser's message, and for a key given twice the key's name (the parser says only where)."""
    message = str(error)
    found = re.search(r"at line (\d+), column \d+", message)
    if found is None:
        return message
    line = text.splitlines()[int(found[1]) - 1].strip() if int(found[1]) <= len(text.splitlines()) else ""
    if "overwrite" in message and "=" in line:
        return f"key {line.split('=', 1)[0].strip()!r} is set twice in one table ({message})"
    return f"{message}: {line!r}" if line else message


def _suite(path: Path, name: str, body: Any) -> Suite:
    where = f"suite.{name}"
    if not SUITE_NAME.fullmatch(name):
        raise DbenchError(f"{path}: [{where}]: bad suite name {name!r}: it names the folder of its runs, so use "
                          f"letters, digits, '-', '_' and '.' (not first)")
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
    _check_types(path, where, shared)
    runs: list[PlannedRun] = []
    for i, grid in enumerate(grids):
        runs += _grid(path, name, f"{where}.grid[{i}]", grid, shared)
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DbenchError(f"{path}: {where}: run {repeated[0]} appears in two grids; each run must be planned once")
    return Suite(name, description, runs, Path(path))


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
    overrides = {k: v for k, v in grid.items() if k in SETTINGS}
    _check_types(path, where, overrides)
    settings = {**shared, **overrides}
    runs = []
    for combo in itertools.product(*axes):
        planned = PlannedRun(suite, RunConfig(**settings, **dict(combo)), where)
        try:
            planned.config.validate()
        except DbenchError as e:
            raise DbenchError(f"{path}: {where}, run {planned.name}: {e}") from None
        runs.append(planned)
    return runs


def _check_types(path: Path, where: str, settings: dict) -> None:
    """Each setting's TOML value against RunConfig's annotation: a wrong type is named here, not a crash later."""
    for key, value in settings.items():
        hint = SETTING_TYPES[key]
        if not _accepts(hint, value):
            raise DbenchError(f"{path}: {where}: {key} = {value!r} should be {_describe(hint)}")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a RunConfig annotation. TOML has no null: an optional setting is left out."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint) if h is not type(None))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_accepts(key, k) and _accepts(item, v) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # Python's bool is an int; TOML's true is no number
    if hint is float:
        return isinstance(value, (int, float))  # lr = 1 means 1.0
    return isinstance(value, hint)


# How _describe names each plain type, alone and in a list or table.
ONE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
MANY = {bool: "trues and falses", int: "integers", float: "numbers", str: "strings"}


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is list:
        return f"a list of {MANY[typing.get_args(hint)[0]]}"
    if origin is dict:
        return f'a table of {MANY[typing.get_args(hint)[1]]} (e.g. {{ name = "value" }})'
    return ONE[hint]


def _expect(path: Path, where: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise DbenchError(f"{path}: {where} should be {what}, got {value!r}")


# --- running -------------------------------------------------------------------------------------

class DamagedRun(DbenchError):
    """A planned run's path holds something the suite cannot act on: a directory whose summary.json is missing or
    damaged, or a file."""


def status(run: PlannedRun, root: Path) -> str:
    """What is on disk for a planned run: "missing", or the status in its summary.json.

    A directory whose summary.json is missing, damaged or without a status the
    suite knows is a DamagedRun: it can be neither skipped (it may not be done)
    nor resumed (resuming reads the summary), and removing it could lose hours
    of training, so the user decides.
    """
    path = run.path(root)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        raise DamagedRun(f"{path} is not a directory: it stands where run {run.name} of suite {run.suite} goes; "
                         f"move it away")
    try:
        summary = summaries.read(path)
    except summaries.SummaryUnreadable as e:
        damage = f"{e.path} {e.reason}"
    else:
        state = summary.get("status")
        if state in SKIPPED + RESUMED:
            return state
        file = path / summaries.SUMMARY
        damage = (f"{file} has no status" if "status" not in summary
                  else f"{file} has status {state!r}, not one of {', '.join(SKIPPED + RESUMED)}")
    raise DamagedRun(f"{damage}: run {run.name} of suite {run.suite} can be neither skipped nor resumed; "
                     f"restore the file, or remove {path} to run it again")


def _for_this_machine(config: RunConfig, data_dir: str | None, device: str | None = None) -> RunConfig:
    """A new run's settings, with the --data-dir given to `dbench suite` in place of the suite's, and with
    --device every module of the run on that one device (K modules sharing a GPU: a cost on it, not a
    parallel speedup; the report says so)."""
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    if device is not None:
        config = dataclasses.replace(config, devices=[device] * config.gpus)
    return config


def check(suite: Suite, root: Path, data_dir: str | None = None, device: str | None = None) -> dict[str, str]:
    """{run name: status on disk} of every run, once each run the suite would start is planned as
    `dbench run` plans it (``plan.check``): a DbenchError, before anything trains or is written, names
    the first damaged run directory or the first run `dbench run` would refuse.

    A run already on disk is not planned again: it goes on (or stays) with the settings it recorded.
    """
    from dbench import plan  # torch: only when a suite is run or listed

    states, damaged = {}, []
    for planned in suite.runs:
        try:
            states[planned.name] = status(planned, root)
        except DamagedRun as e:
            damaged.append(e)
    if damaged:
        more = f" ({len(damaged) - 1} more damaged run(s) in this suite)" if len(damaged) > 1 else ""
        raise DamagedRun(f"{damaged[0]}{more}")
    for planned in suite.runs:
        if states[planned.name] != "missing":
            continue
        try:
            plan.check(_for_this_machine(planned.config, data_dir, device))
        except DbenchError as e:
            raise DbenchError(f"{suite.source}: {planned.where}, run {planned.name}: {e}") from None
    return states


def run_suite(suite: Suite, root: Path, *, quiet: bool = True, data_dir: str | None = None, device: str | None = None,
              echo: Callable[[str], None] = print, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, str]:
    """Run every planned run that is not complete; returns {run name: final status}.

    First ``check`` (every run, before the first trains). Then a complete run
    is skipped, an unfinished one resumed, a diverged one recorded and left
    (the suite goes on); any other failure stops the suite.
    """
    from dbench import run as runner

    check(suite, root, data_dir, device)
    final = {}
    total = len(suite.runs)
    for i, planned in enumerate(suite.runs, 1):
        path = planned.path(root)
        before = status(planned, root)
        label = f"[{i}/{total}] {planned.name}"
        if before in SKIPPED:
            echo(f"{label}: {before}, skipped")
            final[planned.name] = before
            continue
        config = _for_this_machine(planned.config, data_dir, device)
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
        result = summaries.read(path)
        best = tasks.of_summary(result).best_text(result)  # in the words of the run's task
        echo(f"{label}: {final[planned.name]}" + (f", {best}" if best else ""))
    return final
