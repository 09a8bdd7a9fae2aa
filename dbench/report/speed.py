"""Speed: seconds per epoch and speedup over the reference method at the same model, data set, K, engine and batch size.

The reference of a group is the method whose facts say ``reference``
(model-parallel BP among the built-in methods; dbench.method.Stage). Two
measured speedups, both the reference's cost divided by the method's:
- from seconds per epoch (train_seconds / epochs: everything the epoch's training took,
  σ probes and the first steps included);
- from samples/s (the first ``warmup_steps`` steps of each epoch and the σ probes
  left out, as benchmarks/speedup.py does).
Beside them, the ideal from the cost model of docs/ALGORITHMS.md, as each run
recorded it for its method, K and options (Stage.ideal_speedup).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dbench.report import figures, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

GROUP = ["model", "dataset", "k", "engine", "batch_size"]
REFERENCE = "the reference method"  # said where a group has no reference run, or the report several

LOCAL_NOTE = ("Local engine: the K modules run one after another in one process, so its ratios compare total "
              "compute per epoch (a method that computes more per step than the reference takes longer), not "
              "parallel speedup. Measure speedup with `dbench run --engine distributed` runs.")
DISTRIBUTED_NOTE = "Distributed engine: one process per module, working at the same time; these are parallel speedups."


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, data set, K, engine, batch size, method): mean s/epoch and samples/s, speedups, ideal.

    ``baseline`` names the group's reference run (NaN where it has none, and
    then the speedups are NaN too).
    """
    means = table.groupby([*GROUP, "label", "method"], sort=True).agg(
        seeds=("seed", "nunique"), seconds_per_epoch=("seconds_per_epoch", "mean"),
        samples_per_s=("samples_per_s", "mean"), table_order=("table_order", "first"),
        reference=("reference", "first"),
        # facts are recorded per run for its K and options, which the label and K fix: the same for every seed
        ideal_speedup=("ideal_speedup", "first"),
    ).reset_index()
    base = baselines(means)
    at = pd.MultiIndex.from_frame(means[GROUP])
    means["baseline"] = base["label"].reindex(at).to_numpy()
    means["speedup_epoch_time"] = base["seconds_per_epoch"].reindex(at).to_numpy() / means["seconds_per_epoch"]
    means["speedup_samples_per_s"] = means["samples_per_s"] / base["samples_per_s"].reindex(at).to_numpy()
    return means.drop(columns=["method", "table_order", "reference"]).rename(columns={"label": "method"})


def baselines(means: pd.DataFrame) -> pd.DataFrame:
    """Per group, the row of its reference method: of several such labels, the one run with the method's
    default options (then the first in table order)."""
    ref = means[means["reference"].astype(bool)]
    ref = ref.assign(_options=ref["label"] != ref["method"]).sort_values([*GROUP, "_options", "table_order", "label"])
    return ref.drop_duplicates(GROUP).set_index(GROUP)


def reference_name(numbers: pd.DataFrame) -> str:
    """The baseline's label when every group has the same one, else a generic name."""
    names = set(numbers["baseline"].dropna())
    return names.pop() if len(names) == 1 and numbers["baseline"].notna().all() else REFERENCE


def build(data: ReportData, out: Path) -> Section:
    section = Section("speed", "Speed", "Seconds per training epoch and speedup over the reference method "
                                        "(model-parallel BP for the built-in methods) at equal model, data set, "
                                        "K, engine and batch size, beside the ideal of ALGORITHMS.md's cost model.")
    numbers = summarize(data.table)
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values([*GROUP, "_o"]).drop(columns="_o")
    reference = reference_name(numbers)
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
    missing = numbers.groupby(GROUP)["baseline"].apply(lambda b: b.isna().all())
    if missing.any():
        notes.append(f"{int(missing.sum())} setting(s) have no run of a reference method (one whose facts say "
                     f"reference): their speedups are {tables.DASH}.")
    section.notes.extend(notes)
    section.items.append(tables.write(
        out, "speed/speed", title=f"Seconds per epoch and speedup over {reference}", shown=shown, numbers=numbers,
        runs=data.table["run"],
        caption=(f"Means over seeds. speedup (s/epoch): {reference}'s training seconds per epoch over the method's "
                 f"(σ probes included); speedup (samples/s): the method's rate over {reference}'s (warm-up steps and "
                 "σ probes left out); ideal: ALGORITHMS.md's cost model for the method at that K with the options it "
                 f"ran with, as the run recorded it{_no_ideal(numbers)}. " + " ".join(notes)),
    ))
    for keys, group in numbers.groupby(["model", "dataset", "engine", "batch_size"], sort=True):
        if group["speedup_epoch_time"].notna().any():
            runs = data.table.merge(group[["model", "dataset", "engine", "batch_size"]].drop_duplicates())["run"]
            section.items.append(_figure(group, keys, data, reference_name(group), runs, out))
    return section


def _no_ideal(numbers: pd.DataFrame) -> str:
    """Which methods have no ideal: the cost model has no closed form for them (or an older run recorded none)."""
    without = list(dict.fromkeys(numbers["method"][numbers["ideal_speedup"].isna()]))
    if not without:
        return ""
    return f"; {tables.DASH} where it has no closed form or the run recorded none ({', '.join(without)})"


def _figure(group: pd.DataFrame, keys, data: ReportData, reference: str, runs, out: Path) -> figures.Figure:
    """x: K; one bar per method (measured, from seconds per epoch), a black tick at its ideal."""
    model, dataset, engine, batch = keys
    colors = data.colors
    ks = sorted(group["k"].unique())
    labels = data.order_labels(group["method"])
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
        ax.set_ylabel(f"speedup over {reference} (×)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(f"Speedup over {reference}: {model} · {dataset} · {engine} engine · batch {batch}")
        if engine == "local":  # the figure may be pasted without its caption
            ax.set_title("local engine: the modules run in turn, so this is not a parallel speedup",
                         fontsize="small", fontweight="normal", style="italic")
        caption = f"Bars: {reference}'s seconds per epoch over the method's, mean over seeds; black ticks: the ideal."
        if engine == "local":
            caption += " " + LOCAL_NOTE
        return save(fig, out, "speed/" + figures.file_stem(model, dataset, engine, f"b{batch}"),
                    title=f"Speedup over {reference}: {model}, {dataset}, {engine} engine, batch {batch}",
                    caption=caption, runs=runs)
