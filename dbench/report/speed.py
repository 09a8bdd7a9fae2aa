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

from dbench import task as tasks
from dbench.report import figures, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

GROUP = ["model", "dataset", "k", "engine", "batch_size"]
SAME_DEVICES = ["model", "dataset", "batch_size"]  # with K: what a comparison of ways to use K devices holds fixed
REFERENCE = "the reference method"  # said where a group has no reference run, or the report several
EXACT = "exact gradient"  # the family of the exact-gradient baselines (dbench.method.EXACT_GRADIENT)
NOT_PARALLEL = "not a parallel measurement"

LOCAL_NOTE = ("Local engine at K > 1: the K modules run one after another in one process, so its seconds compare "
              "total compute, not parallel time: no speedup is shown for it (" + NOT_PARALLEL + "). Measure speed "
              "with `dbench run --engine distributed` runs.")
DISTRIBUTED_NOTE = "Distributed engine: one process per module (or replica), working at the same time."
SHARED_NOTE = ("Modules that shared one GPU (--devices cuda:0,cuda:0, or `dbench suite --device`) time-share it: "
               "their seconds are costs on that GPU, not parallel time, so no speedup is shown for them ("
               + NOT_PARALLEL + "); benchmarks/breakdown.py says where their time goes.")
EXACT_NOTE = ("Fastest exact baseline: of the exact-gradient ways to use the same devices (the model on one "
              "device, and every method of the exact-gradient family) that were measured for the same model, data set and batch size, the one "
              "with the fewest seconds per epoch; × fastest exact is its seconds per epoch over the method's, beside "
              "the ideal of the two cost models' ratio (one device: the ideal of model-parallel BP, 1).")


def rate_columns() -> dict[str, tuple[str, str]]:
    """Every task's own rates (dbench.task.Task.rates): runs column -> (the speed table's title, caption words)."""
    return {column: (title, words) for task in tasks.every() for column, title, words in task.rates}


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, data set, K, engine, batch size, method): seconds per epoch, samples/s, and speedups.

    - ``speedup_epoch_time``, ``speedup_samples_per_s``: over the group's reference run (model-parallel BP
      for the built-in methods), ``baseline`` naming it; ``ideal_speedup`` beside them.
    - ``fastest_exact``, ``speedup_vs_exact``, ``ideal_vs_exact``: over the fastest exact-gradient baseline
      measured on the same devices (see ``fastest_exact``).
    Rows that are not parallel measurements (the local engine at K > 1) get no speedup (NaN) and
    ``parallel`` False.
    """
    rates = rate_columns()
    # a task's own rate (a language model's tokens/s) is NaN in other tasks' runs, and in tables made without it
    table = table.assign(**{c: table[c].astype(float) if c in table.columns else float("nan") for c in rates})
    if "shared_gpu" not in table.columns:  # a table made without the column (no GPU shared)
        table = table.assign(shared_gpu=False)
    means = table.groupby([*GROUP, "label", "method_label", "method"], sort=True).agg(
        seeds=("seed", "nunique"), seconds_per_epoch=("seconds_per_epoch", "mean"),
        samples_per_s=("samples_per_s", "mean"), table_order=("table_order", "first"),
        # a task's own rates beside samples/s (a language model's samples are sequences: tokens/s)
        **{c: (c, "mean") for c in rates},
        shared_gpu=("shared_gpu", "any"),
        reference=("reference", "first"), family=("family", "first"),
        # facts are recorded per run for its K and options, which the label and K fix: the same for every seed
        ideal_speedup=("ideal_speedup", "first"),
    ).reset_index()
    means["parallel"] = parallel_measurement(means)
    base = baselines(means)
    at = pd.MultiIndex.from_frame(means[GROUP])
    means["baseline"] = base["label"].reindex(at).to_numpy()
    means["speedup_epoch_time"] = base["seconds_per_epoch"].reindex(at).to_numpy() / means["seconds_per_epoch"]
    means["speedup_samples_per_s"] = means["samples_per_s"] / base["samples_per_s"].reindex(at).to_numpy()
    fastest = [fastest_exact(means, row) for row in means.itertuples()]
    means["fastest_exact"] = [f"{f.label} (N={f.k})" if f is not None else None for f in fastest]
    means["speedup_vs_exact"] = [f.seconds_per_epoch / r.seconds_per_epoch if f is not None else float("nan")
                                 for f, r in zip(fastest, means.itertuples())]
    means["ideal_vs_exact"] = [r.ideal_speedup / f.ideal_speedup
                               if f is not None and pd.notna(r.ideal_speedup) and pd.notna(f.ideal_speedup)
                               else float("nan") for f, r in zip(fastest, means.itertuples())]
    for column in ("speedup_epoch_time", "speedup_samples_per_s", "speedup_vs_exact"):
        means[column] = means[column].where(means["parallel"])
    return means.drop(columns=["method", "method_label", "table_order", "reference"]).rename(
        columns={"label": "method"})


def fastest_exact(means: pd.DataFrame, row) -> object | None:
    """The fastest exact-gradient baseline for ``row``'s devices, or None where none was measured.

    Candidates: parallel measurements of an exact-gradient method with the same model, data set and batch
    size, either on the row's K devices (ddp, gpipe, 1f1b; not model-parallel BP, the papers' baseline) or
    on one device (the whole model there, ``--gpus 1``).
    """
    same = (means[SAME_DEVICES] == pd.Series({c: getattr(row, c) for c in SAME_DEVICES})).all(axis=1)
    exact = means["family"].eq(EXACT) & means["parallel"]
    on_k = means["k"].eq(row.k) & ~means["reference"].astype(bool)
    candidates = means[same & exact & (on_k | means["k"].eq(1))]
    candidates = candidates[candidates["seconds_per_epoch"].notna()]
    if candidates.empty:
        return None
    return next(candidates.sort_values(["seconds_per_epoch", "k", "label"]).itertuples())


def baselines(means: pd.DataFrame) -> pd.DataFrame:
    """Per group, the row of its reference method: of several such labels, the one run with the method's
    default options (then the first in table order)."""
    ref = means[means["reference"].astype(bool)]
    ref = ref.assign(_options=ref["method_label"] != ref["method"]).sort_values(
        [*GROUP, "_options", "table_order", "label"])
    return ref.drop_duplicates(GROUP).set_index(GROUP)


def reference_name(numbers: pd.DataFrame) -> str:
    """The baseline's label when every group has the same one, else a generic name."""
    names = set(numbers["baseline"].dropna())
    return names.pop() if len(names) == 1 and numbers["baseline"].notna().all() else REFERENCE


