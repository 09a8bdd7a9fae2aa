"""σ, the sufficient direction constant (ALGORITHMS.md): per module over epochs, and per run.

σ_k = <∇f, g_k> / ||∇f||² compares what module k applies with the true
gradient at the same weights; > 0 is a descent direction, 1 is BP. The FR
paper plots it per module over epochs. Plain σ reads low for every method,
BP included, because the probe set's own noise inflates ||∇f||²; the
corrected σ (Σ<∇f,g> / Σ<∇_A,∇_B>, pooled over probes) removes that bias and is
centred on 1 for BP. Both are shown. Per epoch: the mean of that epoch's
probes (corrected: pooled over them), then the mean over seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from dbench import summary
from dbench.report import figures, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

NETWORK = "network"
COLUMNS = 3  # methods per row of the σ figure
Y_RANGE = (-1.0, 3.0)  # σ axes show this range when values stray far outside it (σ of BP is 1)


def per_run(probes: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per run, part and ``by`` (e.g. epoch): mean σ, mean cosine, probes with a σ, pooled corrected σ,
    and the sums it is pooled from (``dot``, ``cross``, ``usable`` probes), to pool further."""
    keys = ["run", "label", "model", "dataset", "k", "seed", "part", "module", *by]
    # the corrected σ pools the probes' sums by summary.json's rule (dbench.summary.pooled_sigma):
    # the sums over the probes that count, then their ratio
    usable = np.array([summary.counts(c) for c in probes["cross"]], dtype=bool)
    sums = probes.assign(dot=probes["dot"].where(usable, 0.0), cross=probes["cross"].where(usable, 0.0),
                         usable=usable)
    out = sums.groupby(keys, dropna=False, sort=True).agg(
        sigma=("sigma", "mean"), cosine=("cosine", "mean"), probes=("sigma", "count"),
        dot=("dot", "sum"), cross=("cross", "sum"), usable=("usable", "sum"),
    ).reset_index()
    out["sigma_corrected"] = pooled(out)
    return out


def pooled(sums: pd.DataFrame) -> np.ndarray:
    """The corrected σ of each row of summed ``dot``, ``cross`` over its ``usable`` probes (NaN: none)."""
    values = [summary.ratio(d, c, n) for d, c, n in zip(sums["dot"], sums["cross"], sums["usable"])]
    return np.array(values, dtype=float)  # None → NaN


def build(data: ReportData, out: Path) -> Section:
    section = Section("sigma", "σ (sufficient direction constant)",
                      "σ per module over epochs (> 0: a descent direction; BP: 1), and mean σ per module over "
                      "each run. Plain σ reads low for every method because of the probe set's own noise; "
                      "corrected σ removes that bias.")
    probes = data.probes
    without = sorted(set(data.table["run"]) - set(probes["run"]))
    if without:
        section.notes.append(f"{len(without)} run(s) have no σ probes (run with --sigma-every 0, or older): "
                             f"{', '.join(without)}.")
    if probes.empty:
        return section
    by_epoch = per_run(probes, ["epoch"])
    for (model, dataset, k), group in by_epoch.groupby(["model", "dataset", "k"], sort=True):
        section.items.append(_figure(group, model, dataset, k, data, out))
    section.items.append(_table(per_run(probes, []), probes, data, out))
    return section


