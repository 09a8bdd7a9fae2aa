"""The task: what a run's data set asks of its model, and how every figure of dbench judges it.

A data set declares its task in config.json (``"task": {"kind": ..., and what that kind needs}``); the
kind names a ``Task`` registered in ``dbench.registry.TASKS`` (the built-in ones are in dbench/tasks/,
one module each). Every consumer of a run's figures asks its task rather than the kind's name:

- summary.json: which epoch is the best, and the task's own figures (``best_epoch``, ``summary_fields``);
- the results tables: the columns the task fills for its runs and epochs (``run_fields``,
  ``epoch_fields``, ``rates``);
- ``dbench check``: the golden figure, its direction and tolerance (``criterion``);
- the report and ``dbench compare``: the quality a run is judged by (``quality``), the time-to-target
  rule (``target``), the curves (``curves``), the index's columns, and their captions.

So a new task (a regression, a masked-LM objective) is one new ``Task`` registered under its kind, and
no edit elsewhere; tests/test_task_plugin.py defines one and finds it in every consumer. The training
objective is not the task's (dbench.objective: cross-entropy for both built-in tasks).

Nothing here imports torch or pandas: summary.json and the golden files are computed without them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbench.errors import DbenchError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Measure:
    """One figure of a run as a table or an axis shows it: ``column`` of dbench's tables (the runs table for a
    run's figures, the epochs table for a curve) times ``scale``, to ``digits`` decimals. Aggregated over
    seeds, its columns are ``{key}_mean`` and ``{key}_std`` (``key`` defaults to ``column``)."""

    column: str
    name: str
    scale: float = 1.0
    digits: int = 2
    key: str = ""

    @property
    def stem(self) -> str:
        return self.key or self.column


@dataclass(frozen=True)
class Quality(Measure):
    """The figure a task's runs are judged by, lower being better (a test error, a test loss): the verdict's
    and the generalization table's. ``short`` names it in the verdict's columns (``reference_{short}_mean``,
    ``{short}_vs_reference``) and ``delta`` is the shown Δ column, with ``{reference}`` in it."""

    short: str = ""
    delta: str = ""
    axis: str = ""  # the verdict figure's y label
    words: str = ""  # its name in a sentence: "best test error"
    better: str = ""  # "as accurate": what being better at it is, in the Pareto caption
    terminal: str = ""  # shorter names for `dbench compare` ("" = the same)
    terminal_delta: str = ""


@dataclass(frozen=True)
class Target:
    """Time to target: training seconds until the first epoch whose ``epoch_column`` reaches a target, given
    with ``--{option}`` or ``factor`` × the comparison's reference's mean best (``reference_value``)."""

    keyword: str  # the verdict's keyword argument (target_acc); the CLI option is the same with dashes
    column: str  # the verdict's column holding the target
    epoch_column: str  # the epochs table's column compared with it
    higher_is_better: bool
    factor: float
    metavar: str
    help: str
    name: str  # "test accuracy": in "time to 85.00% test accuracy"
    unit: str  # written right after the number ("%", " bits per byte")
    scale: float
    digits: int
    reference_name: str  # "mean best test accuracy": the default's source in words
    given_name: str  # "accuracy": in "the accuracy given (--target-acc 0.9)"
    shown: str  # the verdict's column title

    @property
    def option(self) -> str:
        return "--" + self.keyword.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is no target of this kind (None: it is one)."""
        raise NotImplementedError

    def reference_value(self, reference_runs: "pd.DataFrame") -> float:
        """The reference's mean best figure, from its rows of the runs table (NaN: none)."""
        raise NotImplementedError

    def text(self, value: float) -> str:
        """"85.00% test accuracy": a target as a sentence names it."""
        return f"{value * self.scale:.{self.digits}f}{self.unit} {self.name}"

    def reached(self, values: "pd.Series", target: float) -> "pd.Series":
        return values >= target if self.higher_is_better else values <= target


@dataclass(frozen=True)
class Criterion:
    """What ``dbench check`` compares with the golden file: summary.json's ``key``, allowed to be worse by the
    golden file's tolerance ``tolerance_key`` (``tolerance`` when the file was recorded without one)."""

    key: str
    name: str
    tolerance_key: str
    tolerance: float
    higher_is_better: bool

    def limit(self, golden: float, tolerance: float) -> float:
        return golden - tolerance if self.higher_is_better else golden + tolerance

    def passes(self, value: float, limit: float) -> bool:
        # written so that NaN (a diverged run) fails either way
        return value >= limit if self.higher_is_better else value <= limit


