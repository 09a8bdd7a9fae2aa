"""Speed: seconds per epoch and speedup over BP at the same model, data set, K, engine and batch size.

Two measured speedups, both BP's cost divided by the method's:
- from seconds per epoch (train_seconds / epochs: everything the epoch's training took,
  σ probes and the first steps included);
- from samples/s (the first ``warmup_steps`` steps of each epoch and the σ probes
  left out, as benchmarks/speedup.py does).
Beside them, the ideal from the cost model of docs/ALGORITHMS.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from dbench.report import figures, tables
from dbench.report.figures import new_figure, order_labels, save, theme
from dbench.report.section import ReportData, Section

# Ideal speedup over BP with K balanced modules, from docs/ALGORITHMS.md's cost model (forward F,
# backward 2F, free communication): BP's period 3F; DDG 3F/K; FR 4F/K (a replay forward more below
# module K); DFA and BDFA F + 2F/K. DNI's period (3F + cost of the synthesizers)/K depends on the
# synthesizers' cost, so it has no closed form there and none here. At K=1 every method is BP.
IDEAL_SPEEDUP: dict[str, Callable[[int], float]] = {
    "bp": lambda k: 1.0,
    "fr": lambda k: 3 * k / 4,
    "ddg": lambda k: float(k),
    "dfa": lambda k: 3 * k / (k + 2),
    "bdfa": lambda k: 3 * k / (k + 2),
}

BASELINE = "bp"
GROUP = ["model", "dataset", "k", "engine", "batch_size"]

LOCAL_NOTE = ("Local engine: the K modules run one after another in one process, so its ratios compare total "
              "compute per epoch (an FR epoch computes more than BP's), not parallel speedup. Measure speedup "
              "with `dbench run --engine distributed` runs.")
DISTRIBUTED_NOTE = "Distributed engine: one process per module, working at the same time; these are parallel speedups."


def ideal(method: str, k: int) -> float | None:
    """The cost model's speedup of ``method`` over BP at K modules, or None where it has no closed form."""
    if k == 1:
        return 1.0
    rule = IDEAL_SPEEDUP.get(method)
    return rule(k) if rule else None


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, data set, K, engine, batch size, method): mean s/epoch and samples/s, speedups, ideal."""
    means = table.groupby([*GROUP, "label", "method"], sort=True).agg(
        seeds=("seed", "nunique"), seconds_per_epoch=("seconds_per_epoch", "mean"),
        samples_per_s=("samples_per_s", "mean"),
    ).reset_index()
    base = means[means["label"] == BASELINE].set_index(GROUP)
    at = pd.MultiIndex.from_frame(means[GROUP])
    bp_seconds = base["seconds_per_epoch"].reindex(at).to_numpy()
    bp_rate = base["samples_per_s"].reindex(at).to_numpy()
    means["speedup_epoch_time"] = bp_seconds / means["seconds_per_epoch"]
    means["speedup_samples_per_s"] = means["samples_per_s"] / bp_rate
    # an option changes the method's cost, so only a method run with its defaults gets the ideal
    means["ideal_speedup"] = [ideal(r.method, r.k) if r.label == r.method else None for r in means.itertuples()]
    return means.drop(columns="method").rename(columns={"label": "method"})


def build(data: ReportData, out: Path) -> Section:
    section = Section("speed", "Speed", "Seconds per training epoch and speedup over BP at equal model, data set, "
                                        "K, engine and batch size, beside the ideal of ALGORITHMS.md's cost model.")
    numbers = summarize(data.table)
    order = {m: i for i, m in enumerate(order_labels(numbers["method"]))}
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values([*GROUP, "_o"]).drop(columns="_o")
    shown = pd.DataFrame({
        "model": numbers["model"], "data set": numbers["dataset"], "K": numbers["k"], "engine": numbers["engine"],
        "batch": numbers["batch_size"], "method": numbers["method"], "seeds": numbers["seeds"],
        "s/epoch": numbers["seconds_per_epoch"].map(tables.num),
        "samples/s": numbers["samples_per_s"].map(lambda v: tables.num(v, 0)),
        "speedup (s/epoch)": numbers["speedup_epoch_time"].map(tables.num),
        "speedup (samples/s)": numbers["speedup_samples_per_s"].map(tables.num),
        "ideal": numbers["ideal_speedup"].map(tables.num),
    })
    engines = set(numbers["engine"])
    notes = [n for e, n in (("local", LOCAL_NOTE), ("distributed", DISTRIBUTED_NOTE)) if e in engines]
    missing = numbers.groupby(GROUP)["method"].apply(lambda m: BASELINE not in set(m))
    if missing.any():
        notes.append(f"{int(missing.sum())} setting(s) have no {BASELINE} run: their speedups are {tables.DASH}.")
    section.notes.extend(notes)
    section.items.append(tables.write(
        out, "speed/speed", title="Seconds per epoch and speedup over BP", shown=shown, numbers=numbers,
        runs=data.table["run"],
        caption=("Means over seeds. speedup (s/epoch): BP's training seconds per epoch over the method's (σ probes "
                 "included); speedup (samples/s): the method's rate over BP's (warm-up steps and σ probes left out); "
                 f"ideal: ALGORITHMS.md's cost model, {tables.DASH} where it has no closed form (DNI, cDNI). "
                 + " ".join(notes)),
    ))
    for keys, group in numbers.groupby(["model", "dataset", "engine", "batch_size"], sort=True):
        if group["speedup_epoch_time"].notna().any():
            runs = data.table.merge(group[["model", "dataset", "engine", "batch_size"]].drop_duplicates())["run"]
            section.items.append(_figure(group, keys, data.colors, runs, out))
    return section


def _figure(group: pd.DataFrame, keys, colors, runs, out: Path) -> figures.Figure:
    """x: K; one bar per method (measured, from seconds per epoch), a black tick at its ideal."""
    model, dataset, engine, batch = keys
    ks = sorted(group["k"].unique())
    labels = order_labels(group["method"])
    width = 0.8 / len(labels)
    with theme():
        fig = new_figure(max(7.5, 2.5 + 0.45 * len(ks) * len(labels)), 4.0)
        ax = fig.subplots()
        ideal_drawn = False
        for i, label in enumerate(labels):
            rows = group[group["method"] == label].set_index("k").reindex(ks)
            x = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(ks))]
            ax.bar(x, rows["speedup_epoch_time"], width=width, color=colors[label], label=label)
            for xi, value in zip(x, rows["ideal_speedup"]):
                if pd.notna(value):
                    ax.hlines(value, xi - width / 2, xi + width / 2, color="black", linewidth=2.5, zorder=3,
                              label=None if ideal_drawn else "ideal (ALGORITHMS.md)")
                    ideal_drawn = True
        ax.axhline(1.0, color="0.45", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(ks)), labels=[f"K={k}" for k in ks])
        ax.set_ylabel("speedup over BP (×)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(f"Speedup over BP: {model} · {dataset} · {engine} engine · batch {batch}")
        if engine == "local":  # the figure may be pasted without its caption
            ax.set_title("local engine: the modules run in turn, so this is not a parallel speedup",
                         fontsize="small", fontweight="normal", style="italic")
        caption = "Bars: BP's seconds per epoch over the method's, mean over seeds; black ticks: the ideal."
        if engine == "local":
            caption += " " + LOCAL_NOTE
        return save(fig, out, "speed/" + figures.file_stem(model, dataset, engine, f"b{batch}"),
                    title=f"Speedup over BP: {model}, {dataset}, {engine} engine, batch {batch}",
                    caption=caption, runs=runs)
