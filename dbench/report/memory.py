"""Memory: each module's peak accounted memory per method and K, and what it is made of.

The peak of a module is its largest accounted moment over all epochs
(dbench.summary.module_peak: the same number as summary.json's per-module
``accounted_peak_bytes``); the breakdown is the categories at that moment. Runs of several seeds are averaged
(the shapes, hence the bytes, rarely depend on the seed). The CUDA allocator's
peaks, where the runs were on GPUs, are shown beside them: they also hold the
data set and temporaries, which accounting leaves out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dbench import results
from dbench.report import figures, tables
from dbench.report.figures import CATEGORY_ORDER, category_colors, new_figure, order_categories, save, theme
from dbench.report.section import ReportData, Section

MIB = results.MIB
GROUP = ["model", "dataset", "k", "label", "module"]
CUDA_NAMES = {"cuda_peak_active_bytes": "CUDA peak active", "cuda_peak_allocated_bytes": "CUDA peak allocated",
              "cuda_peak_reserved_bytes": "CUDA peak reserved"}
PEAK_CAPTION = "Bars: the module's largest accounted moment over all epochs, mean over seeds (MiB = 2^20 bytes)."
CUDA_CAPTION = ("Bars: the CUDA allocator's peak on the module's device, largest over epochs, mean over seeds; "
                "it also holds the data set and temporaries, which accounting leaves out.")


def build(data: ReportData, out: Path) -> Section:
    section = Section("memory", "Memory per module",
                      "Peak memory of each module (MiB) per method and K, and its breakdown by category "
                      "at that peak: what the framework accounts for every method "
                      f"({', '.join(c.replace('_', ' ') for c in CATEGORY_ORDER)}), then each method's own state.")
    if data.modules.empty:
        section.notes.append("No run has per-module measurements (older runs lack them).")
        return section
    unaccounted = sorted({run.method for run in data.runs if not run.accounts_activations})
    if unaccounted:
        section.notes.append(f"{', '.join(unaccounted)}: activations not accounted (their runner keeps the meter's "
                             f"records alive across steps; docs/ALGORITHMS.md, \"Frontier exact schedules\"): their "
                             f"accounted bars hold parameters, gradients, optimizer state and messages only, and the "
                             f"verdict shows no accounted memory for them.")
    peaks = results.module_peaks(data.runs)
    categories = order_categories(c[len(results.BYTES_PREFIX):] for c in results.memory_categories(peaks))
    cuda = [c for c in CUDA_NAMES if c in peaks.columns and peaks[c].notna().any()]
    value_columns = ["accounted_peak_bytes", *(results.BYTES_PREFIX + c for c in categories), *cuda]
    mean = peaks.groupby(GROUP, sort=True).agg(
        seeds=("seed", "nunique"), runs=("run", lambda r: list(r)), **{c: (c, "mean") for c in value_columns}
    ).reset_index()
    for (model, dataset), group in mean.groupby(["model", "dataset"], sort=True):
        runs = [r for rs in group["runs"] for r in rs]
        stem = figures.file_stem(model, dataset)
        section.items.append(_grouped_bars(group, "accounted_peak_bytes", data, out, f"memory/{stem}-peak",
                                           f"Peak accounted memory per module: {model}, {dataset}", runs,
                                           PEAK_CAPTION))
        section.items.append(_stacked_bars(group, categories, data, out, f"memory/{stem}-breakdown",
                                           f"Memory breakdown at each module's peak: {model}, {dataset}", runs))
        if cuda:  # one figure (peak active, the closest to accounting); the table has all three
            name = cuda[0]
            section.items.append(_grouped_bars(group, name, data, out, f"memory/{stem}-cuda",
                                               f"{CUDA_NAMES[name]} memory per module: {model}, {dataset}", runs,
                                               CUDA_CAPTION))
    section.items.append(_table(mean, categories, cuda, data, out))
    return section


def _panels(group: pd.DataFrame, height_per_panel: float, width_per_bar: float, bars_per_k):
    ks = sorted(group["k"].unique())
    width = max(6.0, min(16.0, 1.5 + width_per_bar * max(bars_per_k(k) for k in ks)))
    fig = new_figure(width, 0.8 + height_per_panel * len(ks))
    axes = fig.subplots(len(ks), 1, squeeze=False)[:, 0]
    return fig, ks, axes


def _grouped_bars(group, column, data: ReportData, out, stem, title, runs, caption) -> figures.Figure:
    """x: module, one bar per method, one panel per K."""
    colors = data.colors
    with theme():
        labels_of = {k: data.order_labels(group.loc[group["k"] == k, "label"]) for k in group["k"].unique()}
        fig, ks, axes = _panels(group, 2.6, 0.35, lambda k: k * len(labels_of[k]))
        for ax, k in zip(axes, ks):
            at_k = group[group["k"] == k]
            labels = labels_of[k]
            width = 0.8 / len(labels)
            for i, label in enumerate(labels):
                rows = at_k[at_k["label"] == label].sort_values("module")
                x = rows["module"].to_numpy() + (i - (len(labels) - 1) / 2) * width
                ax.bar(x, rows[column] / MIB, width=width, color=colors[label], label=label)
            ax.set_xticks(range(k), labels=[f"module {m}" for m in range(k)])
            ax.set_ylabel("MiB")
            ax.set_title(f"K={k}", loc="left", fontsize="medium")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(title)
        return save(fig, out, stem, title=title, runs=runs, caption=caption)


def _stacked_bars(group, categories, data: ReportData, out, stem, title, runs) -> figures.Figure:
    """One bar per (method, module), stacked by category, one panel per K."""
    colors = category_colors(categories)
    with theme():
        labels_of = {k: data.order_labels(group.loc[group["k"] == k, "label"]) for k in group["k"].unique()}
        fig, ks, axes = _panels(group, 3.0, 0.45, lambda k: (k + 1) * len(labels_of[k]))
        shown_max: dict[str, float] = {}  # category -> its largest segment over every panel (MiB)
        tallest = 0.0
        for ax, k in zip(axes, ks):
            at_k = group[group["k"] == k]
            positions, ticks, centers = [], [], []
            for i, label in enumerate(labels_of[k]):
                start = i * (k + 1)  # a gap of one bar between methods
                centers.append(start + (k - 1) / 2)
                for m in range(k):
                    positions.append((label, m, start + m))
                    ticks.append(start + m)
            bottom = np.zeros(len(positions))
            drawn = {}  # category -> its largest segment (MiB) in this panel
            for category in categories:
                heights = np.array([_value(at_k, label, m, results.BYTES_PREFIX + category) / MIB
                                    for label, m, _ in positions])
                drawn_max = float(heights.max()) if len(heights) else 0.0
                shown_max[category] = max(shown_max.get(category, 0.0), drawn_max)
                if not heights.any():
                    continue
                ax.bar([p for _, _, p in positions], heights, bottom=bottom, width=0.85,
                       color=colors[category], label=category.replace("_", " "))
                drawn[category] = drawn_max
                bottom += heights
            tallest = max(tallest, float(bottom.max()) if len(bottom) else 0.0)
            ax.set_xticks(ticks, labels=[str(m) for _, m, _ in positions])
            methods = ax.secondary_xaxis("bottom")
            methods.set_xticks(centers, labels=labels_of[k])
            methods.tick_params(length=0, pad=22)  # below the module numbers, clear of them
            for text in methods.get_xticklabels():
                text.set_fontweight("bold")
            methods.spines["bottom"].set_visible(False)
            ax.set_ylabel("MiB")
            ax.set_title(f"K={k}  (bars: module 0 … {k - 1} of each method)", loc="left", fontsize="medium")
            # the legend names what can be seen: a category under VISIBLE of the tallest bar is a sliver
            handles, names = ax.get_legend_handles_labels()
            visible = {c.replace("_", " ") for c, top in drawn.items() if top >= VISIBLE * float(bottom.max())}
            keep = [(h, n) for h, n in zip(handles, names) if n in visible]
            ax.legend([h for h, _ in keep], [n for _, n in keep], loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(title)
        return save(fig, out, stem, title=title, runs=runs, caption=_breakdown_caption(categories, shown_max, tallest))


VISIBLE = 0.01  # a category's largest segment must reach 1% of the tallest bar to be named in the legend


def _breakdown_caption(categories: list[str], largest: dict[str, float], tallest: float) -> str:
    """What the bars hold: the methods' own state named, and every category the legend leaves out, with why."""
    own = [c.replace("_", " ") for c in categories if c not in CATEGORY_ORDER and largest.get(c, 0) > 0]
    caption = "Each bar is one module at its peak, stacked by what the bytes hold then (mean over seeds)."
    if own:
        caption += (f" {', '.join(own)}: state the methods keep beyond the framework's own "
                    "(what each method's Stage.held_tensors names).")
    small = [c.replace("_", " ") for c in categories if 0 < largest.get(c, 0) < VISIBLE * tallest]
    if small:
        caption += (f" Too small to see (under {VISIBLE:.0%} of the tallest bar; their bytes are in memory.csv): "
                    f"{', '.join(small)}.")
    zero = [c.replace("_", " ") for c in categories if largest.get(c, 0) == 0]
    if zero:
        caption += (f" Zero at every module's peak moment: {', '.join(zero)}"
                    + (" (the peak comes as a backward starts, when the last update has freed the gradients)"
                       if "gradients" in zero else "") + ".")
    return caption


