"""dbench.summary: summary.json computed from hand-written metric rows, checked against the definitions; read back."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from dbench import summary
from dbench.errors import DbenchError

MODULE_KEYS = ("compute_s", "wait_input_s", "wait_grad_s", "idle_s", "probe_s")


def module(k: int, peak: int, breakdown: dict, seconds: float) -> dict:
    """One module's record in an epoch row; every time state takes ``seconds`` (times k+1, to tell modules apart)."""
    return {"module": k, "device": "cpu", **{key: seconds * (k + 1) for key in MODULE_KEYS},
            "accounted_peak_bytes": peak, "accounted_bytes": breakdown}


def epoch(n: int, test_acc: float, rate: float | None, modules: list[dict]) -> dict:
    return {"kind": "epoch", "epoch": n, "lr": 0.1, "train_loss": 2.0 / n, "train_acc": 0.1 * n, "test_loss": 3.0 / n,
            "test_acc": test_acc, "train_seconds": 1.0 * n, "eval_seconds": 0.5, "epoch_seconds": 1.0 * n + 0.5,
            "warmup_steps": 5, "samples_per_s": rate, "probes": 1, "modules": modules}


def probe(n: int, network_sigma: float | None, parts: list[tuple[float | None, float | None, list[float]]]) -> dict:
    """``parts``: per module (σ, cosine, sums (<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²))."""
    return {"kind": "probe", "epoch": n, "step": 1, "iteration": n, "sigma": network_sigma, "sigma_corrected": None,
            "cosine": None, "sums": [sums for _, _, sums in parts],
            "modules": [{"module": k, "sigma": s, "sigma_corrected": None, "cosine": c, "true_grad_norm": 1.0,
                         "method_grad_norm": 1.0} for k, (s, c, _) in enumerate(parts)]}


INF = float("inf")
ROWS = [
    # epoch 1: module 1 has its largest accounted moment here
    epoch(1, 0.5, 100.0, [module(0, 1000, {"parameters": 1000}, 1.0),
                          module(1, 5000, {"parameters": 4000, "activations": 1000}, 1.0)]),
    # module 0 in its warm-up at the first probe: σ None, no update; its sums count only for the network
    probe(1, 0.25, [(None, None, [0.0, 9.0, 4.0, 0.0]), (0.5, 0.25, [1.0, 4.0, 2.0, 1.0])]),
    # epoch 2: a one-step epoch, no samples/s; module 0 peaks here (3000, the first of two equal peaks)
    epoch(2, 0.75, None, [module(0, 3000, {"parameters": 1000, "stored_inputs": 2000}, 2.0),
                          module(1, 2000, {"parameters": 2000}, 2.0)]),
    # module 1's cross term overflowed: left out of its pooled σ, and of the network's
    probe(2, None, [(0.75, 0.5, [2.0, 3.0, 1.0, 5.0]), (0.75, 0.75, [3.0, 5.0, INF, 1.0])]),
    # epoch 3: the same best accuracy as epoch 2 (the best epoch is the first among equals), module 0 at 3000 again
    epoch(3, 0.75, 300.0, [module(0, 3000, {"parameters": 3000}, 4.0),
                           module(1, 1000, {"parameters": 1000}, 4.0)]),
    probe(3, 0.75, [(0.25, None, [4.0, 6.0, 3.0, 2.0]), (1.0, 0.5, [0.5, 1.0, 2.0, 1.0])]),
]


def test_compute_follows_the_definitions():
    s = summary.compute(ROWS, "complete", 4)
    assert s["status"] == "complete" and s["epochs_done"] == 3 and s["epochs"] == 4 and "error" not in s
    assert s["best_test_acc"] == 0.75 and s["best_epoch"] == 2  # epochs 2 and 3 tie: the first
    assert s["best_test_error"] == 1 - 0.75
    assert (s["final_test_acc"], s["final_test_loss"], s["final_train_loss"], s["final_train_acc"]) == \
           (0.75, 3.0 / 3, 2.0 / 3, 0.1 * 3)
    assert s["train_seconds"] == 1.0 + 2.0 + 3.0 and s["seconds"] == 1.5 + 2.5 + 3.5
    assert s["samples_per_s"] == (100.0 + 300.0) / 2  # over the epochs that measured it
    assert s["mean_sigma"] == (0.25 + 0.75) / 2  # the network σ of probes that have one
    # network sums per probe, summed over modules: (1, 13, 6, 1), (5, 8, inf, 6) left out, (4.5, 7, 5, 3)
    assert s["sigma_corrected"] == (1.0 + 4.5) / (6.0 + 5.0)

    m0, m1 = s["modules"]
    assert m0["module"] == 0 and m1["module"] == 1 and m0["device"] == "cpu"
    for key in MODULE_KEYS:
        assert m0[key] == 1.0 + 2.0 + 4.0 and m1[key] == 2 * (1.0 + 2.0 + 4.0)
    # peak memory: the epoch with the largest accounted peak, the first among equals, with that epoch's breakdown
    assert m0["accounted_peak_bytes"] == 3000 and m0["accounted_bytes"] == {"parameters": 1000, "stored_inputs": 2000}
    assert m1["accounted_peak_bytes"] == 5000 and m1["accounted_bytes"] == {"parameters": 4000, "activations": 1000}
    assert "cuda_peak_active_bytes" not in m0  # a CPU run has no CUDA peaks
    # module 0: the warm-up probe left out of everything σ
    assert m0["sigma_probes"] == 2 and m0["mean_sigma"] == (0.75 + 0.25) / 2
    assert m0["sigma_corrected"] == (2.0 + 4.0) / (1.0 + 3.0)
    assert m0["mean_cosine"] == 0.5  # the one cosine of its updated probes
    # module 1: three probes with σ, the overflowed cross term left out of the pooled σ only
    assert m1["sigma_probes"] == 3 and m1["mean_sigma"] == (0.5 + 0.75 + 1.0) / 3
    assert m1["sigma_corrected"] == (1.0 + 0.5) / (2.0 + 2.0)
    assert m1["mean_cosine"] == (0.25 + 0.75 + 0.5) / 3


