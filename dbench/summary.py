"""A run's summary: computed from its metric rows, written as summary.json, and read back.

``compute`` is what ``dbench run`` writes into summary.json after each epoch;
``read`` and ``status_of`` are the one way every other part (results, suites,
check) reads it back. The pooling rule of the corrected σ (``pooled_sigma``)
lives here once, for the summary and for the report.

This module must not import torch: results.py and the report use it, and they
work where torch is not installed (or slow to import).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from dbench import task as tasks
from dbench.files import SUMMARY, Unreadable, read_object


# The states of a module's wall-clock, as dbench.meters.clock.STATES (a test checks that
# they are the same); repeated here because dbench.meters imports torch.
STATES = ("compute", "wait_input", "wait_grad", "idle", "probe", "comm", "data")
# The CUDA allocator's peaks an epoch's module record holds when the module sat on a GPU.
CUDA_PEAKS = ("cuda_peak_active_bytes", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes")

# The statuses of a run that stopped before its last epoch: what `dbench run --resume` (and a suite) continues.
RESUMABLE = ("running", "interrupted", "failed")


def option_text(value: Any) -> str:
    """A method option's value as it is typed after ``--opt name=`` (true/false, none, numbers as written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def method_variant(config: dict) -> dict[str, str]:
    """The method options of a run (config.json) that differ from its method's defaults, as text.

    Compared as parsed values, so ``normalize=0`` and ``normalize=false`` are one
    variant and an option given at its default value is no variant at all. A
    run recorded before its method's defaults were (``method_facts`` without
    ``default_options``) shows the options as they were typed.
    """
    chosen = config.get("method_options")
    defaults = (config.get("method_facts") or {}).get("default_options")
    if isinstance(chosen, dict) and isinstance(defaults, dict):
        return {k: option_text(v) for k, v in chosen.items() if k not in defaults or defaults[k] != v}
    return {k: str(v) for k, v in (config["run"].get("method_options") or {}).items()}


def method_label(config: dict) -> str:
    """The method with its non-default options, ``dni[normalize=false]``: a variant is not the same experiment
    as the method, so every table, figure and summary.md names it (the method alone when it ran as it comes)."""
    method = config["run"]["method"]
    variant = method_variant(config)
    if not variant:
        return method
    return method + "[" + ",".join(f"{k}={v}" for k, v in sorted(variant.items())) + "]"


def layout_label(modules: int, replicas: int, parallelism: str | None) -> str:
    """`` 2×2`` (K modules × D replicas) after a hybrid's method label; nothing for a method on its N devices as
    it comes (D = 1, or a method whose layout is always whole-model replicas, ddp: parallelism "data")."""
    return f" {modules}×{replicas}" if replicas > 1 and parallelism != "data" else ""


# --- reading -------------------------------------------------------------------------------------

SummaryUnreadable = Unreadable  # what a damaged summary.json raises (the one JSON reader's error)


def read(run_dir: Path) -> dict:
    """The summary.json of the run directory ``run_dir``; SummaryUnreadable (a DbenchError) if missing or corrupt."""
    return read_object(Path(run_dir) / SUMMARY)


def status_of(run_dir: Path) -> str:
    """What is on disk for a run: "missing" without a summary.json, else its status ("unknown" if it has none)."""
    if not (Path(run_dir) / SUMMARY).exists():
        return "missing"
    return read(run_dir).get("status", "unknown")


# --- computing -----------------------------------------------------------------------------------

def epoch_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "epoch"]


def probe_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "probe"]