def _value(frame, label, module, column) -> float:
    row = frame[(frame["label"] == label) & (frame["module"] == module)]
    return float(row[column].iloc[0]) if len(row) else 0.0


def _table(mean: pd.DataFrame, categories: list[str], cuda: list[str], data: ReportData, out: Path) -> tables.Table:
    # the framework's own categories always get a column (a 0 is a finding: e.g. no gradient is held at the
    # peak); a method's own category only where some run holds it
    used = [c for c in categories if c in CATEGORY_ORDER or mean[results.BYTES_PREFIX + c].any()]
    numbers = mean[["model", "dataset", "k", "label", "module", "seeds"]].rename(columns={"label": "method"})
    numbers["peak_mib"] = mean["accounted_peak_bytes"] / MIB
    for c in used:
        numbers[f"{c}_mib"] = mean[results.BYTES_PREFIX + c] / MIB
    for c in cuda:
        numbers[c.replace("_bytes", "_mib")] = mean[c] / MIB
    shown = pd.DataFrame({"model": numbers["model"], "data set": numbers["dataset"], "K": numbers["k"],
                          "method": numbers["method"], "module": numbers["module"],
                          "peak MiB": numbers["peak_mib"].map(tables.num)})
    for c in used:
        shown[c.replace("_", " ")] = numbers[f"{c}_mib"].map(tables.num)
    for c in cuda:
        shown[CUDA_NAMES[c] + " MiB"] = numbers[c.replace("_bytes", "_mib")].map(tables.num)
    order = data.label_rank(numbers["method"])
    keep = numbers.assign(_o=numbers["method"].map(order)).sort_values(["model", "dataset", "k", "_o", "module"]).index
    runs = [r for rs in mean["runs"] for r in rs]
    return tables.write(out, "memory/memory", title="Peak memory per module (MiB)", shown=shown.loc[keep],
                        numbers=numbers.loc[keep], runs=runs,
                        caption="Accounted bytes at each module's peak over all epochs, mean over seeds, by category"
                                + ("; CUDA: the allocator's peaks on the module's device." if cuda else "."))
