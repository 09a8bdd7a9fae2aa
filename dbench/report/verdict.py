"""The verdict: which method buys what, in time, memory and accuracy, per model, data set and K.

docs/ALGORITHMS.md's last section, as one table. A comparison is a model, a
data set and K; each method label run there is one row (one per engine and
batch size, where a label ran with several):
- seconds per epoch and the two speedups beside their ideals, as the speed
  section computes them (``speed.summarize``): over model-parallel BP, and over
  the fastest exact-gradient baseline measured on the same devices;
- peak memory of the largest device and summed over devices, from each run's
  summary.json (the CUDA allocator's peak allocated bytes where every run of
  the row has them, else the accounted bytes);
- best test error, mean ± std over seeds, and its difference from the
  reference method's (model-parallel BP) in the same comparison;
- time to accuracy: training wall-clock until the test accuracy first reaches
  a target (given, or 99% of the reference's mean best accuracy).

``table`` computes it (the report's section and ``dbench compare`` both use it),
``shown`` and ``text`` format it, ``build`` writes the section with one Pareto
figure (time to accuracy against error) per comparison.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from dbench import results
from dbench.errors import DbenchError
from dbench.report import figures, speed, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

COMPARISON = ["model", "dataset", "k"]
ROW = [*COMPARISON, "engine", "batch_size", "method"]  # speed.summarize's rows; its "method" is the label
DEFAULT_SHARE = 0.99  # the default target: this share of the reference's mean best test accuracy
NOT_REACHED = "not reached"
ACCOUNTED = "accounted"
CUDA = "CUDA peak allocated"
CUDA_KEY = "cuda_peak_allocated_bytes"  # as dbench.check compares on GPUs
REFERENCE = "the reference"  # said where comparisons have different reference labels, or none

TITLE = "Verdict: which method buys what"
INTRO = ("Per model, data set and K, what each method buys and costs: seconds per epoch and speedups (each beside "
         "its ideal), peak memory of the largest device and of all devices, best test error and its difference "
         "from model-parallel BP's, and the training time until the test accuracy reaches a target.")
LOCAL_NOTE = ("Local engine at K > 1: the modules ran one after another, so its seconds per epoch and its time to "
              "accuracy are total compute, not the time K devices working at once take.")


def check_target(target_acc: float | None) -> None:
    """A target accuracy must be a fraction in (0, 1]; None means the default."""
    if target_acc is None:
        return
    if not 0 < target_acc <= 1:  # NaN fails this too
        raise DbenchError(f"--target-acc {target_acc} is not a test accuracy in (0, 1]: give e.g. 0.9 for 90%")


# --- the numbers ----------------------------------------------------------------------------------

def table(data: ReportData, target_acc: float | None = None) -> pd.DataFrame:
    """One row per comparison (model, data set, K) and method label (and engine, batch size).

    Columns: speed.summarize's (``seconds_per_epoch``, ``speedup_epoch_time``, ``ideal_speedup``,
    ``fastest_exact``, ``speedup_vs_exact``, ``ideal_vs_exact``, ``parallel``, ...), then
    ``runs``, ``memory_source``, ``peak_mib_largest_device``, ``peak_mib_all_devices``,
    ``best_test_error_mean``/``_std`` (%), ``reference`` (the comparison's reference label),
    ``error_vs_reference`` (percentage points), ``target_acc``, ``target_from``, ``time_to_target_s``
    (mean over the runs that reached the target) and ``runs_reached``.
    """
    check_target(target_acc)
    targets = _targets(data.table, target_acc)
    per_run = _per_run(data, targets)
    # dropna=False: a run without a batch size still gets its row here (speed.summarize leaves it out)
    rows = pd.DataFrame([_row(key, group) for key, group in per_run.groupby(ROW, sort=True, dropna=False)])
    numbers = speed.summarize(data.table).merge(rows, on=ROW, how="left", validate="one_to_one")
    numbers = numbers.merge(targets, on=COMPARISON, how="left", validate="many_to_one")
    numbers["error_vs_reference"] = numbers["best_test_error_mean"] - numbers["reference_error_mean"]
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values(
        [*COMPARISON, "_o", "engine", "batch_size"]).drop(columns="_o")
    return numbers.reset_index(drop=True)


def _reference_label(group: pd.DataFrame) -> str | None:
    """The comparison's reference method label (the one whose facts say reference): of several, the one run
    with the method's default options, then the first in table order, as speed.baselines picks."""
    ref = group[group["reference"].astype(bool)]
    if ref.empty:
        return None
    # the method with its options, without the settings that tell runs apart (results.Run.method_label)
    plain = ref["method_label"] if "method_label" in ref.columns else ref["label"]
    ref = ref.assign(_options=plain != ref["method"]).sort_values(["_options", "table_order", "label"])
    return ref["label"].iloc[0]


def _targets(table: pd.DataFrame, target_acc: float | None) -> pd.DataFrame:
    """Per comparison: its reference label, the reference's mean best test error (%), and the target accuracy
    with where it comes from (NaN and None: no target)."""
    rows = []
    for (model, dataset, k), group in table.groupby(COMPARISON, sort=True):
        reference = _reference_label(group)
        ref_error = group.loc[group["label"] == reference, "best_test_error"].mean() * 100 if reference else math.nan
        if target_acc is not None:
            target, source = target_acc, f"--target-acc {target_acc:g}"
        elif reference is not None:
            target = DEFAULT_SHARE * (1 - ref_error / 100)  # the mean best accuracy is 1 - the mean best error
            source = f"{DEFAULT_SHARE:g} × {reference}'s mean best test accuracy"
        else:
            target, source = math.nan, None
        rows.append({"model": model, "dataset": dataset, "k": k, "reference": reference,
                     "reference_error_mean": ref_error, "target_acc": target, "target_from": source})
    return pd.DataFrame(rows)


def _per_run(data: ReportData, targets: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its row key, best test error (%), peak memory (both kinds) and time to the target."""
    t = data.table
    frame = pd.DataFrame({c: t[c] for c in ("run", *COMPARISON, "engine", "batch_size", "seed")})
    frame["method"] = t["label"]
    frame["best_test_error_pct"] = t["best_test_error"].astype(float) * 100
    memory = pd.DataFrame([{"run": run.name, **run_memory(run)} for run in data.runs])
    frame = frame.merge(memory, on="run", how="left", validate="one_to_one")
    target_of = targets.set_index(COMPARISON)["target_acc"]
    epochs = dict(tuple(data.epochs.groupby("run"))) if "test_acc" in data.epochs.columns else {}
    frame["time_to_target_s"] = [
        time_to_target(epochs.get(r.run), target_of.loc[(r.model, r.dataset, r.k)]) for r in frame.itertuples()]
    return frame


def run_memory(run: results.Run) -> dict:
    """Largest and summed per-module peak (bytes) of one run from summary.json: accounted, and the CUDA
    allocator's peak allocated where every module has it (NaN where the summary has no modules)."""
    modules = run.summary.get("modules") or []
    accounted = [m["accounted_peak_bytes"] for m in modules if m.get("accounted_peak_bytes") is not None]
    cuda = [m[CUDA_KEY] for m in modules if m.get(CUDA_KEY) is not None]
    has_cuda = bool(modules) and len(cuda) == len(modules)
    return {"accounted_largest": max(accounted) if accounted else math.nan,
            "accounted_sum": sum(accounted) if accounted else math.nan,
            "cuda_largest": max(cuda) if has_cuda else math.nan,
            "cuda_sum": sum(cuda) if has_cuda else math.nan}


def time_to_target(epochs: pd.DataFrame | None, target: float) -> float:
    """Training seconds up to the end of the first epoch whose test accuracy reaches ``target`` (NaN: none did,
    or there is no target)."""
    if epochs is None or math.isnan(target):
        return math.nan
    acc = pd.to_numeric(epochs["test_acc"])  # an epoch without a test accuracy (None) reaches nothing
    reached = epochs[acc >= target].sort_values("epoch")
    return float(reached["wall_seconds"].iloc[0]) if len(reached) else math.nan


def _row(key: tuple, group: pd.DataFrame) -> dict:
    """One verdict row's run-level numbers: means over its runs (seeds)."""
    # the CUDA peak where every run of the row has it, so that a row never averages the two kinds
    if group["cuda_largest"].notna().all():
        source, largest, total = CUDA, group["cuda_largest"], group["cuda_sum"]
    elif group["accounted_largest"].notna().any():
        source, largest, total = ACCOUNTED, group["accounted_largest"], group["accounted_sum"]
    else:
        source, largest, total = None, group["accounted_largest"], group["accounted_sum"]
    times = group["time_to_target_s"].dropna()
    return {
        **dict(zip(ROW, key)),
        "runs": len(group),
        "memory_source": source,
        "peak_mib_largest_device": largest.mean() / results.MIB,
        "peak_mib_all_devices": total.mean() / results.MIB,
        "best_test_error_mean": group["best_test_error_pct"].mean(),
        "best_test_error_std": group["best_test_error_pct"].std(),  # NaN for one run: no spread
        "time_to_target_s": times.mean() if len(times) else math.nan,
        "runs_reached": len(times),
    }


# --- the table as text ----------------------------------------------------------------------------

def one_name(names: pd.Series) -> str:
    """The reference label the column headers name: the one label every comparison that has a reference
    shares (comparisons without one show dashes), else a generic name."""
    present = set(names.dropna())
    return present.pop() if len(present) == 1 else REFERENCE


def shown(numbers: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as text cells, one row per row of ``numbers`` (``table``'s)."""
    speed_ref, error_ref = one_name(numbers["baseline"]), one_name(numbers["reference"])
    out = pd.DataFrame({
        "model": numbers["model"], "data set": numbers["dataset"], "K": numbers["k"],
        "method": numbers["method"], "engine": numbers["engine"], "batch": numbers["batch_size"],
        "seeds": numbers["runs"],
        "s/epoch": numbers["seconds_per_epoch"].map(tables.num),
        f"× {speed_ref} (ideal)": [_speedup(s, i, p) for s, i, p in
                                   zip(numbers["speedup_epoch_time"], numbers["ideal_speedup"], numbers["parallel"])],
        "fastest exact": numbers["fastest_exact"].fillna(tables.DASH),
        "× fastest exact (ideal)": [_speedup(s, i, p) for s, i, p in
                                    zip(numbers["speedup_vs_exact"], numbers["ideal_vs_exact"], numbers["parallel"])],
        "peak MiB, largest device": numbers["peak_mib_largest_device"].map(tables.num),
        "peak MiB, all devices": numbers["peak_mib_all_devices"].map(tables.num),
    })
    if (numbers["memory_source"] == CUDA).any():  # else every row's memory is accounted, as the caption says
        out["memory"] = numbers["memory_source"].fillna(tables.DASH)
    out["best test error %"] = [tables.mean_std(m, s, n) for m, s, n in
                                zip(numbers["best_test_error_mean"], numbers["best_test_error_std"], numbers["runs"])]
    out[f"Δ error vs {error_ref} (pp)"] = numbers["error_vs_reference"].map(signed)
    out["target acc %"] = (numbers["target_acc"] * 100).map(tables.num)
    out["time to target (s)"] = [time_cell(r.time_to_target_s, r.runs_reached, r.runs, r.target_acc)
                                 for r in numbers.itertuples()]
    return out


def _speedup(value, ideal, parallel: bool) -> str:
    if not parallel:
        return speed.NOT_PARALLEL
    return f"{tables.num(value)} ({tables.num(ideal)})"


def signed(value) -> str:
    """A difference with its sign: +1.25, -0.50, 0.00 (a dash where there is none)."""
    text = tables.num(value)
    return text if text == tables.DASH or text.strip("-0.") == "" or text.startswith("-") else "+" + text


def time_cell(seconds, reached: int, runs: int, target) -> str:
    if pd.isna(target):
        return tables.DASH
    if reached == 0:
        return NOT_REACHED
    if reached < runs:
        return f"{tables.num(seconds)} ({reached} of {runs} seeds)"
    return tables.num(seconds)


def caption(numbers: pd.DataFrame, target_acc: float | None) -> str:
    """Defines every column of ``shown``."""
    speed_ref, error_ref = one_name(numbers["baseline"]), one_name(numbers["reference"])
    memory = ("memory: where the bytes come from, the CUDA allocator's peak allocated bytes where every run of the "
              "row has them, else summary.json's accounted bytes"
              if (numbers["memory_source"] == CUDA).any() else "from summary.json's accounted bytes")
    target = (f"the accuracy given (--target-acc {target_acc:g})" if target_acc is not None else
              f"{DEFAULT_SHARE:g} × {error_ref}'s mean best test accuracy in the same comparison")
    return (
        "One row per method (the method with its non-default options) in each comparison (model, data set, K), "
        "and per engine and batch (size) its runs used. seeds: runs averaged. s/epoch: training seconds per "
        f"epoch, mean over seeds (σ probes included). × {speed_ref} (ideal): {speed_ref}'s seconds per epoch at "
        "the same model, data set, K, engine and batch size over the method's, with ALGORITHMS.md's ideal in "
        f"brackets; {speed.NOT_PARALLEL}: the local engine at K > 1, which runs the modules one after another. "
        "fastest exact: the exact-gradient baseline with the fewest seconds per epoch measured on the same devices "
        "(bp on one device, or ddp, gpipe, 1f1b at the same K); × fastest exact (ideal): its seconds per epoch "
        "over the method's, with the ratio of the two ideals in brackets. peak MiB, largest device: the largest "
        "module's peak (module k on device k; MiB = 2^20 bytes); peak MiB, all devices: the sum of every "
        f"module's peak; both mean over seeds; {memory}. best test error %: the best epoch's test error, mean ± "
        f"sample standard deviation over seeds. Δ error vs {error_ref} (pp): the method's mean minus "
        f"{error_ref}'s in the same comparison, in percentage points (negative: more accurate). target acc %: "
        f"{target}. time to target (s): training seconds (evaluation left out) up to the end of the first epoch "
        "whose test accuracy reaches the target, mean over the seeds that reached it (k of n seeds where not all "
        f"did); {NOT_REACHED}: no seed did. {tables.DASH}: no such number (no reference run, no exact baseline, "
        "no closed-form ideal).")


def notes(numbers: pd.DataFrame, target_acc: float | None) -> list[str]:
    out = []
    if (~numbers["parallel"]).any():
        out.append(LOCAL_NOTE)
    without = numbers[numbers["reference"].isna()][COMPARISON].drop_duplicates()
    for r in without.itertuples():
        what = (f"its Δ error is {tables.DASH}" if target_acc is not None
                else f"its Δ error and time to target are {tables.DASH} (give --target-acc for a time)")
        out.append(f"{r.model} · {r.dataset} · K={r.k} has no run of a reference method (model-parallel bp): {what}.")
    return out


# Shorter column names and cells for a terminal, so that a comparison fits in about 130 columns.
TERMINAL_NAMES = {"× fastest exact (ideal)": "× exact (ideal)", "peak MiB, largest device": "MiB largest",
                  "peak MiB, all devices": "MiB all", "best test error %": "error %",
                  "time to target (s)": "to target (s)"}
TERMINAL_NOT_PARALLEL = "not parallel"
TERMINAL_CUDA = "CUDA"


def text(numbers: pd.DataFrame, target_acc: float | None = None, width: int = 110) -> str:
    """The verdict for a terminal: one aligned block per comparison, then what the columns mean."""
    cells = shown(numbers).replace({speed.NOT_PARALLEL: TERMINAL_NOT_PARALLEL, CUDA: TERMINAL_CUDA})
    delta = next(c for c in cells.columns if c.startswith("Δ error vs "))
    names = {**TERMINAL_NAMES, delta: delta.replace("Δ error vs ", "Δ vs ").replace(" (pp)", "")}
    blocks = []
    for (model, dataset, k), group in cells.groupby(["model", "data set", "K"], sort=False):
        first = numbers.loc[group.index[0]]
        header = [f"{model} · {dataset} · K={k}"]
        drop = ["model", "data set", "K", "target acc %"]
        # a column with one value for the whole block is said once, in the header
        for column, name in (("engine", "engine"), ("batch", "batch"), ("fastest exact", "fastest exact"),
                             ("memory", "memory")):
            if column in group.columns and group[column].nunique() == 1:
                header.append(f"{name} {group[column].iloc[0]}")
                drop.append(column)
        lines = [" · ".join(header)]
        if pd.notna(first["target_acc"]):
            lines.append(f"target: {first['target_acc'] * 100:.2f}% test accuracy ({first['target_from']})")
        lines.append(aligned(group.drop(columns=drop).rename(columns=names)))
        blocks.append("\n".join(lines))
    short = "; ".join(f"{s} = {long}" for long, s in names.items() if long != s and long in cells.columns)
    legend = [*notes(numbers, target_acc), caption(numbers, target_acc),
              f"Short names above: {short}; {TERMINAL_NOT_PARALLEL} = {speed.NOT_PARALLEL}; "
              f"memory {TERMINAL_CUDA} = {CUDA}."]
    return "\n\n".join(blocks + [textwrap.fill(line, width) for line in legend]) + "\n"


def aligned(frame: pd.DataFrame) -> str:
    """Plain columns: the first left-aligned, the others right-aligned, two spaces apart."""
    columns = [[str(c)] + [str(v) for v in frame[c]] for c in frame.columns]
    widths = [max(len(v) for v in column) for column in columns]
    lines = []
    for i in range(len(frame) + 1):
        cells = [column[i].ljust(w) if j == 0 else column[i].rjust(w)
                 for j, (column, w) in enumerate(zip(columns, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- the section ----------------------------------------------------------------------------------

def build(data: ReportData, out: Path, target_acc: float | None = None) -> Section:
    section = Section("verdict", TITLE, INTRO)
    numbers = table(data, target_acc)
    section.notes.extend(notes(numbers, target_acc))
    section.items.append(tables.write(
        out, "verdict/verdict", title="What each method buys and costs, per model, data set and K",
        shown=shown(numbers), numbers=numbers, runs=data.table["run"], caption=caption(numbers, target_acc)))
    for keys, group in numbers.groupby(COMPARISON, sort=True):
        runs = data.table.merge(group[COMPARISON].drop_duplicates(), on=COMPARISON)["run"]
        section.items.append(_figure(group, keys, data, runs, out))
    return section


def pareto(x: pd.Series, y: pd.Series) -> pd.Series:
    """True for each point that no other point dominates (at least as fast and as accurate, better in one);
    a point without both coordinates is never optimal."""
    present = x.notna() & y.notna()
    optimal = []
    for i in x.index:
        if not present[i]:
            optimal.append(False)
            continue
        others = present & (x.index != i)
        dominated = others & (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        optimal.append(not dominated.any())
    return pd.Series(optimal, index=x.index)


def _point_names(group: pd.DataFrame) -> pd.Series:
    """Each row's label, with its engine and batch size where the label has several rows in the comparison."""
    repeated = group["method"].duplicated(keep=False)
    setting = " (" + group["engine"].astype(str) + ", batch " + group["batch_size"].astype(str) + ")"
    return group["method"].where(~repeated, group["method"] + setting)


def _figure(group: pd.DataFrame, keys, data: ReportData, runs, out: Path) -> figures.Figure:
    """x: time to the target (or seconds per epoch where no method reached it), y: best test error; marker
    area and label: peak memory of the largest device; the Pareto front joined by a line."""
    model, dataset, k = keys
    names = _point_names(group)
    reached = group["time_to_target_s"].notna()
    if reached.any():
        x = group["time_to_target_s"]
        target = group["target_acc"].iloc[0] * 100
        xlabel = f"time to {target:.2f}% test accuracy (s, mean over the seeds that reached it)"
    else:
        x = group["seconds_per_epoch"]
        why = "no target: no reference run" if group["target_acc"].isna().all() else "no method reached the target"
        xlabel = f"seconds per epoch ({why})"
    y = group["best_test_error_mean"]
    optimal = pareto(x, y)
    mib = group["peak_mib_largest_device"]
    largest = mib.max() if mib.notna().any() else 1.0
    with theme():
        fig = new_figure(7.5, 5.0)
        ax = fig.subplots()
        edge = x[x.notna()].max() * 1.15 if x.notna().any() else 1.0  # where methods that never reached it go
        shown_x = x.fillna(edge) if reached.any() else x
        # labels of neighbouring points alternate above and below their marker, so that they overlap less
        rank = shown_x.rank(method="first")
        for i in group.index:
            if pd.isna(shown_x[i]) or pd.isna(y[i]):
                continue
            label = group.at[i, "method"]
            size = 40 + 360 * (mib[i] / largest if pd.notna(mib[i]) and largest > 0 else 0.3)
            memory = f"{tables.num(mib[i], 1)} MiB"
            hollow = pd.isna(x[i])  # never reached the target: hollow, right of the dotted line
            ax.scatter([shown_x[i]], [y[i]], s=size, zorder=3,
                       **({"facecolor": "none", "edgecolor": data.colors[label], "linewidth": 1.5} if hollow else
                          {"color": data.colors[label], "edgecolor": "black", "linewidth": 0.6}))
            name = f"{names[i]} ({NOT_REACHED})" if hollow else names[i]
            ax.annotate(f"{name}\n{memory}", (shown_x[i], y[i]), textcoords="offset points", fontsize="small",
                        xytext=(9, 6) if rank[i] % 2 else (9, -24))
        front = group[optimal].assign(_x=x[optimal]).sort_values("_x")
        if len(front) > 1:
            ax.plot(front["_x"], front["best_test_error_mean"], color="0.3", linestyle="--", linewidth=1.2,
                    zorder=2, label="Pareto front")
            fig.legend(loc="outside lower right")
        if reached.any() and (~reached).any():
            ax.axvline(x[reached].max() * 1.075, color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best test error (%), mean over seeds")
        ax.margins(x=0.2, y=0.15)
        fig.suptitle(f"What each method buys: {model} · {dataset} · K={k}")
        listed = ", ".join(names[optimal]) or tables.DASH
        never = ", ".join(names[~reached]) if reached.any() and (~reached).any() else ""
        caption = (f"One point per method: x: {xlabel}; y: its best test error, mean over seeds; marker area and "
                   "label: peak memory of its largest device (MiB, as in the verdict table). Pareto-optimal (no "
                   "other point at least as fast and as accurate, and better in one)"
                   + (", joined by the dashed line" if len(front) > 1 else "") + f": {listed}." + (f" Hollow, right of the dotted line: never reached the target ({never})."
                                   if never else "")
                   + (" " + LOCAL_NOTE if (~group["parallel"]).any() else ""))
        return save(fig, out, "verdict/" + figures.file_stem(model, dataset, f"k{k}"),
                    title=f"Verdict: {model}, {dataset}, K={k}", caption=caption, runs=runs)
