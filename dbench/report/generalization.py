"""Generalization: best test error (%) per method, model, data set and K, mean ± std over seeds.

The FR paper's Table 2 reports the best test error of each method; this is
that table for the runs given. The CSV has the exact numbers (long form, one
row per cell); the Markdown and LaTeX files have the paper's layout, one
column per method, the lowest mean of each row in bold.

A language model (byte-level text) is judged by its test loss: its table
(``generalization-lm``) shows the best test loss in bits per byte (the lowest
epoch's), with the next-token accuracy at that epoch in the CSV. A data set is
one task, so a report of both kinds has one table per kind rather than one
table with half its cells empty.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dbench.report import tables
from dbench.report.section import ReportData, Section
from dbench.summary import CLASSIFICATION, LANGUAGE_MODEL

ROW = ["model", "dataset", "k"]
BPB_DIGITS = 3  # as the verdict shows bits per byte
STEMS = {CLASSIFICATION: "generalization/generalization", LANGUAGE_MODEL: "generalization/generalization-lm"}
TITLES = {CLASSIFICATION: "Best test error (%)", LANGUAGE_MODEL: "Best test loss (bits per byte): language models"}


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


def summarize_lm(table: pd.DataFrame) -> pd.DataFrame:
    """A language model's cells: one row per (model, data set, K, method): seeds, mean and std of the best test
    loss in bits per byte, the next-token accuracy (%) at the best epoch, and the final test loss (bpb)."""
    lm = table.assign(best_test_bpb=table["best_test_bpb"].astype(float),
                      final_test_bpb=table["final_test_bpb"].astype(float),
                      best_next_token_acc_pct=(1 - table["best_test_error"].astype(float)) * 100)
    out = lm.groupby([*ROW, "label"], sort=True).agg(
        seeds=("seed", "nunique"),
        runs=("run", "count"),
        best_test_bpb_mean=("best_test_bpb", "mean"),
        best_test_bpb_std=("best_test_bpb", "std"),  # NaN for one run: no spread to report
        best_next_token_acc_mean=("best_next_token_acc_pct", "mean"),
        best_epoch_mean=("best_epoch", "mean"),
        final_test_bpb_mean=("final_test_bpb", "mean"),
        epochs=("epochs_done", "max"),
    ).reset_index()
    return out.rename(columns={"label": "method"})


def by_kind(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs table split by task (classification first); a table without a task column is classifications."""
    if "task" not in table.columns:
        return [(CLASSIFICATION, table)]
    return [(kind, table[table["task"] == kind]) for kind in (CLASSIFICATION, LANGUAGE_MODEL)
            if (table["task"] == kind).any()]


def build(data: ReportData, out: Path) -> Section:
    kinds = by_kind(data.table)
    intro = "Best test error (%) over the epochs of each run: mean ± standard deviation over seeds."
    if any(kind == LANGUAGE_MODEL for kind, _ in kinds):
        intro += (" Language models (byte-level text): the best (lowest) test loss in bits per byte instead, "
                  "in a table of their own.")
    section = Section("generalization", "Generalization", intro)
    for kind, table in kinds:
        section.items.append(_table(data, table, kind, out))
    return section


def _table(data: ReportData, table: pd.DataFrame, kind: str, out: Path) -> tables.Table:
    lm = kind == LANGUAGE_MODEL
    numbers = summarize_lm(table) if lm else summarize(table)
    quality = "best_test_bpb" if lm else "best_test_error"
    digits = BPB_DIGITS if lm else 2
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
    csv = f"{Path(STEMS[kind]).name}.csv"
    if counts == [1]:  # a standard deviation over one seed does not exist: say so rather than "± over 1 seed"
        spread = "One run per cell, so no spread is shown: run more seeds for a standard deviation"
    elif len(counts) == 1:
        spread = f"Mean ± sample standard deviation over {counts[0]} seeds"
    else:
        spread = (f"Mean ± sample standard deviation over the seeds of each cell ({', '.join(map(str, counts))}; "
                  f"see the runs column of {csv}); a cell of one run has no spread")
    if lm:
        caption = (f"{spread}; bold: lowest mean in the row; {tables.DASH}: no run. Each run's best epoch: its "
                   "lowest test loss, in bits per byte (the mean cross-entropy per byte in nats / ln 2; lower is "
                   f"better); {csv} also has the next-token accuracy at that epoch (best_next_token_acc_mean, %).")
    else:
        caption = (f"{spread}; bold: lowest mean in the row; {tables.DASH}: no run. Each run's best epoch, as in the "
                   "FR paper's Table 2.")
    return tables.write(out, STEMS[kind], title=TITLES[kind], shown=shown, numbers=numbers, runs=table["run"],
                        caption=caption)