def compute(rows: list[dict], status: str, epochs: int, error: str | None = None,
            task: dict | None = None) -> dict:
    """summary.json of a run with metric ``rows`` (metrics.jsonl, in order) that plans ``epochs`` epochs.

    ``task`` is the run's config.json "task" (None: the default task, a classification). The task
    (dbench.task) picks the best epoch and adds its own figures (a language model: ``best_test_loss``,
    ``best_test_bpb``, ``final_test_bpb``, ``final_train_bpb``, ``tokens_per_s``); best_test_acc and
    best_test_error are the accuracy at that epoch (a language model's: next-token). A task other than the
    default is named in the summary's ``task``; a classification's summary has none, as before tasks.
    """
    done = epoch_rows(rows)
    kind = tasks.of(task)
    summary: dict[str, Any] = {"status": status, "epochs_done": len(done), "epochs": epochs, **tasks.recorded(kind)}
    if error:
        summary["error"] = error
    if done:
        best = kind.best_epoch(done)  # first epoch among equals
        last = done[-1]
        rates = [r["samples_per_s"] for r in done if r.get("samples_per_s")]
        summary.update(
            best_test_acc=best["test_acc"],
            best_test_error=1 - best["test_acc"],
            best_epoch=best["epoch"],
            final_test_acc=last["test_acc"],
            final_test_loss=last["test_loss"],
            final_train_loss=last["train_loss"],
            final_train_acc=last["train_acc"],
            train_seconds=sum(r["train_seconds"] for r in done),
            seconds=sum(r["epoch_seconds"] for r in done),
            samples_per_s=sum(rates) / len(rates) if rates else None,
        )
        summary.update(kind.summary_fields(best, last, summary["samples_per_s"], tasks.spec_of(task)))
        probes = probe_rows(rows)
        if all("modules" in r for r in done):
            summary["modules"] = module_summary(done, probes)
        network = [p["sigma"] for p in probes if p["sigma"] is not None]
        summary["mean_sigma"] = sum(network) / len(network) if network else None
        network_sums = [[sum(col) for col in zip(*p["sums"])] for p in probes]
        summary["sigma_corrected"] = pooled_corrected_sigma(network_sums)
        summary.update(_interval_fields([s[0] for s in network_sums], [s[2] for s in network_sums]))
    return summary


def module_summary(epochs: list[dict], probes: list[dict]) -> list[dict]:
    """Per module over the whole run: time totals, peak memory (with its breakdown) and mean σ.

    With replicas, one record per device (module k of replica d: ``replica`` names d), and σ is replica 0's
    module k in every replica's record of module k: the replicas hold the same weights and apply the same
    averaged gradient, so replica 0's probe measures each copy's update.
    """
    out = []
    for i, first in enumerate(epochs[0]["modules"]):
        per_epoch = [r["modules"][i] for r in epochs]
        k = first.get("module", i)  # the module within its replica (runs without replicas: its position)
        record = {"module": k, **({"replica": first["replica"]} if "replica" in first else {}),
                  "device": first["device"]}
        for state in STATES:
            # .get: runs recorded before a state existed (comm, data) have no figure for it: 0 s there
            record[f"{state}_s"] = sum(m.get(f"{state}_s", 0.0) for m in per_epoch)
        record.update(module_peak(per_epoch))
        # a module in its warm-up (σ None) made no update: its probe says nothing about its direction
        updated = [p for p in probes if p["modules"][k]["sigma"] is not None]
        sigmas = [p["modules"][k]["sigma"] for p in updated]
        cosines = [p["modules"][k]["cosine"] for p in updated if p["modules"][k]["cosine"] is not None]
        record["mean_sigma"] = sum(sigmas) / len(sigmas) if sigmas else None
        record["sigma_corrected"] = pooled_corrected_sigma([p["sums"][k] for p in updated])
        record.update(_interval_fields([p["sums"][k][0] for p in updated], [p["sums"][k][2] for p in updated]))
        record["mean_cosine"] = sum(cosines) / len(cosines) if cosines else None
        record["sigma_probes"] = len(sigmas)
        out.append(record)
    return out


def _interval_fields(dots: list[float], crosses: list[float]) -> dict:
    """``sigma_corrected_ci`` ([low, high], or None) and ``sigma_too_noisy`` for a summary record."""
    interval = sigma_interval(dots, crosses)
    return {"sigma_corrected_ci": list(interval) if interval else None, "sigma_too_noisy": too_noisy(interval)}