class Task:
    """A task kind. Subclasses set the attributes and may override the methods; see the module docstring.

    ``default``: the task of a run recorded before tasks existed (config.json without "task"); exactly one
    registered task says so. Its summary.json and golden entries carry no "task" key, as they never did."""

    kind: str
    default: bool = False
    plural: str  # a heading where a report has several tasks: "Classifications"
    runs_title: str  # the index's runs table where a report has several tasks
    suffix: str = ""  # of its tables' file names (verdict/verdict{suffix}.csv)
    quality: Quality
    target: Target
    criterion: Criterion
    curves: tuple[Measure, Measure]  # training and test figure per epoch (the convergence figures)
    curves_caption: str = ""
    runs_columns: tuple[Measure, ...]  # the index's quality columns
    generalization_title: str
    generalization_intro: str = ""  # said in the section's intro where the report has runs of this task
    generalization_extras: tuple[Measure, ...] = ()  # more means in the generalization CSV
    verdict_title: str
    verdict_intro: str = ""
    verdict_extras: tuple[Measure, ...] = ()  # more means in the verdict's rows and CSV
    run_columns: tuple[str, ...] = ()  # the runs table's columns this task fills (None for other tasks)
    epoch_columns: tuple[str, ...] = ()  # the epochs table's
    rates: tuple[tuple[str, str, str], ...] = ()  # (runs column, speed table title, caption words)

    # --- summary.json ---

    def best_epoch(self, done: list[dict]) -> dict:
        """The best of the epoch rows ``done`` (the first among equals)."""
        raise NotImplementedError

    def summary_fields(self, best: dict, last: dict, samples_per_s: float | None, spec: dict) -> dict:
        """summary.json's figures beyond the common ones (``spec``: config.json's "task")."""
        return {}

    def summary_line(self, summary: dict) -> str:
        """The run page's sentence on its quality."""
        raise NotImplementedError

    def rate_text(self, summary: dict, spec: dict) -> str:
        rate = summary.get("samples_per_s")
        return f"{'–' if rate is None else f'{rate:.0f}'} samples/s"

    def best_text(self, summary: dict) -> str:
        """``dbench suite``'s words on a finished run's best figure ("" where it has none)."""
        value = summary.get(self.quality.column)
        return "" if value is None else f"best {self.quality.name.removeprefix('best ')} " \
                                        f"{value * self.quality.scale:.{self.quality.digits}f}"

    # --- the results tables ---

    def run_fields(self, summary: dict, spec: dict) -> dict:
        """Values of ``run_columns`` for one run."""
        return {}

    def epoch_fields(self, row: dict) -> dict:
        """Values of ``epoch_columns`` for one epoch row of metrics.jsonl."""
        return {}

    # --- the report ---

    def verdict_caption(self, reference: str, target: str, not_reached: str, dash: str) -> str:
        """The verdict caption's definitions of this task's quality, Δ, target and time columns."""
        raise NotImplementedError

    def generalization_caption(self, csv: str) -> str:
        return ""

    def __repr__(self) -> str:
        return f"<task {self.kind!r}>"


def _registry():
    from dbench.registry import TASKS  # the registry loads dbench.tasks, whose modules import this one

    return TASKS


def every() -> list[Task]:
    """The registered tasks, the default first, then by kind: the order of per-task tables and columns."""
    found = [task for _, task in _registry().items()]
    return sorted(found, key=lambda t: (not t.default, t.kind))


def default() -> Task:
    defaults = [t for t in every() if t.default]
    if len(defaults) != 1:
        raise DbenchError(f"{len(defaults)} registered tasks say they are the default "
                          f"({', '.join(t.kind for t in defaults) or 'none'}); exactly one must")
    return defaults[0]


def named(kind: Any) -> Task:
    """The task of kind ``kind`` (None, "" or NaN: the default's, as for a run recorded before tasks)."""
    if kind is None or kind == "" or (isinstance(kind, float) and math.isnan(kind)):
        return default()
    return _registry().get(kind)


def of(spec: Any) -> Task:
    """The task of a config.json "task" (None or without a kind: the default)."""
    return named(spec.get("kind") if isinstance(spec, dict) else None)


def of_summary(summary: dict) -> Task:
    """The task summary.json (or a golden entry) records: its "task" key, absent for the default task."""
    return named(summary.get("task"))


def spec_of(spec: Any) -> dict:
    return spec if isinstance(spec, dict) else {}


def recorded(task: Task) -> dict:
    """What summary.json and golden entries say of their task: nothing for the default, as before tasks."""
    return {} if task.default else {"task": task.kind}


def shared(rows: Any) -> Task:
    """The one task that the rows of a runs, epochs or verdict table (a pandas frame with a "task" column)
    share; rows without the column, or of several tasks, are read as the default task's."""
    kinds = set(rows["task"]) if "task" in rows.columns else set()
    return named(kinds.pop()) if len(kinds) == 1 else default()


def split(rows: Any) -> list[tuple[Task, Any]]:
    """The rows of a table (a pandas frame) split by task, the default first, tasks without rows left out; a
    frame without a "task" column is the default task's, whole. Per-task tables are written from these."""
    if "task" not in rows.columns:
        return [(default(), rows)]
    return [(task, rows[rows["task"] == task.kind]) for task in every() if (rows["task"] == task.kind).any()]


def run_columns() -> list[str]:
    """Every registered task's runs-table columns, in ``every``'s order."""
    return list(dict.fromkeys(c for t in every() for c in t.run_columns))


def epoch_columns() -> list[str]:
    return list(dict.fromkeys(c for t in every() for c in t.epoch_columns))


def targets_given(given: dict) -> dict[str, float | None]:
    """The verdict's targets by keyword, every task's (None: its default); a DbenchError names a keyword no
    task has, or a value its task does not accept, in the CLI's words."""
    keywords = {t.target.keyword: t.target for t in every()}
    unknown = sorted(set(given) - set(keywords))
    if unknown:
        raise DbenchError(f"unknown target {unknown[0]!r}; the tasks' targets are {', '.join(sorted(keywords))}")
    out: dict[str, float | None] = {k: None for k in keywords}
    for keyword, value in given.items():
        if value is None:
            continue
        problem = keywords[keyword].problem(value)
        if problem:
            raise DbenchError(f"{keywords[keyword].option} {problem}")
        out[keyword] = value
    return out