def _figure(group: pd.DataFrame, model, dataset, k, data: ReportData, out: Path) -> figures.Figure:
    labels = data.order_labels(group["label"])
    # corrected σ per epoch pools the probes of every seed: a ratio of sums is steadier than a mean of ratios
    mean = group.groupby(["label", "part", "epoch"], dropna=False).agg(
        sigma=("sigma", "mean"), dot=("dot", "sum"), cross=("cross", "sum"), usable=("usable", "sum")).reset_index()
    mean["sigma_corrected"] = pooled(mean)
    module_colors = dict(zip(range(k), sns.color_palette("crest", n_colors=k)))
    rows = (("sigma", "σ"), ("sigma_corrected", "σ corrected"))
    clipped = False
    # Methods wrap into a grid of at most COLUMNS: each method is a column of two panels (σ above, corrected σ
    # below), so a report of many methods stays legible at a page's width.
    columns = min(len(labels), COLUMNS)
    blocks = -(-len(labels) // columns)
    with theme():
        fig = new_figure(max(6.0, 2.9 * columns + 1.0), 5.0 * blocks + 0.8)
        axes = fig.subplots(2 * blocks, columns, squeeze=False, sharex=True)
        undefined_marks: list = []  # (axes, epoch, colour) of corrected σ that the probes cannot define
        for row, (column, ylabel) in enumerate(rows):
            first = axes[row][0]  # every panel of this kind shares its y axis with the first one
            drawn = []  # (axes, epochs, values, colour) of every line of this kind
            for i, label in enumerate(labels):
                block, col = divmod(i, columns)
                ax = axes[2 * block + row][col]
                if ax is not first:
                    ax.sharey(first)
                at = mean[mean["label"] == label]
                ax.axhline(1.0, color="0.45", linestyle=":", linewidth=1)
                ax.axhline(0.0, color="0.3", linewidth=0.8)
                for part, color, style in [*((f"module {m}", module_colors[m], "-") for m in range(k)),
                                           (NETWORK, "black", "--")]:
                    line = at[at["part"] == part].sort_values("epoch")
                    if line[column].notna().any():
                        ax.plot(line["epoch"], line[column], marker="o" if style == "-" else "s", markersize=3.5,
                                color=color, linestyle=style, linewidth=1.5 if style == "-" else 1.2, label=part)
                        drawn.append((ax, line["epoch"], line[column], color))
                    if column == "sigma_corrected":
                        # an epoch whose probes were taken but cannot estimate ||∇f||² (Σ<∇_A,∇_B> <= 0) is
                        # marked, not left as a silent gap
                        undefined = line[line["usable"].gt(0) & line[column].isna()]
                        undefined_marks.extend((ax, e, color) for e in undefined["epoch"])
                if row == 0:
                    ax.set_title(label)
                if row == 1:
                    ax.set_xlabel("epoch")
                    ax.xaxis.set_tick_params(labelbottom=True)
                if col == 0:
                    ax.set_ylabel(ylabel)
                ax.xaxis.get_major_locator().set_params(integer=True)
            clipped |= _clip_row(first, drawn)
        low = axes[1][0].get_ylim()[0]
        for ax, epoch, color in undefined_marks:
            ax.scatter([epoch], [low], marker="x", s=50, color=color, clip_on=False, zorder=4)
        for i in range(len(labels), blocks * columns):  # the grid's empty cells
            block, col = divmod(i, columns)
            axes[2 * block][col].set_visible(False)
            axes[2 * block + 1][col].set_visible(False)
        handles, names = [], []
        for ax in axes.flat:  # every module and the network, once, whichever panel drew them
            for h, n in zip(*ax.get_legend_handles_labels()):
                if n not in names:
                    handles.append(h)
                    names.append(n)
        order = sorted(range(len(names)), key=lambda i: (names[i] == NETWORK, names[i]))
        fig.legend([handles[i] for i in order], [names[i] for i in order], loc="outside lower center",
                   ncol=len(names))
        fig.suptitle(f"σ per module: {model} · {dataset} · K={k}")
        caption = ("Per epoch: mean σ of its probes, mean over seeds; corrected σ: pooled over the epoch's probes of "
                   "all seeds. Dotted: 1 (BP's expectation); a module in its warm-up has no σ yet.")
        if clipped:
            caption += f" Values outside [{Y_RANGE[0]}, {Y_RANGE[1]}] are drawn as triangles on the edge (see sigma.csv)."
        if undefined_marks:
            caption += (" ×: an epoch whose probes could not estimate ||∇f||² (Σ<∇_A,∇_B> ≤ 0, the probe set's noise "
                        "swamps the gradient): its corrected σ is undefined; use more --sigma-batches.")
        return save(fig, out, "sigma/" + figures.file_stem(model, dataset, f"k{k}"),
                    title=f"σ per module over epochs: {model}, {dataset}, K={k}", runs=group["run"], caption=caption)


def _clip_row(ax, drawn) -> bool:
    """Keep a row's axis on Y_RANGE when a few noisy values reach far beyond it; mark those on the edge.

    A corrected σ whose probe-noise estimate is near zero can read 20 or -15,
    which would flatten every other line of the row. Returns whether it clipped.
    """
    values = pd.concat([v for _, _, v, _ in drawn]) if drawn else pd.Series(dtype=float)
    low, high = Y_RANGE
    if not ((values < low) | (values > high)).any():
        return False
    ax.set_ylim(low, high)  # the row shares its y axis
    for panel, epochs, v, color in drawn:
        for edge, outside, marker in ((high, v > high, "^"), (low, v < low, "v")):
            if outside.any():
                panel.scatter(epochs[outside], [edge] * int(outside.sum()), marker=marker, s=60, color=color,
                              clip_on=False, zorder=4)
    return True


def _table(runs: pd.DataFrame, probes: pd.DataFrame, data: ReportData, out: Path) -> tables.Table:
    keys = ["model", "dataset", "k", "label", "part"]
    numbers = runs.groupby(keys, sort=True).agg(
        seeds=("seed", "nunique"), probes=("probes", "sum"), mean_sigma=("sigma", "mean"),
        sigma_corrected=("sigma_corrected", "mean"), mean_cosine=("cosine", "mean"),
    ).reset_index()
    # the 95% interval of the corrected σ pooled over every probe of every seed (dbench.summary.sigma_interval)
    intervals = {key: summary.sigma_interval(group["dot"].dropna(), group["cross"][group["dot"].notna()])
                 for key, group in probes.groupby(keys, sort=True)}
    found = [intervals.get(tuple(r)) for r in numbers[keys].itertuples(index=False)]
    numbers["ci_low"] = [i[0] if i else float("nan") for i in found]
    numbers["ci_high"] = [i[1] if i else float("nan") for i in found]
    numbers["too_noisy"] = [summary.too_noisy(i) for i in found]
    numbers = numbers.rename(columns={"label": "method"})
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order), _p=numbers["part"].eq(NETWORK)).sort_values(
        ["model", "dataset", "k", "_o", "_p", "part"]).drop(columns=["_o", "_p"])
    shown = pd.DataFrame({
        "model": numbers["model"], "data set": numbers["dataset"], "K": numbers["k"], "method": numbers["method"],
        "part": numbers["part"], "mean σ": numbers["mean_sigma"].map(lambda v: tables.num(v, 3)),
        "σ corrected": numbers["sigma_corrected"].map(lambda v: tables.num(v, 3)),
        "95% interval": [f"[{tables.num(lo)}, {tables.num(hi)}]" + (" too noisy" if noisy else "")
                         if pd.notna(lo) else tables.DASH
                         for lo, hi, noisy in zip(numbers["ci_low"], numbers["ci_high"], numbers["too_noisy"])],
        "mean cos": numbers["mean_cosine"].map(lambda v: tables.num(v, 3)), "probes": numbers["probes"],
    })
    return tables.write(out, "sigma/sigma", title="σ per module, whole run", shown=shown, numbers=numbers,
                        runs=runs["run"],
                        caption="mean σ and mean cos: over the run's probes; σ corrected: pooled over them "
                                "(Σ<∇f,g> / Σ<∇_A,∇_B>); each then averaged over seeds. probes: σ values, all seeds. "
                                "95% interval: of the corrected σ pooled over every probe of every seed, by the "
                                "delta method over probes; 'too noisy' where it is wider than "
                                f"{summary.TOO_NOISY_WIDTH:g} (it cannot tell an exact gradient, 1, from no "
                                "descent, 0): measure with more --sigma-batches or more probes.")
