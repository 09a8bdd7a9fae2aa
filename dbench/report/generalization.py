"""Generalization: best test error (%) per method, model, data set and K, mean ± std over seeds.

The FR paper's Table 2 reports the best test error of each method; this is
that table for the runs given. The CSV has the exact numbers (long form, one
row per cell); the Markdown and LaTeX files have the paper's layout, one
column per method, the lowest mean of each row in bold.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dbench.report import tables
from dbench.report.section import ReportData, Section

ROW = ["model", "dataset", "k"]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, data set, K, method): seeds, mean and std (sample, ddof=1) of best test error in %."""
    pct = table.assign(best_test_error_pct=table["best_test_error"] * 100,
                       final_test_error_pct=table["final_test_error"] * 100)
    out = pct.groupby([*ROW, "label"], sort=True).agg(
        seeds=("seed", "nunique"),
        runs=("run", "count"),
        best_test_error_mean=("best_test_error_pct", "mean"),
        best_test_error_std=("best_test_error_pct", "std"),  # NaN for one run: no spread to report
        best_epoch_mean=("best_epoch", "mean"),
        final_test_error_mean=("final_test_error_pct", "mean"),
        epochs=("epochs_done", "max"),
    ).reset_index()
    return out.rename(columns={"label": "method"})


def build(data: ReportData, out: Path) -> Section:
    section = Section("generalization", "Generalization",
                      "Best test error (%) over the epochs of each run: mean ± standard deviation over seeds.")
    numbers = summarize(data.table)
    methods = data.order_labels(numbers["method"])
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values([*ROW, "_o"]).drop(columns="_o")
    rows = []
    for (model, dataset, k), group in numbers.groupby(ROW, sort=True):
        cells = {r.method: tables.mean_std(r.best_test_error_mean, r.best_test_error_std, r.runs)
                 for r in group.itertuples()}
        if len(cells) > 1:  # bold the lowest mean, as papers do
            best = group.loc[group["best_test_error_mean"].idxmin(), "method"]
            cells[best] = f"**{cells[best]}**"
        rows.append({"model": model, "data set": dataset, "K": k, **{m: cells.get(m, tables.DASH) for m in methods}})
    shown = pd.DataFrame(rows)
    counts = sorted(set(numbers["runs"]))
    if counts == [1]:  # a standard deviation over one seed does not exist: say so rather than "± over 1 seed"
        spread = "One run per cell, so no spread is shown: run more seeds for a standard deviation"
    elif len(counts) == 1:
        spread = f"Mean ± sample standard deviation over {counts[0]} seeds"
    else:
        spread = (f"Mean ± sample standard deviation over the seeds of each cell ({', '.join(map(str, counts))}; "
                  "see the runs column of generalization.csv); a cell of one run has no spread")
    section.items.append(tables.write(
        out, "generalization/generalization", title="Best test error (%)", shown=shown, numbers=numbers,
        runs=data.table["run"],
        caption=f"{spread}; bold: lowest mean in the row; {tables.DASH}: no run. Each run's best epoch, as in the "
                "FR paper's Table 2.",
    ))
    return section