LOAD_GAP = 0.5  # of the machine's cores: runs whose load averages differ by more were not timed alike


def parallel_measurement(frame: pd.DataFrame) -> pd.Series:
    """Rows whose seconds are parallel time: the distributed engine, or a single device (the local engine at
    K > 1 runs its modules one after another); not modules that shared a GPU (``--devices cuda:0,cuda:0``,
    ``dbench suite --device``), which time-share it."""
    shared = frame["shared_gpu"].fillna(False).astype(bool) if "shared_gpu" in frame.columns else False
    return ((frame["engine"] != "local") | (frame["k"] == 1)) & ~shared


def load_warnings(table: pd.DataFrame) -> list[str]:
    """A warning for each comparison whose runs ran under very different machine load.

    The load is the 1-minute load average at each epoch's end, the run's own
    processes included, averaged over its epochs; runs of one comparison
    (model, data set, batch size: every K, as the exact baselines span them)
    whose loads differ by more than LOAD_GAP of the cores shared the machine
    with other work unequally, and their speed ratios mix that in.
    """
    if "load_avg" not in table.columns:
        return []
    out = []
    parallel = table[parallel_measurement(table)]
    for keys, group in parallel.groupby(SAME_DEVICES, sort=True):
        loads = group.dropna(subset=["load_avg"])
        if len(loads) < 2:
            continue
        cores = loads["cpu_count"].dropna().max()
        low, high = loads["load_avg"].min(), loads["load_avg"].max()
        if pd.notna(cores) and high - low > LOAD_GAP * cores:
            busiest = loads.loc[loads["load_avg"].idxmax(), "run"]
            out.append(f"{' · '.join(map(str, keys))}: the runs compared ran under very different machine load "
                       f"(1-minute load average {low:.1f} to {high:.1f} on {int(cores)} cores; highest: {busiest}): "
                       "their speed ratios mix the methods with the machine's other work. Rerun them on an idle "
                       "machine, interleaved (benchmarks/speedup.py).")
    return out


def _ratio(value, parallel: bool, digits: int = 2) -> str:
    return tables.num(value, digits) if parallel else NOT_PARALLEL