def test_compute_before_any_epoch_and_with_an_error():
    assert summary.compute([], "running", 5) == {"status": "running", "epochs_done": 0, "epochs": 5}
    failed = summary.compute(ROWS[:2], "failed", 5, error="RuntimeError: boom")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and failed["epochs_done"] == 1
    assert failed["modules"][0]["sigma_corrected"] is None and failed["modules"][0]["sigma_probes"] == 0


def test_cuda_peaks_are_the_largest_over_epochs():
    rows = [epoch(n, 0.5, None, [{**module(0, peak, {"parameters": peak}, 1.0), "cuda_peak_active_bytes": cuda,
                                  "cuda_peak_allocated_bytes": cuda, "cuda_peak_reserved_bytes": 2 * cuda}])
            for n, peak, cuda in ((1, 10, 700), (2, 20, 500))]
    m = summary.compute(rows, "complete", 2)["modules"][0]
    assert m["accounted_peak_bytes"] == 20  # epoch 2's accounting, epoch 1's larger CUDA peaks
    cuda = (m["cuda_peak_active_bytes"], m["cuda_peak_allocated_bytes"], m["cuda_peak_reserved_bytes"])
    assert cuda == (700, 700, 1400)


def test_pooled_corrected_sigma_is_a_ratio_of_sums_over_usable_probes():
    assert summary.pooled_corrected_sigma([[1.0, 0, 2.0, 0], [3.0, 0, 6.0, 0]]) == 4.0 / 8.0
    assert summary.pooled_corrected_sigma([[1.0, 0, 2.0, 0], [5.0, 0, float("nan"), 0]]) == 0.5
    assert summary.pooled_corrected_sigma([]) is None
    assert summary.pooled_corrected_sigma([[1.0, 0, INF, 0]]) is None  # no usable probe
    assert summary.pooled_corrected_sigma([[1.0, 0, 1.0, 0], [1.0, 0, -1.0, 0]]) is None  # Σ cross ≤ 0
    assert summary.pooled_sigma([1.0, 3.0], [2.0, 6.0]) == summary.ratio(4.0, 8.0, 2) == 0.5


def test_states_are_the_meters_states():
    from dbench.meters import STATES

    assert summary.STATES == STATES


def test_read_and_status_of(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert summary.status_of(run) == "missing"
    with pytest.raises(DbenchError, match=r"summary\.json is missing") as missing:
        summary.read(run)
    assert str(run / "summary.json") in str(missing.value) and "\n" not in str(missing.value)
    (run / "summary.json").write_text('{"status": ')
    with pytest.raises(DbenchError, match=r"summary\.json is not valid JSON \(Expecting value at line 1\)"):
        summary.read(run)
    with pytest.raises(DbenchError, match="not valid JSON"):
        summary.status_of(run)
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(DbenchError, match="is not a JSON object"):
        summary.read(run)
    (run / "summary.json").write_text(json.dumps({"epochs_done": 0}))
    assert summary.status_of(run) == "unknown"
    written = summary.compute(ROWS, "complete", 3)
    (run / "summary.json").write_text(json.dumps(written))
    assert summary.read(run) == written and summary.status_of(run) == "complete"


def test_summary_and_results_do_not_import_torch():
    code = "import dbench.summary, dbench.results, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_sigma_interval_by_the_delta_method_and_the_too_noisy_flag():
    from dbench import summary

    dots, crosses = [1.0, 3.0, 2.0, 2.0], [2.0, 2.0, 1.0, 3.0]
    low, high = summary.sigma_interval(dots, crosses)
    centre = 8.0 / 8.0
    residuals = [d - centre * c for d, c in zip(dots, crosses)]  # -1, 1, 1, -1: mean 0, sample std sqrt(4/3)
    assert statistics.stdev(residuals) == pytest.approx(math.sqrt(4 / 3))
    half = 1.959964 * statistics.stdev(residuals) / math.sqrt(4) / (8.0 / 4)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert summary.too_noisy((low, high)) == (2 * half > 1.0)
    assert summary.sigma_interval([1.0], [1.0]) is None and summary.too_noisy(None)  # one probe: no interval
    assert summary.sigma_interval([1.0, 2.0], [-1.0, 0.5]) is None  # Σ cross <= 0: no ratio at all
    tight = summary.sigma_interval([1.0, 1.01, 0.99, 1.0], [1.0] * 4)
    assert not summary.too_noisy(tight) and tight[0] < 1.0 < tight[1]
