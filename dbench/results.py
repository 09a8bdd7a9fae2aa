"""Read run directories back as tidy pandas tables, for reports and notebooks.

    runs, warnings = load_runs(["results/"])       # finished runs; the rest named in warnings
    runs_frame(runs)      one row per run: method and its facts, model, data set, K, seed, task, best error (a language
                          model's best test loss in bits per byte), speed, git revision
    epochs_frame(runs)    one row per run and epoch: losses (bits per byte too for a language model), accuracies,
                          seconds (and their running total)
    modules_frame(runs)   one row per run, epoch and module: time states, peak memory and its categories
    module_peaks(runs)    one row per run and module: its peak memory over the run, as summary.json has it
    probes_frame(runs)    one row per run, σ probe and module (plus the network): σ, corrected σ, cosine

A run directory is what ``dbench run`` writes (see dbench.record). Older runs
may lack parts (no per-module data, no σ probes): the tables then simply have
no rows for them. A run that is not finished, or whose files cannot be read,
is left out with a warning naming it and why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from dbench import summary as summaries
from dbench import task as tasks
from dbench.errors import DbenchError
from dbench.files import CONFIG, ENVIRONMENT, METRICS, SUMMARY, Unreadable, read_object, read_rows
from dbench.run_paths import check_given

RUN_FILES = (CONFIG, SUMMARY, METRICS)  # a folder holding any of these is taken for a run directory

COMPLETE = "complete"
MIB = 2**20

# Columns that say which experiment a row belongs to, repeated in every table.
ID_COLUMNS = ["run", "label", "method", "model", "dataset", "k", "seed"]

# The facts of a method that is not installed, for a run that did not record them: no family,
# after every installed method in tables, not a baseline, no ideal speedup (Stage's defaults).
UNKNOWN_FACTS = {"family": "", "table_order": 100.0, "reference": False, "locking": "", "ideal_speedup": None}

# RunConfig fields that do not change what a run computes or measures; runs that
# differ only in these (and the seed) are repetitions of one experiment.
NOT_SETTINGS = {"seed", "data_dir", "download", "devices", "comm_timeout", "sigma_every", "sigma_batches", "method_options",
                "checkpoint_every", "trace",
                "replicas"}  # the layout is part of every label instead (Run.label)


class RunSkipped(DbenchError):
    """A run directory that cannot be used; the message says why."""


@dataclass
class Run:
    """One run directory, read: its JSON files and its metric rows."""

    path: Path
    config: dict
    environment: dict
    summary: dict
    epoch_rows: list[dict]
    probe_rows: list[dict]
    name: str = ""  # unique among the runs loaded together (path relative to their common folder)
    # Settings in which this run differs from other runs of its method, model, data set and K (see
    # ``distinguish``): part of its label, so that runs of different experiments are never averaged.
    differs: dict = field(default_factory=dict)

    @property
    def settings(self) -> dict:
        return self.config["run"]

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def method_label(self) -> str:
        """The method with its non-default options: mymethod[scale=0.5] is not the same experiment as mymethod
        (dbench.summary.method_label, which summary.md's title uses too)."""
        return summaries.method_label(self.config)

    @property
    def accounts_activations(self) -> bool:
        """Whether the meter accounted the method's activations (a method says so in its facts; a run whose
        facts do not say, every method before the split-backward schedules, did)."""
        return self.facts.get("accounts_activations", True)

    @property
    def layout(self) -> tuple[int, int]:
        """(K modules, D replicas) on its N devices; a run recorded before layouts: ddp's were N whole-model
        replicas, every other method's N modules."""
        layout = self.config.get("layout")
        if isinstance(layout, dict):
            return int(layout["modules"]), int(layout["replicas"])
        if self.facts.get("parallelism") == "data":
            return 1, self.k
        return self.k, 1

    @property
    def layout_label(self) -> str:
        """`` 2×2`` for a hybrid (dbench.summary.layout_label)."""
        return summaries.layout_label(*self.layout, self.facts.get("parallelism"))

    @property
    def label(self) -> str:
        """The method label with its layout, plus the settings that set this run apart from others it is shown
        with: ``bp (engine=local, epochs=2)``, ``ddg 2×2``."""
        label = self.method_label + self.layout_label
        if not self.differs:
            return label
        return label + " (" + ", ".join(f"{k}={_text(v)}" for k, v in sorted(self.differs.items())) + ")"

    def comparable_settings(self) -> dict:
        """The settings that change what a run computes or measures, seed aside (the engine as resolved)."""
        s = {k: v for k, v in self.settings.items() if k not in NOT_SETTINGS}
        s["engine"] = self.engine
        return s

    @property
    def k(self) -> int:
        return int(self.settings["gpus"])

    @property
    def facts(self) -> dict:
        """What the method says about itself (dbench.method.Stage.facts): family, table_order, reference,
        locking, ideal_speedup, as the run recorded them for its K and options.

        A run recorded before config.json held them asks the installed method
        (see ``installed_facts``).
        """
        recorded = self.config.get("method_facts")
        if recorded is not None:
            return {**UNKNOWN_FACTS, **recorded}
        return installed_facts(self.method, self.k, default_options=self.method_label == self.method)

    @property
    def task(self) -> dict | None:
        """config.json's "task" (None for a run recorded before it: a classification)."""
        task = self.config.get("task")
        return task if isinstance(task, dict) else None

    @property
    def task_kind(self) -> str:
        """Its task's kind ("classification", "language model", or a plug-in's: dbench.task)."""
        return self.task_object.kind

    @property
    def task_object(self) -> tasks.Task:
        return tasks.of(self.task)

    @property
    def engine(self) -> str:
        # config["engine"] is the engine the run used; run.engine may be "auto"
        return self.config.get("engine") or self.settings.get("engine", "?")

    @property
    def git_revision(self) -> str | None:
        git = self.environment.get("git")
        if isinstance(git, dict):
            return git.get("revision")
        return git if isinstance(git, str) else None

    @property
    def git_dirty(self) -> bool | None:
        git = self.environment.get("git")
        return git.get("dirty") if isinstance(git, dict) else None


def installed_facts(method: str, k: int, default_options: bool = True) -> dict:
    """The facts of ``method`` at K=``k`` from the installed method; UNKNOWN_FACTS if it is not installed.

    For runs that did not record their facts. ``facts(k)`` assumes the default
    options, and an option may change the method's cost, so a run with other
    options gets no ideal speedup. Imports the methods, hence torch.
    """
    from dbench.registry import METHODS

    if method not in METHODS:
        return dict(UNKNOWN_FACTS)
    facts = METHODS.get(method).facts(k)
    if not default_options:
        facts["ideal_speedup"] = None
    return facts


@dataclass
class Loaded:
    """The runs that can be used, and one warning line for each that was left out."""

    runs: list[Run] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def find_runs(paths: Iterable[Path | str]) -> list[Path]:
    """Run directories at or below each path (a run directory itself, or a folder searched recursively).

    Folders whose names start with a dot are skipped: ``dbench run`` stages a
    new run directory under such a name before renaming it into place.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        check_given([path])
        for run in _walk(path):
            key = run.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run)
    return found


def _walk(folder: Path) -> list[Path]:
    if any((folder / name).exists() for name in RUN_FILES):
        return [folder]  # run directories do not nest
    out = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            out.extend(_walk(child))
    return out


def _read_json(path: Path, required: bool) -> dict | None:
    try:
        return read_object(path)
    except Unreadable as e:
        if e.reason == "is missing" and not required:
            return None
        raise RunSkipped(f"{path.name} {e.reason}") from None


def _read_metrics(path: Path) -> list[dict]:
    try:
        return [row for _, row in read_rows(path)]
    except Unreadable as e:
        raise RunSkipped(f"{path.name} {e.reason}") from None


def _latest_per_epoch(rows: list[dict]) -> list[dict]:
    """One row per epoch, the last written (a resumed run may have redone an epoch), in epoch order."""
    by_epoch = {}
    for row in rows:
        by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_run(path: Path | str) -> Run:
    """Read one run directory; raises RunSkipped (with the reason) if its files are missing or corrupt."""
    path = Path(path)
    config = _read_json(path / CONFIG, required=True)
    try:
        summary = summaries.read(path)
    except summaries.SummaryUnreadable as e:
        raise RunSkipped(f"{SUMMARY} {e.reason}") from None
    environment = _read_json(path / ENVIRONMENT, required=False) or {}
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        raise RunSkipped(f"{CONFIG} has no \"run\" settings")
    for key in ("method", "model", "dataset", "gpus", "seed"):
        if key not in config["run"]:
            raise RunSkipped(f"{CONFIG} lacks run.{key}")
    if not isinstance(config.get("method_facts", {}), dict):
        raise RunSkipped(f"{CONFIG}: method_facts is not an object")
    if "status" not in summary:
        raise RunSkipped(f"{SUMMARY} has no status")
    rows = _read_metrics(path / METRICS)
    epochs = _latest_per_epoch([r for r in rows if r.get("kind") == "epoch" and "epoch" in r])
    done = summary.get("epochs_done")
    if done is not None:
        # rows past the summary's last finished epoch belong to an epoch that was redone on resume
        epochs = [r for r in epochs if r["epoch"] <= done]
    probes = [r for r in rows if r.get("kind") == "probe" and (done is None or r.get("epoch", 0) <= done)]
    return Run(path=path, config=config, environment=environment, summary=summary, epoch_rows=epochs, probe_rows=probes)


def load_runs(paths: Iterable[Path | str], include_unfinished: bool = False) -> Loaded:
    """Every usable run under ``paths``; a run left out gets one warning line naming it and why.

    By default only complete runs are used. With ``include_unfinished``, runs
    that are running, interrupted, failed or diverged are used too, as long as
    they finished at least one epoch.
    """
    loaded = Loaded()
    for path in find_runs(paths):
        try:
            run = load_run(path)
        except RunSkipped as e:
            loaded.warnings.append(f"skipped {path}: {e}")
            continue
        status = run.summary["status"]
        if status != COMPLETE and not include_unfinished:
            loaded.warnings.append(f"skipped {path}: status is {status!r}, not complete (--include-unfinished uses it)")
            continue
        if not run.summary.get("epochs_done") or "best_test_error" not in run.summary:
            loaded.warnings.append(f"skipped {path}: status {status!r} with no finished epoch")
            continue
        loaded.runs.append(run)
    _name_runs(loaded.runs)
    return loaded


def _name_runs(runs: list[Run]) -> None:
    """Name each run by its path relative to the folder all of them share (unique, and short)."""
    if not runs:
        return
    resolved = [r.path.resolve() for r in runs]
    common = Path(*_common_parts([p.parent.parts for p in resolved]))
    for run, path in zip(runs, resolved):
        run.name = path.relative_to(common).as_posix()


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    shortest = min(parts, key=len)
    for i, part in enumerate(shortest):
        if any(p[i] != part for p in parts):
            return shortest[:i]
    return shortest


def select(runs: list[Run], *, methods=(), models=(), datasets=(), ks=(), engines=(), epochs=()) -> list[Run]:
    """The runs matching every filter given (an empty filter keeps everything)."""
    return [
        r for r in runs
        if (not methods or r.method in methods or r.method_label in methods)
        and (not models or r.settings["model"] in models)
        and (not datasets or r.settings["dataset"] in datasets)
        and (not ks or r.k in ks)
        and (not engines or r.engine in engines)
        and (not epochs or r.settings.get("epochs") in epochs)
    ]


def distinguish(runs: list[Run]) -> None:
    """Set each run's ``differs``: the settings in which runs of its method label, model, data set and K differ.

    Runs that differ in more than the seed (engine, epochs, batch size, learning
    rate, ...) are different experiments: their labels now say how, so every
    table and figure shows them as separate rows instead of averaging them.
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.method_label + run.layout_label, run.settings["model"], run.settings["dataset"], run.k)
        groups.setdefault(key, []).append(run)
    for group in groups.values():
        settings = [r.comparable_settings() for r in group]
        keys = sorted({k for s in settings for k in s if any(t.get(k) != s.get(k) for t in settings)})
        for run, s in zip(group, settings):
            run.differs = {k: s.get(k) for k in keys}


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _text(value) -> str:
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _ids(run: Run) -> dict:
    s = run.settings
    return {"run": run.name, "label": run.label, "method_label": run.method_label, "method": run.method,
            "model": s["model"],
            "dataset": s["dataset"], "k": run.k, "seed": s["seed"]}


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: what it was, how it ended, how fast it went, where it came from."""
    rows = []
    task_columns = dict.fromkeys(tasks.run_columns())  # every task's columns, None unless the run's task fills them
    for run in runs:
        s, summ = run.settings, run.summary
        done = summ.get("epochs_done") or 0
        train_seconds = summ.get("train_seconds")
        facts = run.facts
        kind = run.task_object
        rows.append({
            **_ids(run),
            "family": facts["family"],
            "table_order": facts["table_order"],
            "reference": facts["reference"],
            # for the run's own K and options (recorded with the run); see Run.facts for older runs
            "ideal_speedup": facts["ideal_speedup"],
            "engine": run.engine,
            # N devices (the "k" column: --gpus) as K modules × D replicas
            "modules": run.layout[0],
            "replicas": run.layout[1],
            "batch_size": s.get("batch_size"),
            "lr": s.get("lr"),
            "lr_schedule": s.get("lr_schedule"),
            "epochs": s.get("epochs"),
            "epochs_done": done,
            "status": summ["status"],
            "best_test_error": summ.get("best_test_error"),
            "best_epoch": summ.get("best_epoch"),
            "final_test_error": 1 - summ["final_test_acc"] if summ.get("final_test_acc") is not None else None,
            "final_train_loss": summ.get("final_train_loss"),
            # the data set's task (dbench.task); the columns of every task's own figures follow, filled by
            # the run's task (None in the others')
            "task": kind.kind,
            "best_test_acc": summ.get("best_test_acc"),
            "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / done if train_seconds is not None and done else None,
            "samples_per_s": summ.get("samples_per_s"),
            # mean over epochs of the machine's 1-minute load average at each epoch's end (None: not recorded)
            "load_avg": _mean([r.get("load_avg_1m") for r in run.epoch_rows]),
            "cpu_count": next((r["cpu_count"] for r in run.epoch_rows if r.get("cpu_count")), None),
            "mean_sigma": summ.get("mean_sigma"),
            "sigma_corrected": summ.get("sigma_corrected"),
            "num_params": run.config.get("num_params"),
            "devices": ",".join(run.config.get("devices") or []),
            # K modules on one GPU time-share it (dbench.report.speed: not a parallel measurement)
            "shared_gpu": _shares_a_gpu(run.config.get("devices") or []),
            "partition": " ".join(f"[{a},{b})" for a, b in run.config.get("partition") or []),
            "settings": _settings_key(run),
            "git_revision": run.git_revision,
            "git_dirty": run.git_dirty,
            "torch": run.environment.get("torch"),
            "host": run.environment.get("host"),
            "time_utc": run.environment.get("time_utc"),
            "path": str(run.path),
            **task_columns, **kind.run_fields(summ, tasks.spec_of(run.task)),
        })
    frame = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS)
    if rows:
        frame["ideal_speedup"] = frame["ideal_speedup"].astype(float)  # None → NaN, also when every run lacks one
        frame["reference"] = frame["reference"].astype(bool)
    return frame


def _settings_key(run: Run) -> str:
    """The settings that make runs comparable (everything but the seed and where things live), as text."""
    return json.dumps(run.comparable_settings(), sort_keys=True)


def epochs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run and epoch; ``wall_seconds`` is the training time up to the end of that epoch."""
    rows = []
    task_columns = dict.fromkeys(tasks.epoch_columns())
    for run in runs:
        wall = 0.0
        kind = run.task_object
        for r in run.epoch_rows:
            wall += r.get("train_seconds") or 0.0
            rows.append({
                **_ids(run),
                "engine": run.engine,
                "task": kind.kind,
                "epoch": r["epoch"],
                "lr": r.get("lr"),
                "train_loss": r.get("train_loss"),
                "train_acc": r.get("train_acc"),
                "test_loss": r.get("test_loss"),
                "test_acc": r.get("test_acc"),
                "test_error": 1 - r["test_acc"] if r.get("test_acc") is not None else None,
                "train_seconds": r.get("train_seconds"),
                "wall_seconds": wall,
                "eval_seconds": r.get("eval_seconds"),
                "samples_per_s": r.get("samples_per_s"),
                # every task's per-epoch figures, filled by the run's task (a language model's bits per byte)
                **task_columns, **kind.epoch_fields(r),
            })
    return pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + ["epoch"])