def build(data: ReportData, out: Path) -> Section:
    section = Section("speed", "Speed", "Seconds per training epoch; speedup over model-parallel BP (the papers' "
                                        "baseline) and over the fastest exact-gradient baseline measured on the same "
                                        "devices, each beside the ideal of ALGORITHMS.md's cost model.")
    numbers = summarize(data.table)
    rates = {c: named for c, named in rate_columns().items() if numbers[c].notna().any()}  # the tasks present's
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values([*GROUP, "_o"]).drop(columns="_o")
    reference = reference_name(numbers)
    shown = pd.DataFrame({
        "model": numbers["model"], "data set": numbers["dataset"], "K": numbers["k"], "engine": numbers["engine"],
        "batch": numbers["batch_size"], "method": numbers["method"], "seeds": numbers["seeds"],
        "s/epoch": numbers["seconds_per_epoch"].map(tables.num),
        "samples/s": numbers["samples_per_s"].map(lambda v: tables.num(v, 0)),
        **{title: numbers[c].map(lambda v: tables.num(v, 0)) for c, (title, _) in rates.items()},
        f"× {reference}": [_ratio(v, p) for v, p in zip(numbers["speedup_epoch_time"], numbers["parallel"])],
        "ideal": numbers["ideal_speedup"].map(tables.num),
        "fastest exact": numbers["fastest_exact"].fillna(tables.DASH),
        "× fastest exact": [_ratio(v, p) for v, p in zip(numbers["speedup_vs_exact"], numbers["parallel"])],
        "ideal vs exact": numbers["ideal_vs_exact"].map(tables.num),
    })
    engines = set(numbers["engine"])
    notes = []
    if ((numbers["engine"] == "local") & (numbers["k"] > 1)).any():
        notes.append(LOCAL_NOTE)
    if numbers["shared_gpu"].any():
        notes.append(SHARED_NOTE)
    if "distributed" in engines:
        notes.append(DISTRIBUTED_NOTE)
    notes.append(EXACT_NOTE)
    missing = numbers[numbers["parallel"]].groupby(GROUP)["baseline"].apply(lambda b: b.isna().all())
    if missing.any():
        notes.append(f"{int(missing.sum())} setting(s) have no run of a reference method (one whose facts say "
                     f"reference): their speedups over it are {tables.DASH}.")
    if numbers["parallel"].any() and numbers.loc[numbers["parallel"], "fastest_exact"].isna().any():
        notes.append(f"Where no exact-gradient baseline was measured on the same devices, × fastest exact is "
                     f"{tables.DASH}: run bp with --gpus 1, and ddp, gpipe or 1f1b at the same K "
                     f"(suite honest-speed).")
    notes.extend(load_warnings(data.table))
    section.notes.extend(notes)
    section.items.append(tables.write(
        out, "speed/speed", title=f"Seconds per epoch, speedup over {reference} and over the fastest exact baseline",
        shown=shown, numbers=numbers, runs=data.table["run"],
        caption=(f"Means over seeds. × {reference}: its training seconds per epoch over the method's (σ probes "
                 "included; speed.csv also has the ratio of samples/s, warm-up steps and σ probes left out); "
                 + "".join(words for _, words in rates.values()) +
                 "ideal: ALGORITHMS.md's cost model for the method at that K with the options it ran with, as the "
                 f"run recorded it{_no_ideal(numbers)}. " + " ".join(notes)),
    ))
    shown_groups = numbers[numbers["parallel"] & (numbers["k"] > 1)]  # one device alone has nothing to compare
    for keys, group in shown_groups.groupby(["model", "dataset", "engine", "batch_size"], sort=True):
        if group["speedup_epoch_time"].notna().any() or group["speedup_vs_exact"].notna().any():
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
    """x: K; one bar per method, a black tick at its ideal: over the reference (left), over the fastest exact
    baseline on the same devices (right, which names it under each K)."""
    model, dataset, engine, batch = keys
    colors = data.colors
    ks = sorted(group["k"].unique())
    labels = data.order_labels(group["method"])
    width = 0.8 / len(labels)
    panels = (("speedup_epoch_time", "ideal_speedup", f"over {reference}"),
              ("speedup_vs_exact", "ideal_vs_exact", "over the fastest exact baseline"))
    with theme():
        fig = new_figure(max(9.0, 3.0 + 0.9 * len(ks) * len(labels)), 4.2)
        axes = fig.subplots(1, 2, sharey=False)
        for ax, (column, ideal_column, title) in zip(axes, panels):
            ideal_drawn = False
            for i, label in enumerate(labels):
                rows = group[group["method"] == label].set_index("k").reindex(ks)
                x = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(ks))]
                ax.bar(x, rows[column], width=width, color=colors[label], label=label)
                for xi, value in zip(x, rows[ideal_column]):
                    if pd.notna(value):
                        ax.hlines(value, xi - width / 2, xi + width / 2, color="black", linewidth=2.5, zorder=3,
                                  label=None if ideal_drawn else "ideal (ALGORITHMS.md)")
                        ideal_drawn = True
            ax.axhline(1.0, color="0.45", linestyle=":", linewidth=1)
            if column == "speedup_vs_exact":
                fastest = group.groupby("k")["fastest_exact"].first().reindex(ks).fillna(tables.DASH)
                ax.set_xticks(range(len(ks)), labels=[f"K={k}\nfastest: {f}" for k, f in zip(ks, fastest)])
            else:
                ax.set_xticks(range(len(ks)), labels=[f"K={k}" for k in ks])
            ax.set_ylabel("speedup (×)")
            ax.set_title(title)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center")
        fig.suptitle(f"Speedup: {model} · {dataset} · {engine} engine · batch {batch}")
        caption = (f"Bars: seconds per epoch of {reference} (left) and of the fastest exact-gradient baseline on the "
                   "same devices (right, named under each K) over the method's, mean over seeds; black ticks: the "
                   "ideal. " + EXACT_NOTE)
        return save(fig, out, "speed/" + figures.file_stem(model, dataset, engine, f"b{batch}"),
                    title=f"Speedup: {model}, {dataset}, {engine} engine, batch {batch}",
                    caption=caption, runs=runs)