def module_peak(per_epoch: list[dict]) -> dict:
    """One module's peak memory over its epoch records (each epoch's ``modules[k]``).

    The accounted peak and its breakdown by category come from the epoch with
    the largest ``accounted_peak_bytes`` (the first among equals); each CUDA
    peak is the largest over the epochs.
    """
    peak = max(per_epoch, key=lambda m: m["accounted_peak_bytes"])
    record = {"accounted_peak_bytes": peak["accounted_peak_bytes"], "accounted_bytes": peak["accounted_bytes"]}
    for name in CUDA_PEAKS:
        if name in per_epoch[0]:
            record[name] = max(m[name] for m in per_epoch)
    return record


# --- the corrected σ, pooled over probes ---------------------------------------------------------

def pooled_corrected_sigma(sums: list[list[float]]) -> float | None:
    """Σ<∇,g> / Σ<∇_A,∇_B> over probes, each given as its sums (<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²).

    The noise-corrected σ of a run or a module (see dbench.meters.sigma).
    """
    return pooled_sigma([s[0] for s in sums], [s[2] for s in sums])


def pooled_sigma(dots: Iterable[float], crosses: Iterable[float]) -> float | None:
    """The pooling rule: Σ dot / Σ cross over the probes whose cross term counts (``counts``); see ``ratio``.

    Give only probes at which the module made an update (σ not None): a module
    in its warm-up has nothing to compare.
    """
    pairs = [(d, c) for d, c in zip(dots, crosses) if counts(c)]
    return ratio(sum(d for d, _ in pairs), sum(c for _, c in pairs), len(pairs))


def counts(cross: float | None) -> bool:
    """Whether a probe enters the pooled σ: its cross term <∇_A,∇_B> is a finite number.

    A non-finite cross term (a probe half whose gradient overflowed) would turn
    the whole sum into inf or NaN.
    """
    return cross is not None and math.isfinite(cross)


def ratio(dot_sum: float, cross_sum: float, usable: int) -> float | None:
    """The pooled σ from the sums over ``usable`` counted probes: None when there is none, or Σ cross ≤ 0.

    Σ cross estimates ||∇f||² without the probe's noise; at or below 0 the
    noise swamps it and no ratio means anything.
    """
    return dot_sum / cross_sum if usable and cross_sum > 0 else None


# How wide the 95% interval of the corrected σ may be before a run cannot tell σ = 1 (an exact gradient)
# from σ = 0 (no descent): then the probe set is too small for this run, and the summary says so.
TOO_NOISY_WIDTH = 1.0
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def sigma_interval(dots: Iterable[float], crosses: Iterable[float]) -> tuple[float, float] | None:
    """A 95% confidence interval of the pooled σ = Σ dot / Σ cross, over the probes that count.

    The probes are treated as independent draws of (dot, cross) and the ratio
    of their means by the delta method: its standard error is the sample
    standard deviation of the residuals dot_i − σ·cross_i over √n, divided by
    the mean cross term. None with fewer than two probes or no positive Σ cross.
    """
    pairs = [(d, c) for d, c in zip(dots, crosses) if counts(c)]
    n = len(pairs)
    if n < 2:
        return None
    centre = ratio(sum(d for d, _ in pairs), sum(c for _, c in pairs), n)
    if centre is None:
        return None
    residuals = [d - centre * c for d, c in pairs]
    mean_residual = sum(residuals) / n
    spread = math.sqrt(sum((r - mean_residual) ** 2 for r in residuals) / (n - 1))
    half = Z95 * spread / math.sqrt(n) / (sum(c for _, c in pairs) / n)
    return centre - half, centre + half


def too_noisy(interval: tuple[float, float] | None) -> bool:
    """Whether the corrected σ's interval is missing or wider than TOO_NOISY_WIDTH: too few probe samples."""
    return interval is None or interval[1] - interval[0] > TOO_NOISY_WIDTH
