"""Convergence: training loss and test error against epochs and against training wall-clock time.

One figure per (model, data set, K), one line per method: the mean over
seeds, with a band from the lowest to the highest seed when there are several.
The curves are the task's (dbench.task): a language model's figure (byte-level
text) shows its training and test loss in bits per byte (loss / ln 2) instead.
"""
from __future__ import annotations

from pathlib import Path

from dbench import task as tasks
from dbench.report import figures
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

AXES = (("epoch", "epoch"), ("wall_seconds", "training wall-clock (s)"))

LOG_SCALE_RATIO = 30  # training losses spanning more than this factor are drawn on a log scale

CAPTION = ("Lines: mean over seeds; band: lowest to highest seed. Wall-clock: training seconds summed up to the end "
           "of each epoch, averaged over seeds (σ probes and the first steps included, evaluation left out).")
LOCAL_NOTE = ("Runs on the local engine ran their modules one after another: their wall-clock is total "
              "compute, not what K devices working at once would take (each figure's caption names its engine).")


def build(data: ReportData, out: Path) -> Section:
    section = Section("convergence", "Convergence",
                      "Training loss and test error per epoch and against training time, per model, data set and K"
                      " (a language model's: training and test loss in bits per byte).")
    epochs = data.epochs
    if epochs.empty:
        section.notes.append("No run has epoch rows in metrics.jsonl.")
        return section
    for (model, dataset, k), group in epochs.groupby(["model", "dataset", "k"], sort=True):
        section.items.append(_figure(group, model, dataset, k, data, out))
    engines = set(data.table["engine"])
    if "local" in engines:
        section.notes.append(LOCAL_NOTE)
    return section


def _figure(group, model, dataset, k, data: ReportData, out: Path) -> figures.Figure:
    colors = data.colors
    # the task's curves (a classification's training loss and test error; a language model's in bits per
    # byte); runs of several tasks in one figure (not written by dbench) are read as the default task's
    task = tasks.shared(group)
    metrics = [(m.column, m.name, m.scale) for m in task.curves]
    with theme():
        fig = new_figure(10, 7)
        axes = fig.subplots(2, 2, sharex="col", sharey="row")
        for label in data.order_labels(group["label"]):
            runs = group[group["label"] == label]
            seeds = runs["seed"].nunique()
            stats = runs.groupby("epoch").agg(
                wall_seconds=("wall_seconds", "mean"),
                **{f"{m}_{f}": (m, f) for m, _, _ in metrics for f in ("mean", "min", "max")},
            ).reset_index()
            for row, (metric, ylabel, scale) in enumerate(metrics):
                for col, (x, xlabel) in enumerate(AXES):
                    ax = axes[row][col]
                    ax.plot(stats[x], stats[f"{metric}_mean"] * scale, marker="o", markersize=3.5,
                            color=colors[label], label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
                    if seeds > 1:
                        ax.fill_between(stats[x], stats[f"{metric}_min"] * scale, stats[f"{metric}_max"] * scale,
                                        color=colors[label], alpha=0.18, linewidth=0)
                    if row == len(metrics) - 1:
                        ax.set_xlabel(xlabel)
                    if col == 0:
                        ax.set_ylabel(ylabel)
        for ax in axes[:, 1]:
            ax.set_xlim(left=0)  # training time starts at 0, not at the end of the first epoch
        if group["epoch"].max() <= 20:  # few epochs: whole-number ticks, not 1.5, 2.5
            for ax in axes[:, 0]:
                ax.xaxis.get_major_locator().set_params(integer=True)
        loss = group[metrics[0][0]].astype(float).dropna()
        if len(loss) and loss.min() > 0 and loss.max() / loss.min() > LOG_SCALE_RATIO:
            axes[0][0].set_yscale("log")  # a diverging method would flatten every other line
            axes[0][0].set_ylabel(metrics[0][1] + " (log scale)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
        fig.suptitle(f"{model} · {dataset} · K={k}")
        # group["engine"] says which engine timed these runs; the caption says it for this figure
        engines = ", ".join(sorted(set(group["engine"])))
        return save(fig, out, "convergence/" + figures.file_stem(model, dataset, f"k{k}"),
                    title=f"Convergence: {model}, {dataset}, K={k}",
                    caption=f"{CAPTION}{task.curves_caption} Engine: {engines}.", runs=group["run"])
