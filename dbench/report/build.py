"""Build a report: read the runs, keep those the filters select, write every section and the index."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from dbench import projection, results
from dbench.errors import DbenchError
from dbench.record import writable_folder
from dbench.report import convergence, generalization, index, memory, projected, sigma, speed, verdict
from dbench.report.section import ReportData, Section

# The order of the index: the verdict first, as it answers the question the other sections detail.
SECTIONS = (verdict, convergence, memory, generalization, sigma, speed)


@dataclass
class Report:
    out: Path
    index_md: Path
    index_html: Path
    runs: list[results.Run]
    sections: list[Section]
    warnings: list[str]


def build_report(paths: Iterable[Path | str], out: Path | str, *, methods: Iterable[str] = (),
                 models: Iterable[str] = (), datasets: Iterable[str] = (), ks: Iterable[int] = (),
                 engines: Iterable[str] = (), epochs: Iterable[int] = (),
                 include_unfinished: bool = False, targets: dict | None = None,
                 warn: Callable[[str], None] | None = None, link: str | None = None,
                 device_memory: float | None = None, **given: float | None) -> Report:
    """Write the report of the runs under ``paths`` into ``out``.

    ``targets`` (or keywords, one per task: ``target_acc``, ``target_loss``, see dbench.task.Target) are
    what the verdict's time to target is measured to: ``target_acc`` the test accuracy of a classification
    (default: 99% of model-parallel BP's mean best accuracy in each comparison), ``target_loss`` the test
    loss in bits per byte of a language model (default: 1.01 × BP's mean best bits per byte). ``warn`` is called with each warning (a run
    left out, runs averaged although their settings differ) as soon as it is known, so a caller can show
    them even when no run is left and this raises DbenchError.
    """
    targets = verdict.check_targets(targets, **given)  # before anything is read or written
    profile = projection.link(link) if link is not None else None
    out = Path(out)
    chosen = select_runs(paths, methods=methods, models=models, datasets=datasets, ks=ks, engines=engines,
                         epochs=epochs, include_unfinished=include_unfinished, warn=warn)
    writable_folder(out, "the report's --out")  # before any work: a read-only place fails at once
    # the verdict alone takes an option; every other section is built from the runs alone
    options = {verdict: {"targets": targets}}
    sections = [module.build(chosen.data, out, **options.get(module, {})) for module in SECTIONS]
    if profile is not None:  # asked for: the projected section, after every measured one
        sections.append(projected.build(chosen.data, out, profile, device_memory))
    sources = (f"{len(chosen.data.runs)} run(s) from {', '.join(str(p) for p in chosen.paths)}"
               + (f", selected by {chosen.filters}" if chosen.filters else "")
               + f"; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    md, page = index.write(out, "dbench report", sources, sections, chosen.data, chosen.warnings)
    return Report(out=out, index_md=md, index_html=page, runs=chosen.data.runs, sections=sections,
                  warnings=chosen.warnings)


@dataclass
class Chosen:
    """The runs a report or `dbench compare` shows, read into tables, and what was said about them."""

    paths: list[Path]
    data: ReportData
    warnings: list[str]
    filters: str  # the filters as the command line spells them ("" for none)


def select_runs(paths: Iterable[Path | str], *, methods: Iterable[str] = (), models: Iterable[str] = (),
                datasets: Iterable[str] = (), ks: Iterable[int] = (), engines: Iterable[str] = (),
                epochs: Iterable[int] = (), include_unfinished: bool = False,
                warn: Callable[[str], None] | None = None) -> Chosen:
    """Read the runs under ``paths`` and keep those the filters select; DbenchError (saying why) if none is left.

    ``warn`` is called with each warning as soon as it is known (see build_report).
    """
    paths = [Path(p) for p in paths]
    filters = {"method": list(methods), "model": list(models), "dataset": list(datasets), "k": list(ks),
               "engine": list(engines), "epochs": list(epochs)}
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn:
            warn(message)

    loaded = results.load_runs(paths, include_unfinished=include_unfinished)
    for message in loaded.warnings:
        note(message)
    runs = results.select(loaded.runs, methods=filters["method"], models=filters["model"],
                          datasets=filters["dataset"], ks=filters["k"], engines=filters["engine"],
                          epochs=filters["epochs"])
    if not runs:
        raise DbenchError(_why_no_runs(paths, loaded, filters))
    data = ReportData.of(runs)
    for message in mixed_settings(data.table):
        note(message)
    return Chosen(paths=paths, data=data, warnings=warnings, filters=_filters_text(filters))


def _why_no_runs(paths: list[Path], loaded: results.Loaded, filters: dict) -> str:
    where = ", ".join(str(p) for p in paths)
    if not loaded.runs and not loaded.warnings:
        return (f"no run directories under {where} (a run directory holds config.json and summary.json, "
                "as `dbench run` writes them)")
    if not loaded.runs:
        return f"no usable run under {where}: all {len(loaded.warnings)} run directories were left out (see the warnings)"
    table = results.runs_frame(loaded.runs)
    have = "; ".join(f"{name} {', '.join(str(v) for v in sorted(set(table[col])))}"
                     for name, col in (("methods", "method"), ("models", "model"), ("data sets", "dataset"),
                                       ("K", "k"), ("engines", "engine"), ("epochs", "epochs")))
    return f"no run under {where} matches {_filters_text(filters)}; the {len(loaded.runs)} usable runs have {have}"


def _filters_text(filters: dict) -> str:
    """The filters as the command line spells them: --method bp,mymethod --k 2."""
    return " ".join(f"--{name} {','.join(map(str, values))}" for name, values in filters.items() if values)


def mixed_settings(table: pd.DataFrame) -> list[str]:
    """A warning for each method label/model/data set/K whose runs repeat a seed, or were cut differently.

    (Runs that differ in more than the seed never share a label: results.distinguish
    labels them by what differs, so only repeated seeds can be averaged unawares.)
    """
    out = []
    for (model, dataset, k, label), group in table.groupby(["model", "dataset", "k", "label"], sort=True):
        repeated = sorted(group["seed"][group["seed"].duplicated()].unique())
        if repeated:
            out.append(f"{len(group)} runs of {label} · {model} · {dataset} · K={k} share seed(s) "
                       f"{', '.join(map(str, repeated))}: each is counted as one more sample")
        # A cut chosen by the clock (--split time) can differ between runs of the same settings; for a
        # decoupled method it changes what is computed, so a row that averages them says so.
        cuts = group["partition"].value_counts(sort=False)
        if len(cuts) > 1:
            out.append(f"runs of {label} · {model} · {dataset} · K={k} compared as one row were cut differently: "
                       + "; ".join(f"{cut} ({n} run{'s' if n > 1 else ''})" for cut, n in cuts.items())
                       + " (fix one cut for all with --split from:RUN_DIR)")
    return out