MODULE_TIMES = tuple(f"{state}_s" for state in summaries.STATES)
CUDA_PEAKS = summaries.CUDA_PEAKS
BYTES_PREFIX = "bytes_"  # modules_frame's memory categories: bytes_parameters, bytes_stored_inputs, ...


def modules_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run, epoch and module: seconds per state, peak memory, and its categories (``bytes_*``).

    A category a run does not have (a method that stores no inputs) is 0 there.
    """
    rows = []
    for run in runs:
        for r in run.epoch_rows:
            for m in r.get("modules") or []:
                row = {**_ids(run), "engine": run.engine, "epoch": r["epoch"], "module": m["module"],
                       "device": m.get("device")}
                for name in MODULE_TIMES:
                    row[name] = m.get(name)
                row["accounted_peak_bytes"] = m.get("accounted_peak_bytes")
                for name in CUDA_PEAKS:
                    if name in m:
                        row[name] = m[name]
                for category, value in (m.get("accounted_bytes") or {}).items():
                    row[BYTES_PREFIX + category] = value
                rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + ["epoch", "module"])
    categories = memory_categories(frame)
    frame[categories] = frame[categories].fillna(0)
    return frame


def memory_categories(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(BYTES_PREFIX)]


def module_peaks(runs: list[Run]) -> pd.DataFrame:
    """One row per run and module: its peak memory over all epochs, by dbench.summary.module_peak.

    The accounted peak with its categories at that moment (``bytes_*``, 0 for a
    category the run does not have) and the CUDA peaks: what summary.json's
    per-module records hold, taken from the epoch rows so that it also works
    for runs whose summary predates them. Runs without per-module data have no row.
    """
    rows = []
    for run in runs:
        per_module: dict[int, list[dict]] = {}
        for r in run.epoch_rows:
            for m in r.get("modules") or []:
                per_module.setdefault(m["module"], []).append(m)
        for module, records in sorted(per_module.items()):
            peak = summaries.module_peak(records)
            row = {**_ids(run), "engine": run.engine, "module": module, "device": records[0].get("device"),
                   "accounted_peak_bytes": peak["accounted_peak_bytes"]}
            for name in CUDA_PEAKS:
                if name in peak:
                    row[name] = peak[name]
            for category, value in peak["accounted_bytes"].items():
                row[BYTES_PREFIX + category] = value
            rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + ["module"])
    categories = memory_categories(frame)
    frame[categories] = frame[categories].fillna(0)
    return frame


def probes_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run, σ probe and part (each module, and the whole network with ``module`` NA).

    ``dot``, ``cross`` are the probe's sums <∇f, g> and <∇_A, ∇_B>: pooled over
    probes (dbench.summary.pooled_sigma), Σdot / Σcross is the corrected σ the
    summary reports. σ, dot and cross are NA for a module still in its warm-up at
    that probe: it made no update, so the pooling leaves it out.
    """
    rows = []
    for run in runs:
        for p in run.probe_rows:
            base = {**_ids(run), "epoch": p.get("epoch"), "step": p.get("step"), "iteration": p.get("iteration")}
            sums = p.get("sums") or []
            for i, m in enumerate(p.get("modules") or []):
                dot, _, cross, _ = sums[i] if i < len(sums) else (None, None, None, None)
                updated = m.get("sigma") is not None
                rows.append({**base, "part": f"module {m['module']}", "module": m["module"],
                             "sigma": m.get("sigma"), "sigma_corrected": m.get("sigma_corrected"),
                             "cosine": m.get("cosine"), "true_grad_norm": m.get("true_grad_norm"),
                             "method_grad_norm": m.get("method_grad_norm"),
                             # a module in warm-up made no update: its sums say nothing about its direction
                             "dot": dot if updated else None, "cross": cross if updated else None})
            if "sigma" in p:
                totals = [sum(col) for col in zip(*sums)] if sums else [None] * 4
                rows.append({**base, "part": "network", "module": None, "sigma": p.get("sigma"),
                             "sigma_corrected": p.get("sigma_corrected"), "cosine": p.get("cosine"),
                             "true_grad_norm": None, "method_grad_norm": None,
                             "dot": totals[0], "cross": totals[2]})
    frame = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + ["epoch", "part", "module", "sigma"])
    frame["module"] = frame["module"].astype("Int64")
    for name in ("sigma", "sigma_corrected", "cosine", "dot", "cross"):
        if name in frame.columns:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")  # None → NaN
    return frame


def _shares_a_gpu(devices: list[str]) -> bool:
    """Whether two modules of a run sat on one CUDA device (CPU modules each have cores of their own)."""
    gpus = [d if ":" in d else f"{d}:0" for d in devices if d.startswith("cuda")]
    return len(set(gpus)) < len(gpus)
