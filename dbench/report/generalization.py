"""Generalization: best test error (%) per method, model, data set and K, mean ± std over seeds.

The FR paper's Table 2 reports the best test error of each method; this is
that table for the runs given. The CSV has the exact numbers (long form, one
row per cell); the Markdown and LaTeX files have the paper's layout, one
column per method, the lowest mean of each row in bold.

Each task (dbench.task) has its own table, of its own quality: a language
model (byte-level text) is judged by its test loss, so its table
(``generalization-lm``) shows the best test loss in bits per byte (the lowest
epoch's), with the next-token accuracy at that epoch in the CSV. A data set is
one task, so a report of several tasks has one table per task rather than one
table with half its cells empty.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dbench import task as tasks
from dbench.report import tables
from dbench.report.section import ReportData, Section

ROW = ["model", "dataset", "k"]
STEM = "generalization/generalization"  # and the task's suffix


def summarize(table: pd.DataFrame, task: tasks.Task | None = None) -> pd.DataFrame:
    """One row per (model, data set, K, method) of ``task``'s runs (default: the default task's): seeds, runs,
    mean and std (sample, ddof=1) of its quality (a classification's best test error in %, a language model's
    best test bits per byte), the mean of its extras (final test error %; next-token accuracy % and final test
    bpb), the mean best epoch and the epochs."""
    task = task or tasks.default()
    q = task.quality
    scaled = table.assign(**{m.stem: table[m.column].astype(float) * m.scale
                             for m in (q, *task.generalization_extras)})
    out = scaled.groupby([*ROW, "label"], sort=True).agg(
        seeds=("seed", "nunique"),
        runs=("run", "count"),
        **{f"{q.stem}_mean": (q.stem, "mean"),
           f"{q.stem}_std": (q.stem, "std")},  # NaN for one run: no spread to report
        best_epoch_mean=("best_epoch", "mean"),
        **{f"{m.stem}_mean": (m.stem, "mean") for m in task.generalization_extras},
        epochs=("epochs_done", "max"),
    ).reset_index()
    return out.rename(columns={"label": "method"})


def build(data: ReportData, out: Path) -> Section:
    parts = tasks.split(data.table)
    intro = " ".join(["Best test error (%) over the epochs of each run: mean ± standard deviation over seeds.",
                      *(task.generalization_intro for task, _ in parts if task.generalization_intro)])
    section = Section("generalization", "Generalization", intro)
    for task, table in parts:
        section.items.append(_table(data, table, task, out))
    return section


def _table(data: ReportData, table: pd.DataFrame, task: tasks.Task, out: Path) -> tables.Table:
    numbers = summarize(table, task)
    quality, digits = task.quality.stem, task.quality.digits
    methods = data.order_labels(numbers["method"])
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values([*ROW, "_o"]).drop(columns="_o")
    rows = []
    for (model, dataset, k), group in numbers.groupby(ROW, sort=True):
        cells = {r.method: tables.mean_std(getattr(r, f"{quality}_mean"), getattr(r, f"{quality}_std"), r.runs,
                                           digits)
                 for r in group.itertuples()}
        if len(cells) > 1 and group[f"{quality}_mean"].notna().any():  # bold the lowest mean, as papers do
            best = group.loc[group[f"{quality}_mean"].idxmin(), "method"]
            cells[best] = f"**{cells[best]}**"
        rows.append({"model": model, "data set": dataset, "K": k, **{m: cells.get(m, tables.DASH) for m in methods}})
    shown = pd.DataFrame(rows)
    counts = sorted(set(numbers["runs"]))
    stem = STEM + task.suffix
    csv = f"{Path(stem).name}.csv"
    if counts == [1]:  # a standard deviation over one seed does not exist: say so rather than "± over 1 seed"
        spread = "One run per cell, so no spread is shown: run more seeds for a standard deviation"
    elif len(counts) == 1:
        spread = f"Mean ± sample standard deviation over {counts[0]} seeds"
    else:
        spread = (f"Mean ± sample standard deviation over the seeds of each cell ({', '.join(map(str, counts))}; "
                  f"see the runs column of {csv}); a cell of one run has no spread")
    caption = f"{spread}; bold: lowest mean in the row; {tables.DASH}: no run. {task.generalization_caption(csv)}"
    return tables.write(out, stem, title=task.generalization_title, shown=shown, numbers=numbers, runs=table["run"],
                        caption=caption)
