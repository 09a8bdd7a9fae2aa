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

Quality, its difference and the target are the comparison's task's
(dbench.task): a classification's as above; a language model's (byte-level
text) the best test loss in bits per byte, its difference from the
reference's, and the time to a target loss (``--target-loss``, or 1.01 × the
reference's mean best bits per byte). A data set is one task, so each
comparison has one; tables that would mix tasks are written once per task
(``verdict``, ``verdict-lm``: the task's suffix).

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
from dbench import task as tasks
from dbench.report import figures, speed, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

COMPARISON = ["model", "dataset", "k"]
ROW = [*COMPARISON, "engine", "batch_size", "method"]  # speed.summarize's rows; its "method" is the label
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


def check_targets(targets: dict | None = None, **given) -> dict[str, float | None]:
    """The targets of every task by keyword (``target_acc``, ``target_loss``, a plug-in task's), None where
    the task's default applies; a DbenchError in the CLI's words for a bad value or an unknown keyword."""
    return tasks.targets_given({**(targets or {}), **given})


# --- the numbers ----------------------------------------------------------------------------------

def table(data: ReportData, targets: dict | None = None, **given) -> pd.DataFrame:
    """One row per comparison (model, data set, K) and method label (and engine, batch size).

    Columns: speed.summarize's (``seconds_per_epoch``, ``speedup_epoch_time``, ``ideal_speedup``,
    ``fastest_exact``, ``speedup_vs_exact``, ``ideal_vs_exact``, ``parallel``, ...), then
    ``runs``, ``memory_source``, ``peak_mib_largest_device``, ``peak_mib_all_devices``, ``task`` (the
    comparison's task kind), ``reference`` (its reference label), ``target_from``, ``time_to_target_s``
    (mean over the runs that reached the target) and ``runs_reached``; and per task (dbench.task), filled in
    its comparisons' rows and NaN in the others': ``{quality}_mean``/``_std``, ``reference_{short}_mean``,
    ``{short}_vs_reference`` and the target (a classification: ``best_test_error_mean``/``_std`` in %,
    ``reference_error_mean``, ``error_vs_reference`` in percentage points, ``target_acc``; a language model:
    ``best_test_bpb_mean``/``_std``, ``reference_bpb_mean``, ``bpb_vs_reference``, ``target_bpb``, and
    ``best_test_acc_mean``, the next-token accuracy in %).

    ``targets`` (or keywords: ``target_acc=0.9``, ``target_loss=1.5``) give a task's target; each applies to
    its task's comparisons only.
    """
    chosen = check_targets(targets, **given)
    per_comparison = _targets(data.table, chosen)
    per_run = _per_run(data, per_comparison)
    # dropna=False: a run without a batch size still gets its row here (speed.summarize leaves it out)
    rows = pd.DataFrame([_row(key, group) for key, group in per_run.groupby(ROW, sort=True, dropna=False)])
    numbers = speed.summarize(data.table).merge(rows, on=ROW, how="left", validate="one_to_one")
    numbers = numbers.merge(per_comparison, on=COMPARISON, how="left", validate="many_to_one")
    numbers = numbers.reindex(columns=list(dict.fromkeys([*numbers.columns, *_every_task_column()])))
    for task in tasks.every():
        q = task.quality
        numbers[f"{q.short}_vs_reference"] = numbers[f"{q.stem}_mean"] - numbers[f"reference_{q.short}_mean"]
    order = data.label_rank(numbers["method"])
    numbers = numbers.assign(_o=numbers["method"].map(order)).sort_values(
        [*COMPARISON, "_o", "engine", "batch_size"]).drop(columns="_o")
    return numbers.reset_index(drop=True)


def task_columns(task: tasks.Task) -> list[str]:
    """The columns of ``table`` that ``task``'s rows fill and other tasks' leave NaN."""
    q = task.quality
    return [f"{q.stem}_mean", f"{q.stem}_std", *(f"{m.stem}_mean" for m in task.verdict_extras),
            f"reference_{q.short}_mean", task.target.column, f"{q.short}_vs_reference"]


def _every_task_column() -> list[str]:
    return list(dict.fromkeys(c for task in tasks.every() for c in task_columns(task)))


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


def _targets(table: pd.DataFrame, targets: dict[str, float | None]) -> pd.DataFrame:
    """Per comparison: its task, its reference label, the reference's mean best quality (a classification's
    error in %, a language model's bits per byte), and the target with where it comes from (NaN and None: no
    target): the one given for its task, else the task's factor × the reference's mean best."""
    rows = []
    for (model, dataset, k), group in table.groupby(COMPARISON, sort=True):
        task = tasks.shared(group)  # a data set is one task: a comparison's runs share it
        q, target = task.quality, task.target
        reference = _reference_label(group)
        of_reference = group[group["label"] == reference]
        ref_quality = of_reference[q.column].astype(float).mean() * q.scale if reference else math.nan
        ref_value = target.reference_value(of_reference) if reference else math.nan
        given = targets.get(target.keyword)
        if given is not None:
            value, source = given, f"{target.option} {given:g}"
        elif reference is not None and not math.isnan(ref_value):
            value, source = target.factor * ref_value, f"{target.factor:g} × {reference}'s {target.reference_name}"
        else:
            value, source = math.nan, None
        rows.append({"model": model, "dataset": dataset, "k": k, "task": task.kind, "reference": reference,
                     f"reference_{q.short}_mean": ref_quality, target.column: value, "target_from": source})
    return pd.DataFrame(rows)


def _per_run(data: ReportData, targets: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its row key, its task's quality (and extras), peak memory (both kinds) and time to
    the target."""
    t = data.table
    frame = pd.DataFrame({c: t[c] for c in ("run", *COMPARISON, "engine", "batch_size", "seed")})
    frame["method"] = t["label"]
    by_comparison = targets.set_index(COMPARISON)
    kinds = [tasks.named(by_comparison.loc[(r.model, r.dataset, r.k), "task"]) for r in frame.itertuples()]
    frame["task"] = [task.kind for task in kinds]
    # each run's own task's figures, by their table names (NaN in the other tasks' runs)
    for task in {task.kind: task for task in kinds}.values():
        mine = frame["task"] == task.kind
        for m in (task.quality, *task.verdict_extras):
            frame.loc[mine, m.stem] = t.loc[mine, m.column].astype(float) * m.scale
    memory = pd.DataFrame([{"run": run.name, **run_memory(run)} for run in data.runs])
    frame = frame.merge(memory, on="run", how="left", validate="one_to_one")
    epochs = dict(tuple(data.epochs.groupby("run"))) if not data.epochs.empty else {}
    frame["time_to_target_s"] = [
        time_to_target(epochs.get(r.run), by_comparison.loc[(r.model, r.dataset, r.k), task.target.column],
                       task.target)
        for r, task in zip(frame.itertuples(), kinds)]
    return frame


def run_memory(run: results.Run) -> dict:
    """Largest and summed per-module peak (bytes) of one run from summary.json: accounted, and the CUDA
    allocator's peak allocated where every module has it (NaN where the summary has no modules)."""
    modules = run.summary.get("modules") or []
    accounted = [m["accounted_peak_bytes"] for m in modules if m.get("accounted_peak_bytes") is not None]
    if not run.accounts_activations:
        accounted = []  # the method's activations were not accounted: no accounted peak to compare
    cuda = [m[CUDA_KEY] for m in modules if m.get(CUDA_KEY) is not None]
    has_cuda = bool(modules) and len(cuda) == len(modules)
    return {"accounted_largest": max(accounted) if accounted else math.nan,
            "accounted_sum": sum(accounted) if accounted else math.nan,
            "cuda_largest": max(cuda) if has_cuda else math.nan,
            "cuda_sum": sum(cuda) if has_cuda else math.nan}


def time_to_target(epochs: pd.DataFrame | None, target: float, rule: tasks.Target) -> float:
    """Training seconds up to the end of the first epoch whose ``rule.epoch_column`` reaches ``target`` (at or
    above it, or at or below it for a figure where lower is better); NaN: none did, or there is no target."""
    if epochs is None or pd.isna(target) or rule.epoch_column not in epochs.columns:
        return math.nan
    values = pd.to_numeric(epochs[rule.epoch_column])  # an epoch without the figure (None, NaN) reaches nothing
    reached = epochs[rule.reached(values, target)].sort_values("epoch")
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
    task = tasks.named(group["task"].iloc[0])  # a row is one comparison's: one task
    return {
        **dict(zip(ROW, key)),
        "runs": len(group),
        "memory_source": source,
        "peak_mib_largest_device": largest.mean() / results.MIB,
        "peak_mib_all_devices": total.mean() / results.MIB,
        f"{task.quality.stem}_mean": group[task.quality.stem].mean(),
        f"{task.quality.stem}_std": group[task.quality.stem].std(),  # NaN for one run: no spread
        **{f"{m.stem}_mean": group[m.stem].mean() for m in task.verdict_extras},
        "time_to_target_s": times.mean() if len(times) else math.nan,
        "runs_reached": len(times),
    }


# --- the table as text ----------------------------------------------------------------------------

def one_name(names: pd.Series) -> str:
    """The reference label the column headers name: the one label every comparison that has a reference
    shares (comparisons without one show dashes), else a generic name."""
    present = set(names.dropna())
    return present.pop() if len(present) == 1 else REFERENCE


def task_of(numbers: pd.DataFrame) -> tasks.Task:
    """The one task of ``numbers``' rows (``table``'s, or a part of it); a frame without a task column is the
    default task's. Several: a ValueError, as one table never mixes them (see ``dbench.task.split``)."""
    kinds = set(numbers["task"]) if "task" in numbers.columns else set()
    if len(kinds) > 1:
        raise ValueError(f"verdict rows of several tasks ({', '.join(sorted(kinds))}): split them with dbench.task.split")
    return tasks.named(kinds.pop()) if kinds else tasks.default()


def csv_numbers(numbers: pd.DataFrame, task: tasks.Task) -> pd.DataFrame:
    """One task's rows of ``table`` with the columns that task fills: other tasks' columns left out, and the
    task named unless it is the default (a classification's CSV as it always was)."""
    mine = set(task_columns(task))
    drop = [c for c in _every_task_column() if c not in mine] + (["task"] if task.default else [])
    out = numbers.drop(columns=[c for c in drop if c in numbers.columns])
    return out if task.default else out.assign(task=task.kind)


def quality_columns(task: tasks.Task, reference: str) -> tuple[str, str, str]:
    """The names of the quality, Δ and target columns of ``shown`` for tables of ``task``."""
    return task.quality.name, task.quality.delta.format(reference=reference), task.target.shown


def shown(numbers: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as text cells, one row per row of ``numbers`` (``table``'s, all of one task: see
    ``dbench.task.split``: a data set is one task, so a comparison is never split), with that task's quality
    columns (a language model's in bits per byte)."""
    task = task_of(numbers)
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
    q, rule = task.quality, task.target
    quality, delta, target = quality_columns(task, error_ref)
    out[quality] = [tables.mean_std(m, s, n, q.digits) for m, s, n in
                    zip(numbers[f"{q.stem}_mean"], numbers[f"{q.stem}_std"], numbers["runs"])]
    out[delta] = numbers[f"{q.short}_vs_reference"].map(lambda v: signed(v, q.digits))
    out[target] = (numbers[rule.column] * rule.scale).map(lambda v: tables.num(v, rule.digits))
    targets = numbers[rule.column]
    out["time to target (s)"] = [time_cell(r.time_to_target_s, r.runs_reached, r.runs, t)
                                 for r, t in zip(numbers.itertuples(), targets)]
    return out


def _speedup(value, ideal, parallel: bool) -> str:
    if not parallel:
        return speed.NOT_PARALLEL
    return f"{tables.num(value)} ({tables.num(ideal)})"


def signed(value, digits: int = 2) -> str:
    """A difference with its sign: +1.25, -0.50, 0.00 (a dash where there is none)."""
    text = tables.num(value, digits)
    return text if text == tables.DASH or text.strip("-0.") == "" or text.startswith("-") else "+" + text


def time_cell(seconds, reached: int, runs: int, target) -> str:
    if pd.isna(target):
        return tables.DASH
    if reached == 0:
        return NOT_REACHED
    if reached < runs:
        return f"{tables.num(seconds)} ({reached} of {runs} seeds)"
    return tables.num(seconds)


def caption(numbers: pd.DataFrame, targets: dict | None = None, **given) -> str:
    """Defines every column of ``shown`` (``numbers`` all of one task)."""
    common, quality = _caption_parts(numbers, task_of(numbers), check_targets(targets, **given))
    return common + quality


def _caption_parts(numbers: pd.DataFrame, task: tasks.Task, targets: dict[str, float | None]) -> tuple[str, str]:
    """The caption's definitions of the columns every table has, and of ``task``'s quality columns."""
    speed_ref, error_ref = one_name(numbers["baseline"]), one_name(numbers["reference"])
    memory = ("memory: where the bytes come from, the CUDA allocator's peak allocated bytes where every run of the "
              "row has them, else summary.json's accounted bytes"
              if (numbers["memory_source"] == CUDA).any() else "from summary.json's accounted bytes")
    common = (
        "One row per method (the method with its non-default options, and its layout K×D where it has D > 1 "
        "replicas of K modules) in each comparison (model, data set, N devices), "
        "and per engine and batch (size) its runs used. seeds: runs averaged. s/epoch: training seconds per "
        f"epoch, mean over seeds (σ probes included). × {speed_ref} (ideal): {speed_ref}'s seconds per epoch at "
        "the same model, data set, N devices, engine and batch size over the method's, with ALGORITHMS.md's ideal "
        f"in brackets (a K×D layout's: the method's at K times D); {speed.NOT_PARALLEL}: the local engine on N > 1 "
        "devices, which runs the modules one after another, "
        "or modules that shared one GPU. "
        "fastest exact: the exact-gradient baseline with the fewest seconds per epoch measured on the same devices "
        "(bp on one device, or ddp, gpipe, 1f1b and bp's K×D layouts on the same N devices); × fastest exact "
        "(ideal): its seconds per epoch "
        "over the method's, with the ratio of the two ideals in brackets. peak MiB, largest device: the largest "
        "device's peak (module k of replica d on device d·K + k; MiB = 2^20 bytes); peak MiB, all devices: the sum of every "
        f"module's peak; both mean over seeds; {memory}. ")
    dashes = (f"{tables.DASH}: no such number (no reference run, no exact baseline, no closed-form ideal).")
    rule, given = task.target, targets.get(task.target.keyword)
    target = (f"the {rule.given_name} given ({rule.option} {given:g})" if given is not None else
              f"{rule.factor:g} × {error_ref}'s {rule.reference_name} in the same comparison")
    return common, task.verdict_caption(error_ref, target, NOT_REACHED, tables.DASH) + dashes


def notes(numbers: pd.DataFrame, targets: dict | None = None, **given) -> list[str]:
    chosen = check_targets(targets, **given)
    out = []
    if (~numbers["parallel"]).any():
        out.append(LOCAL_NOTE)
    columns = [*COMPARISON, "task"] if "task" in numbers.columns else COMPARISON
    without = numbers[numbers["reference"].isna()][columns].drop_duplicates()
    for r in without.itertuples():
        task = tasks.named(getattr(r, "task", None))
        short, rule = task.quality.short, task.target
        what = (f"its Δ {short} is {tables.DASH}" if chosen.get(rule.keyword) is not None
                else f"its Δ {short} and time to target are {tables.DASH} (give {rule.option} for a time)")
        out.append(f"{r.model} · {r.dataset} · N={r.k} devices has no run of a reference method (model-parallel bp): {what}.")
    return out


# Shorter column names and cells for a terminal, so that a comparison fits in about 130 columns.
TERMINAL_NAMES = {"× fastest exact (ideal)": "× exact (ideal)", "peak MiB, largest device": "MiB largest",
                  "peak MiB, all devices": "MiB all", "time to target (s)": "to target (s)"}
TERMINAL_NOT_PARALLEL = "not parallel"
TERMINAL_CUDA = "CUDA"


def _terminal_names(task: tasks.Task, reference: str) -> dict:
    q = task.quality
    return {**TERMINAL_NAMES, q.name: q.terminal or q.name,
            q.delta.format(reference=reference): (q.terminal_delta or q.delta).format(reference=reference)}


def text(numbers: pd.DataFrame, targets: dict | None = None, width: int = 110, **given) -> str:
    """The verdict for a terminal: one aligned block per comparison (each with its task's quality columns),
    then what the columns mean."""
    chosen = check_targets(targets, **given)
    parts = []
    for task, part in tasks.split(numbers):
        cells = shown(part).replace({speed.NOT_PARALLEL: TERMINAL_NOT_PARALLEL, CUDA: TERMINAL_CUDA})
        parts.append((task, part, cells, _terminal_names(task, one_name(part["reference"]))))
    blocks = []
    for (model, dataset, k), _ in numbers.groupby(COMPARISON, sort=False):
        task, part, cells, names = next(p for p in parts if ((p[1]["model"] == model) & (p[1]["dataset"] == dataset)
                                                             & (p[1]["k"] == k)).any())
        group = cells[(part["model"] == model).to_numpy() & (part["dataset"] == dataset).to_numpy()
                      & (part["k"] == k).to_numpy()]
        first = part.loc[group.index[0]]
        header = [f"{model} · {dataset} · N={k} devices"]
        drop = ["model", "data set", "K", task.target.shown]
        # a column with one value for the whole block is said once, in the header
        for column, name in (("engine", "engine"), ("batch", "batch"), ("fastest exact", "fastest exact"),
                             ("memory", "memory")):
            if column in group.columns and group[column].nunique() == 1:
                header.append(f"{name} {group[column].iloc[0]}")
                drop.append(column)
        lines = [" · ".join(header)]
        if pd.notna(first[task.target.column]):
            lines.append(f"target: {task.target.text(first[task.target.column])} ({first['target_from']})")
        lines.append(aligned(group.drop(columns=drop).rename(columns=names)))
        blocks.append("\n".join(lines))
    legend = list(notes(numbers, chosen))
    shorts: dict[str, str] = {}
    # the columns every block has are defined once; then each task's quality columns
    definitions = [_caption_parts(part, task, chosen) for task, part, _, _ in parts]
    if len(parts) == 1:
        legend.append("".join(definitions[0]))
    else:
        legend.append(definitions[0][0] + " ".join(
            f"{task.plural}: {quality}" for (task, _, _, _), (_, quality) in zip(parts, definitions)))
    for task, part, cells, names in parts:
        shorts.update({long: s for long, s in names.items() if long != s and long in cells.columns})
    short = "; ".join(f"{s} = {long}" for long, s in shorts.items())
    legend.append(f"Short names above: {short}; {TERMINAL_NOT_PARALLEL} = {speed.NOT_PARALLEL}; "
                  f"memory {TERMINAL_CUDA} = {CUDA}.")
    return "\n\n".join(blocks + [textwrap.fill(line, width) for line in legend]) + "\n"


def aligned(frame: pd.DataFrame) -> str:
    """Plain columns: the first left-aligned, the others right-aligned, two spaces apart, a rule under the
    names. Written here rather than with ``DataFrame.to_string``: that aligns every header one way (here the
    method names read left-aligned under a left-aligned name, the numbers right-aligned under theirs) and
    draws no rule, which `dbench compare`'s readers (and tests/test_verdict.py) find the rows by."""
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

def build(data: ReportData, out: Path, targets: dict | None = None, **given) -> Section:
    chosen = check_targets(targets, **given)
    section = Section("verdict", TITLE, INTRO)
    numbers = table(data, chosen)
    parts = tasks.split(numbers)
    section.intro = " ".join([INTRO, *(task.verdict_intro for task, _ in parts if task.verdict_intro)])
    section.notes.extend(notes(numbers, chosen))
    for task, part in parts:  # one table per task (its file: verdict/verdict{suffix})
        runs = data.table.merge(part[COMPARISON].drop_duplicates(), on=COMPARISON)["run"]
        section.items.append(tables.write(
            out, "verdict/verdict" + task.suffix, title=task.verdict_title, shown=shown(part),
            numbers=csv_numbers(part, task), runs=runs, caption=caption(part, chosen)))
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


def _label_column(fig, ax, labels: list[tuple[float, float, str]]) -> None:
    """Each point's label in a column right of the plot, at its point's height where it can be, joined to
    the point by a thin line: points of a comparison are often close (the same speed, the same error, the
    methods that never reached the target drawn at one x), and labels beside them would print over each
    other. Labels are spread apart by their own height, from the top down, then moved up as a block if the
    lowest left the plot, so no two overlap (tests/test_figure_text.py checks every report figure)."""
    if not labels:
        return
    # Reserve the column's width (the longest label), let the layout settle, then freeze it: the labels
    # are spaced in the axes' height, which must not change once they are placed.
    longest = max((text for *_, text in labels), key=len)
    room = ax.annotate(longest, (1.0, 0.5), xycoords="axes fraction", xytext=(1.03, 0.5),
                       textcoords="axes fraction", fontsize="small", va="center", annotation_clip=False)
    fig.canvas.draw()
    height = room.get_window_extent(fig.canvas.get_renderer()).height
    room.remove()
    fig.set_layout_engine("none")
    gap = 1.25 * height / ax.get_window_extent().height  # one label's height, in axes fraction, and a margin
    to_axes = ax.transData + ax.transAxes.inverted()
    wanted = sorted(((to_axes.transform((px, py))[1], px, py, text) for px, py, text in labels), reverse=True)
    placed: list[float] = []
    for target, *_ in wanted:  # top down: each at its point's height, or a gap below the label above
        placed.append(min(target, placed[-1] - gap) if placed else min(target, 1.0))
    lift = max(0.0, -placed[-1])  # the lowest below the plot: lift the column, keeping the gaps
    for (_, px, py, text), at in zip(wanted, placed):
        ax.annotate(text, (px, py), xytext=(1.03, at + lift), textcoords="axes fraction", fontsize="small",
                    va="center", ha="left", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 2, "shrinkB": 4})


def _figure(group: pd.DataFrame, keys, data: ReportData, runs, out: Path) -> figures.Figure:
    """x: time to the target (or seconds per epoch where no method reached it), y: best test error (a language
    model's: best test loss in bits per byte); marker area and label: peak memory of the largest device; the
    Pareto front joined by a line."""
    model, dataset, k = keys
    task = task_of(group)
    q, rule = task.quality, task.target
    names = _point_names(group)
    reached = group["time_to_target_s"].notna()
    targets = group[rule.column]
    if reached.any():
        x = group["time_to_target_s"]
        xlabel = f"time to {rule.text(targets.iloc[0])} (s, mean over the seeds that reached it)"
    else:
        x = group["seconds_per_epoch"]
        why = "no target: no reference run" if targets.isna().all() else "no method reached the target"
        xlabel = f"seconds per epoch ({why})"
    y = group[f"{q.stem}_mean"]
    ylabel, quality, better = q.axis, q.words, q.better
    optimal = pareto(x, y)
    mib = group["peak_mib_largest_device"]
    largest = mib.max() if mib.notna().any() else 1.0
    with theme():
        fig = new_figure(9.5, max(5.0, 1.6 + 0.32 * len(group)))  # room for one label line per point
        ax = fig.subplots()
        edge = x[x.notna()].max() * 1.15 if x.notna().any() else 1.0  # where methods that never reached it go
        shown_x = x.fillna(edge) if reached.any() else x
        labels: list[tuple[float, float, str]] = []  # (x, y, label) of each point, placed once all are drawn
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
            labels.append((shown_x[i], y[i], f"{name} · {memory}"))
        front = group[optimal].assign(_x=x[optimal], _y=y[optimal]).sort_values("_x")
        if len(front) > 1:
            ax.plot(front["_x"], front["_y"], color="0.3", linestyle="--", linewidth=1.2,
                    zorder=2, label="Pareto front")
            fig.legend(loc="outside lower right")
        if reached.any() and (~reached).any():
            ax.axvline(x[reached].max() * 1.075, color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.margins(x=0.2, y=0.15)
        fig.suptitle(f"What each method buys: {model} · {dataset} · N={k} devices")
        _label_column(fig, ax, labels)
        listed = ", ".join(names[optimal]) or tables.DASH
        never = ", ".join(names[~reached]) if reached.any() and (~reached).any() else ""
        caption = (f"One point per method: x: {xlabel}; y: its {quality}, mean over seeds; marker area and "
                   "label: peak memory of its largest device (MiB, as in the verdict table). Pareto-optimal (no "
                   f"other point at least as fast and {better}, and better in one)"
                   + (", joined by the dashed line" if len(front) > 1 else "") + f": {listed}." + (f" Hollow, right of the dotted line: never reached the target ({never})."
                                   if never else "")
                   + (" " + LOCAL_NOTE if (~group["parallel"]).any() else ""))
        return save(fig, out, "verdict/" + figures.file_stem(model, dataset, f"k{k}"),
                    title=f"Verdict: {model}, {dataset}, N={k} devices", caption=caption, runs=runs)
