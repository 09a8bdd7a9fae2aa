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

A language-model comparison (its runs' config.json "task" says "language
model": byte-level text) measures quality by the test loss instead: best test
loss in bits per byte (the lowest epoch's mean cross-entropy per byte / ln 2),
its difference from the reference's in bits per byte, and the time to a target
loss (``--target-loss``, or 1.01 × the reference's mean best bits per byte). A
data set is one task, so each comparison has one kind; tables that would mix
kinds are written once per kind (``verdict`` and ``verdict-lm``).

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
from dbench.summary import CLASSIFICATION, LANGUAGE_MODEL
from dbench.report import figures, speed, tables
from dbench.report.figures import new_figure, save, theme
from dbench.report.section import ReportData, Section

COMPARISON = ["model", "dataset", "k"]
ROW = [*COMPARISON, "engine", "batch_size", "method"]  # speed.summarize's rows; its "method" is the label
DEFAULT_SHARE = 0.99  # the default target: this share of the reference's mean best test accuracy
DEFAULT_LOSS_FACTOR = 1.01  # a language model's default target: this times the reference's mean best test bpb
BPB_DIGITS = 3  # bits per byte are shown to 3 decimals: 0.01 bpb is a difference between methods that matters
NOT_REACHED = "not reached"
ACCOUNTED = "accounted"
CUDA = "CUDA peak allocated"
CUDA_KEY = "cuda_peak_allocated_bytes"  # as dbench.check compares on GPUs
REFERENCE = "the reference"  # said where comparisons have different reference labels, or none

TITLE = "Verdict: which method buys what"
INTRO = ("Per model, data set and K, what each method buys and costs: seconds per epoch and speedups (each beside "
         "its ideal), peak memory of the largest device and of all devices, best test error and its difference "
         "from model-parallel BP's, and the training time until the test accuracy reaches a target.")
LM_INTRO = ("For a language model (byte-level text) quality is the test loss in bits per byte (the mean "
            "cross-entropy per byte / ln 2, lower is better) instead of the error, and the time is until the test "
            "loss first falls to a target: its own table (verdict-lm).")
LOCAL_NOTE = ("Local engine at K > 1: the modules ran one after another, so its seconds per epoch and its time to "
              "accuracy are total compute, not the time K devices working at once take.")


def check_target(target_acc: float | None) -> None:
    """A target accuracy must be a fraction in (0, 1]; None means the default."""
    if target_acc is None:
        return
    if not 0 < target_acc <= 1:  # NaN fails this too
        raise DbenchError(f"--target-acc {target_acc} is not a test accuracy in (0, 1]: give e.g. 0.9 for 90%")


def target_loss_problem(target_loss: float) -> str | None:
    """Why ``target_loss`` is no target test loss (a finite number of bits per byte above 0); None if it is one."""
    if isinstance(target_loss, bool) or not isinstance(target_loss, (int, float)) \
            or not (math.isfinite(target_loss) and target_loss > 0):
        return (f"{target_loss} is not a test loss in bits per byte: give a finite number above 0, "
                "e.g. 1.5")
    return None


def check_target_loss(target_loss: float | None) -> None:
    """A language model's target test loss must be a finite number of bits per byte above 0; None: the default."""
    if target_loss is None:
        return
    problem = target_loss_problem(target_loss)
    if problem:
        raise DbenchError(f"--target-loss {problem}")


# --- the numbers ----------------------------------------------------------------------------------

def table(data: ReportData, target_acc: float | None = None, target_loss: float | None = None) -> pd.DataFrame:
    """One row per comparison (model, data set, K) and method label (and engine, batch size).

    Columns: speed.summarize's (``seconds_per_epoch``, ``speedup_epoch_time``, ``ideal_speedup``,
    ``fastest_exact``, ``speedup_vs_exact``, ``ideal_vs_exact``, ``parallel``, ...), then
    ``runs``, ``memory_source``, ``peak_mib_largest_device``, ``peak_mib_all_devices``,
    ``best_test_error_mean``/``_std`` (%), ``reference`` (the comparison's reference label),
    ``error_vs_reference`` (percentage points), ``target_acc``, ``target_from``, ``time_to_target_s``
    (mean over the runs that reached the target) and ``runs_reached``.

    ``task`` is the comparison's kind. A language model's rows also have ``best_test_bpb_mean``/``_std``
    (bits per byte), ``best_test_acc_mean`` (%, the next-token accuracy at the best epoch),
    ``reference_bpb_mean``, ``bpb_vs_reference`` and ``target_bpb`` (``target_from`` says where it came
    from); their ``time_to_target_s`` is to that test loss, and ``target_acc`` is NaN. ``target_acc``
    applies to classification comparisons only, ``target_loss`` (bits per byte) to language models only.
    """
    check_target(target_acc)
    check_target_loss(target_loss)
    targets = _targets(data.table, target_acc, target_loss)
    per_run = _per_run(data, targets)
    # dropna=False: a run without a batch size still gets its row here (speed.summarize leaves it out)
    rows = pd.DataFrame([_row(key, group) for key, group in per_run.groupby(ROW, sort=True, dropna=False)])
    numbers = speed.summarize(data.table).merge(rows, on=ROW, how="left", validate="one_to_one")
    numbers = numbers.merge(targets, on=COMPARISON, how="left", validate="many_to_one")
    numbers["error_vs_reference"] = numbers["best_test_error_mean"] - numbers["reference_error_mean"]
    numbers["bpb_vs_reference"] = numbers["best_test_bpb_mean"] - numbers["reference_bpb_mean"]
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


def comparison_kind(group: pd.DataFrame) -> str:
    """The task of a comparison's runs (runs_frame rows): a data set is one task, so they share it; a run
    without a task column is a classification."""
    kinds = set(group["task"]) if "task" in group.columns else {CLASSIFICATION}
    return LANGUAGE_MODEL if kinds == {LANGUAGE_MODEL} else CLASSIFICATION


def _targets(table: pd.DataFrame, target_acc: float | None, target_loss: float | None = None) -> pd.DataFrame:
    """Per comparison: its task, its reference label, the reference's mean best test error (%) or, for a language
    model, mean best test bits per byte, and the target accuracy or test loss (bits per byte) with where it comes
    from (NaN and None: no target)."""
    rows = []
    for (model, dataset, k), group in table.groupby(COMPARISON, sort=True):
        kind = comparison_kind(group)
        reference = _reference_label(group)
        of_reference = group["label"] == reference
        ref_error = group.loc[of_reference, "best_test_error"].mean() * 100 if reference else math.nan
        ref_bpb, target_bpb = math.nan, math.nan
        if kind == LANGUAGE_MODEL:
            target = math.nan  # no accuracy target: a language model's quality is its test loss
            ref_bpb = group.loc[of_reference, "best_test_bpb"].astype(float).mean() if reference else math.nan
            if target_loss is not None:
                target_bpb, source = target_loss, f"--target-loss {target_loss:g}"
            elif reference is not None and not math.isnan(ref_bpb):
                target_bpb = DEFAULT_LOSS_FACTOR * ref_bpb
                source = f"{DEFAULT_LOSS_FACTOR:g} × {reference}'s mean best test bits per byte"
            else:
                source = None
        elif target_acc is not None:
            target, source = target_acc, f"--target-acc {target_acc:g}"
        elif reference is not None:
            target = DEFAULT_SHARE * (1 - ref_error / 100)  # the mean best accuracy is 1 - the mean best error
            source = f"{DEFAULT_SHARE:g} × {reference}'s mean best test accuracy"
        else:
            target, source = math.nan, None
        rows.append({"model": model, "dataset": dataset, "k": k, "task": kind, "reference": reference,
                     "reference_error_mean": ref_error, "target_acc": target, "reference_bpb_mean": ref_bpb,
                     "target_bpb": target_bpb, "target_from": source})
    return pd.DataFrame(rows)


def _per_run(data: ReportData, targets: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its row key, best test error (%), peak memory (both kinds) and time to the target."""
    t = data.table
    frame = pd.DataFrame({c: t[c] for c in ("run", *COMPARISON, "engine", "batch_size", "seed")})
    frame["method"] = t["label"]
    frame["best_test_error_pct"] = t["best_test_error"].astype(float) * 100
    frame["best_test_bpb"] = (t["best_test_bpb"] if "best_test_bpb" in t.columns else math.nan)
    frame["best_test_bpb"] = frame["best_test_bpb"].astype(float)  # None (a classification) → NaN
    memory = pd.DataFrame([{"run": run.name, **run_memory(run)} for run in data.runs])
    frame = frame.merge(memory, on="run", how="left", validate="one_to_one")
    by_comparison = targets.set_index(COMPARISON)
    epochs = dict(tuple(data.epochs.groupby("run"))) if "test_acc" in data.epochs.columns else {}
    times = []
    for r in frame.itertuples():
        target = by_comparison.loc[(r.model, r.dataset, r.k)]
        if target["task"] == LANGUAGE_MODEL:
            times.append(time_to_target_loss(epochs.get(r.run), target["target_bpb"]))
        else:
            times.append(time_to_target(epochs.get(r.run), target["target_acc"]))
    frame["time_to_target_s"] = times
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


def time_to_target(epochs: pd.DataFrame | None, target: float) -> float:
    """Training seconds up to the end of the first epoch whose test accuracy reaches ``target`` (NaN: none did,
    or there is no target)."""
    if epochs is None or math.isnan(target):
        return math.nan
    acc = pd.to_numeric(epochs["test_acc"])  # an epoch without a test accuracy (None) reaches nothing
    reached = epochs[acc >= target].sort_values("epoch")
    return float(reached["wall_seconds"].iloc[0]) if len(reached) else math.nan


def time_to_target_loss(epochs: pd.DataFrame | None, target_bpb: float) -> float:
    """Training seconds up to the end of the first epoch whose test loss, in bits per byte, is at or below
    ``target_bpb`` (NaN: none was, or there is no target)."""
    if epochs is None or math.isnan(target_bpb) or "test_bpb" not in epochs.columns:
        return math.nan
    bpb = pd.to_numeric(epochs["test_bpb"])  # an epoch without a test loss (None, NaN) reaches nothing
    reached = epochs[bpb <= target_bpb].sort_values("epoch")
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
        "best_test_acc_mean": 100 - group["best_test_error_pct"].mean(),  # a language model's: next-token
        "best_test_bpb_mean": group["best_test_bpb"].mean(),  # NaN for a classification
        "best_test_bpb_std": group["best_test_bpb"].std(),
        "time_to_target_s": times.mean() if len(times) else math.nan,
        "runs_reached": len(times),
    }


# --- the table as text ----------------------------------------------------------------------------

def one_name(names: pd.Series) -> str:
    """The reference label the column headers name: the one label every comparison that has a reference
    shares (comparisons without one show dashes), else a generic name."""
    present = set(names.dropna())
    return present.pop() if len(present) == 1 else REFERENCE


def kind_of(numbers: pd.DataFrame) -> str:
    """The one task of ``numbers``' rows (``table``'s, or a part of it); a frame without a task column holds
    classifications. Several kinds: a ValueError, as one table never mixes them (see ``by_kind``)."""
    kinds = set(numbers["task"]) if "task" in numbers.columns else {CLASSIFICATION}
    if len(kinds) > 1:
        raise ValueError(f"verdict rows of several tasks ({', '.join(sorted(kinds))}): split them with by_kind")
    return kinds.pop() if kinds else CLASSIFICATION


def by_kind(numbers: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``numbers`` split by task, classification first: each part is shown as a table of its own, with its own
    quality columns (a data set is one task, so a comparison is never split)."""
    if "task" not in numbers.columns:
        return [(CLASSIFICATION, numbers)]
    return [(kind, numbers[numbers["task"] == kind]) for kind in (CLASSIFICATION, LANGUAGE_MODEL)
            if (numbers["task"] == kind).any()]


# the columns of table() that only one kind's rows fill: left out of the other kind's CSV
LM_ONLY = ["task", "best_test_acc_mean", "best_test_bpb_mean", "best_test_bpb_std", "reference_bpb_mean",
           "target_bpb", "bpb_vs_reference"]
CLASSIFICATION_ONLY = ["best_test_error_mean", "best_test_error_std", "reference_error_mean", "target_acc",
                       "error_vs_reference"]


def csv_numbers(numbers: pd.DataFrame, kind: str) -> pd.DataFrame:
    """One kind's rows of ``table`` with the columns that kind fills (a classification's as they always were)."""
    drop = LM_ONLY if kind == CLASSIFICATION else [c for c in CLASSIFICATION_ONLY if c != "best_test_error_mean"]
    out = numbers.drop(columns=[c for c in drop if c in numbers.columns])
    if kind == LANGUAGE_MODEL:
        out = out.drop(columns=["best_test_error_mean"]).assign(task=LANGUAGE_MODEL)
    return out


def quality_columns(kind: str, reference: str) -> tuple[str, str, str]:
    """The names of the quality, Δ and target columns of ``shown`` for tables of ``kind``."""
    if kind == LANGUAGE_MODEL:
        return "best test bpb", f"Δ bpb vs {reference}", "target bpb"
    return "best test error %", f"Δ error vs {reference} (pp)", "target acc %"


def shown(numbers: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as text cells, one row per row of ``numbers`` (``table``'s, all of one task: see
    ``by_kind``). A language model's quality columns are in bits per byte."""
    kind = kind_of(numbers)
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
    quality, delta, target = quality_columns(kind, error_ref)
    if kind == LANGUAGE_MODEL:
        out[quality] = [tables.mean_std(m, s, n, BPB_DIGITS) for m, s, n in
                        zip(numbers["best_test_bpb_mean"], numbers["best_test_bpb_std"], numbers["runs"])]
        out[delta] = numbers["bpb_vs_reference"].map(lambda v: signed(v, BPB_DIGITS))
        out[target] = numbers["target_bpb"].map(lambda v: tables.num(v, BPB_DIGITS))
        targets = numbers["target_bpb"]
    else:
        out[quality] = [tables.mean_std(m, s, n) for m, s, n in
                        zip(numbers["best_test_error_mean"], numbers["best_test_error_std"], numbers["runs"])]
        out[delta] = numbers["error_vs_reference"].map(signed)
        out[target] = (numbers["target_acc"] * 100).map(tables.num)
        targets = numbers["target_acc"]
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


def caption(numbers: pd.DataFrame, target_acc: float | None, target_loss: float | None = None) -> str:
    """Defines every column of ``shown`` (``numbers`` all of one task)."""
    common, quality = _caption_parts(numbers, kind_of(numbers), target_acc, target_loss)
    return common + quality


def _caption_parts(numbers: pd.DataFrame, kind: str, target_acc: float | None,
                   target_loss: float | None) -> tuple[str, str]:
    """The caption's definitions of the columns every table has, and of ``kind``'s quality columns."""
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
    if kind == LANGUAGE_MODEL:
        quality, delta, target_name = quality_columns(kind, error_ref)
        target = (f"the test loss given (--target-loss {target_loss:g})" if target_loss is not None else
                  f"{DEFAULT_LOSS_FACTOR:g} × {error_ref}'s mean best test bits per byte in the same comparison")
        return common, (
            f"{quality}: the best epoch's (lowest) test loss in bits per byte (the mean cross-entropy per byte in "
            f"nats / ln 2; a byte-level language model), mean ± sample standard deviation over seeds. {delta}: the "
            f"method's mean minus {error_ref}'s in the same comparison, in bits per byte (negative: a better "
            f"model). {target_name}: {target}. time to target (s): training seconds (evaluation left out) up to "
            "the end of the first epoch whose test loss is at or below the target, mean over the seeds that "
            f"reached it (k of n seeds where not all did); {NOT_REACHED}: no seed did. " + dashes)
    target = (f"the accuracy given (--target-acc {target_acc:g})" if target_acc is not None else
              f"{DEFAULT_SHARE:g} × {error_ref}'s mean best test accuracy in the same comparison")
    return common, (
        f"best test error %: the best epoch's test error, mean ± "
        f"sample standard deviation over seeds. Δ error vs {error_ref} (pp): the method's mean minus "
        f"{error_ref}'s in the same comparison, in percentage points (negative: more accurate). target acc %: "
        f"{target}. time to target (s): training seconds (evaluation left out) up to the end of the first epoch "
        "whose test accuracy reaches the target, mean over the seeds that reached it (k of n seeds where not all "
        f"did); {NOT_REACHED}: no seed did. " + dashes)


def notes(numbers: pd.DataFrame, target_acc: float | None, target_loss: float | None = None) -> list[str]:
    out = []
    if (~numbers["parallel"]).any():
        out.append(LOCAL_NOTE)
    columns = [*COMPARISON, "task"] if "task" in numbers.columns else COMPARISON
    without = numbers[numbers["reference"].isna()][columns].drop_duplicates()
    for r in without.itertuples():
        if getattr(r, "task", CLASSIFICATION) == LANGUAGE_MODEL:
            what = (f"its Δ bpb is {tables.DASH}" if target_loss is not None
                    else f"its Δ bpb and time to target are {tables.DASH} (give --target-loss for a time)")
        else:
            what = (f"its Δ error is {tables.DASH}" if target_acc is not None
                    else f"its Δ error and time to target are {tables.DASH} (give --target-acc for a time)")
        out.append(f"{r.model} · {r.dataset} · N={r.k} devices has no run of a reference method (model-parallel bp): {what}.")
    return out


KIND_NAMES = {CLASSIFICATION: "Classifications", LANGUAGE_MODEL: "Language models"}

# Shorter column names and cells for a terminal, so that a comparison fits in about 130 columns.
TERMINAL_NAMES = {"× fastest exact (ideal)": "× exact (ideal)", "peak MiB, largest device": "MiB largest",
                  "peak MiB, all devices": "MiB all", "best test error %": "error %",
                  "best test bpb": "bpb", "time to target (s)": "to target (s)"}
TERMINAL_NOT_PARALLEL = "not parallel"
TERMINAL_CUDA = "CUDA"


def _terminal_names(columns) -> dict:
    names = dict(TERMINAL_NAMES)
    for column in columns:
        if column.startswith("Δ error vs "):
            names[column] = column.replace("Δ error vs ", "Δ vs ").replace(" (pp)", "")
        elif column.startswith("Δ bpb vs "):
            names[column] = column  # short already
    return names


def text(numbers: pd.DataFrame, target_acc: float | None = None, width: int = 110,
         target_loss: float | None = None) -> str:
    """The verdict for a terminal: one aligned block per comparison (each with its task's quality columns),
    then what the columns mean."""
    parts = []
    for kind, part in by_kind(numbers):
        cells = shown(part).replace({speed.NOT_PARALLEL: TERMINAL_NOT_PARALLEL, CUDA: TERMINAL_CUDA})
        parts.append((kind, part, cells, _terminal_names(cells.columns)))
    blocks = []
    for (model, dataset, k), _ in numbers.groupby(COMPARISON, sort=False):
        kind, part, cells, names = next(p for p in parts if ((p[1]["model"] == model) & (p[1]["dataset"] == dataset)
                                                             & (p[1]["k"] == k)).any())
        group = cells[(part["model"] == model).to_numpy() & (part["dataset"] == dataset).to_numpy()
                      & (part["k"] == k).to_numpy()]
        first = part.loc[group.index[0]]
        header = [f"{model} · {dataset} · N={k} devices"]
        drop = ["model", "data set", "K", quality_columns(kind, "")[2]]
        # a column with one value for the whole block is said once, in the header
        for column, name in (("engine", "engine"), ("batch", "batch"), ("fastest exact", "fastest exact"),
                             ("memory", "memory")):
            if column in group.columns and group[column].nunique() == 1:
                header.append(f"{name} {group[column].iloc[0]}")
                drop.append(column)
        lines = [" · ".join(header)]
        if kind == LANGUAGE_MODEL and pd.notna(first["target_bpb"]):
            lines.append(f"target: {first['target_bpb']:.{BPB_DIGITS}f} bits per byte test loss "
                         f"({first['target_from']})")
        elif kind != LANGUAGE_MODEL and pd.notna(first["target_acc"]):
            lines.append(f"target: {first['target_acc'] * 100:.2f}% test accuracy ({first['target_from']})")
        lines.append(aligned(group.drop(columns=drop).rename(columns=names)))
        blocks.append("\n".join(lines))
    legend = list(notes(numbers, target_acc, target_loss))
    shorts: dict[str, str] = {}
    # the columns every block has are defined once; then each task's quality columns
    definitions = [_caption_parts(part, kind, target_acc, target_loss) for kind, part, _, _ in parts]
    if len(parts) == 1:
        legend.append("".join(definitions[0]))
    else:
        legend.append(_caption_parts(numbers, CLASSIFICATION, target_acc, target_loss)[0] + " ".join(
            f"{KIND_NAMES[kind]}: {quality}" for (kind, _, _, _), (_, quality) in zip(parts, definitions)))
    for kind, part, cells, names in parts:
        shorts.update({long: s for long, s in names.items() if long != s and long in cells.columns})
    short = "; ".join(f"{s} = {long}" for long, s in shorts.items())
    legend.append(f"Short names above: {short}; {TERMINAL_NOT_PARALLEL} = {speed.NOT_PARALLEL}; "
                  f"memory {TERMINAL_CUDA} = {CUDA}.")
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

# The table's file per task (under the report folder): a report of both kinds has both.
STEMS = {CLASSIFICATION: "verdict/verdict", LANGUAGE_MODEL: "verdict/verdict-lm"}
TABLE_TITLES = {CLASSIFICATION: "What each method buys and costs, per model, data set and K",
                LANGUAGE_MODEL: "What each method buys and costs, per model, data set and K: language models"}


def build(data: ReportData, out: Path, target_acc: float | None = None,
          target_loss: float | None = None) -> Section:
    section = Section("verdict", TITLE, INTRO)
    numbers = table(data, target_acc, target_loss)
    kinds = by_kind(numbers)
    if any(kind == LANGUAGE_MODEL for kind, _ in kinds):
        section.intro = INTRO + " " + LM_INTRO
    section.notes.extend(notes(numbers, target_acc, target_loss))
    for kind, part in kinds:
        runs = data.table.merge(part[COMPARISON].drop_duplicates(), on=COMPARISON)["run"]
        section.items.append(tables.write(
            out, STEMS[kind], title=TABLE_TITLES[kind], shown=shown(part), numbers=csv_numbers(part, kind),
            runs=runs, caption=caption(part, target_acc, target_loss)))
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
    lm = kind_of(group) == LANGUAGE_MODEL
    names = _point_names(group)
    reached = group["time_to_target_s"].notna()
    targets = group["target_bpb"] if lm else group["target_acc"]
    if reached.any():
        x = group["time_to_target_s"]
        if lm:
            xlabel = (f"time to {targets.iloc[0]:.{BPB_DIGITS}f} bits per byte test loss "
                      "(s, mean over the seeds that reached it)")
        else:
            xlabel = f"time to {targets.iloc[0] * 100:.2f}% test accuracy (s, mean over the seeds that reached it)"
    else:
        x = group["seconds_per_epoch"]
        why = "no target: no reference run" if targets.isna().all() else "no method reached the target"
        xlabel = f"seconds per epoch ({why})"
    y = group["best_test_bpb_mean"] if lm else group["best_test_error_mean"]
    ylabel = ("best test loss (bits per byte), mean over seeds" if lm
              else "best test error (%), mean over seeds")
    quality = "best test loss in bits per byte" if lm else "best test error"
    better = "as low a loss" if lm else "as accurate"
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
