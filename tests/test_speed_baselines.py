"""The speed table against known numbers: speedup over model-parallel BP and over the fastest exact baseline."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from dbench.report.speed import summarize

EXACT, DELAYED = "exact gradient", "delayed gradient"


def row(method, k, engine, seconds, ideal, family=EXACT, reference=False, seed=0, batch=128):
    return {"model": "resnet20", "dataset": "synthetic", "k": k, "engine": engine, "batch_size": batch,
            "label": method, "method_label": method, "method": method, "seed": seed, "seconds_per_epoch": seconds,
            "samples_per_s": 1000.0 / seconds, "table_order": 0.0, "reference": reference, "family": family,
            "ideal_speedup": ideal}


def table():
    return pd.DataFrame([
        row("bp", 2, "distributed", 40.0, 1.0, reference=True),  # model-parallel BP on 2 devices
        row("bp", 1, "local", 24.0, 1.0, reference=True),  # the whole model on one device, both cores
        row("ddp", 2, "distributed", 30.0, 2.0),
        row("gpipe", 2, "distributed", 28.0, 16 / 9),
        row("fr", 2, "distributed", 30.0, 1.5, family=DELAYED),
        row("fr", 2, "distributed", 34.0, 1.5, family=DELAYED, seed=1),  # mean over seeds: 32
        row("ddg", 2, "distributed", 20.0, 2.0, family=DELAYED),
        row("ddg", 2, "local", 50.0, 2.0, family=DELAYED),  # modules in turn: no speedup
        row("ddg", 2, "distributed", 10.0, 2.0, family=DELAYED, batch=64),  # other devices' setting: no exact run
    ])


def test_every_cell_of_both_speedups():
    got = summarize(table()).set_index(["method", "k", "engine", "batch_size"])
    fr = got.loc[("fr", 2, "distributed", 128)]
    assert fr["seconds_per_epoch"] == 32.0 and fr["seeds"] == 2
    assert fr["speedup_epoch_time"] == pytest.approx(40 / 32) and fr["baseline"] == "bp"
    assert fr["ideal_speedup"] == 1.5
    # fastest exact on these devices: bp on one device (24 s) beats gpipe (28) and ddp (30)
    assert fr["fastest_exact"] == "bp (N=1)"
    assert fr["speedup_vs_exact"] == pytest.approx(24 / 32)
    assert fr["ideal_vs_exact"] == pytest.approx(1.5 / 1.0)
    ddg = got.loc[("ddg", 2, "distributed", 128)]
    assert ddg["speedup_epoch_time"] == pytest.approx(2.0) and ddg["speedup_vs_exact"] == pytest.approx(24 / 20)
    gpipe = got.loc[("gpipe", 2, "distributed", 128)]
    assert gpipe["speedup_vs_exact"] == pytest.approx(24 / 28) and gpipe["ideal_vs_exact"] == pytest.approx(16 / 9)
    one = got.loc[("bp", 1, "local", 128)]
    assert one["parallel"] and one["speedup_vs_exact"] == pytest.approx(1.0) and one["fastest_exact"] == "bp (N=1)"
    local = got.loc[("ddg", 2, "local", 128)]
    assert not local["parallel"] and math.isnan(local["speedup_epoch_time"]) and math.isnan(local["speedup_vs_exact"])
    other = got.loc[("ddg", 2, "distributed", 64)]
    assert pd.isna(other["fastest_exact"]) and math.isnan(other["speedup_vs_exact"])
    assert math.isnan(other["speedup_epoch_time"])  # no model-parallel BP at batch 64 either


def test_without_the_one_device_run_the_fastest_on_the_same_k_counts():
    without = table()
    without = without[~((without["label"] == "bp") & (without["k"] == 1))]
    got = summarize(without).set_index(["method", "k", "engine", "batch_size"])
    fr = got.loc[("fr", 2, "distributed", 128)]
    assert fr["fastest_exact"] == "gpipe (N=2)"  # model-parallel BP (40 s) is never the exact baseline
    assert fr["speedup_vs_exact"] == pytest.approx(28 / 32)
    assert fr["ideal_vs_exact"] == pytest.approx(1.5 / (16 / 9))


def test_runs_timed_under_very_different_load_are_flagged():
    from dbench.report.speed import load_warnings

    runs = table().assign(run=[f"r{i}" for i in range(len(table()))], load_avg=2.0, cpu_count=2)
    assert load_warnings(runs) == []
    runs.loc[runs["label"] == "ddg", "load_avg"] = 3.5  # another job shared the machine while ddg ran
    warnings = load_warnings(runs)
    assert len(warnings) == 1 and "resnet20 · synthetic · 128" in warnings[0]
    assert "2.0 to 3.5 on 2 cores" in warnings[0]


def test_modules_sharing_a_gpu_are_not_a_parallel_measurement():
    """K modules on one GPU (--devices cuda:0,cuda:0) time-share it: seconds are shown, no speedup, and a note."""
    from dbench.report.speed import SHARED_NOTE, parallel_measurement

    shared = table().assign(shared_gpu=False)
    shared.loc[(shared["label"] == "ddg") & (shared["batch_size"] == 64), "shared_gpu"] = True
    got = summarize(shared).set_index(["method", "k", "engine", "batch_size"])
    ddg = got.loc[("ddg", 2, "distributed", 64)]
    assert not ddg["parallel"] and ddg["seconds_per_epoch"] == 10.0
    assert math.isnan(ddg["speedup_epoch_time"]) and math.isnan(ddg["speedup_vs_exact"])
    assert got.loc[("ddg", 2, "distributed", 128)]["speedup_epoch_time"] == pytest.approx(2.0)  # the rest as before
    assert list(parallel_measurement(shared)) == [True, True, True, True, True, True, True, False, False]
    assert "time-share" in SHARED_NOTE


@pytest.mark.parametrize("devices,shared", [
    (["cuda:0", "cuda:0"], True), (["cuda", "cuda:0"], True), (["cuda:0", "cuda:1"], False),
    (["cpu", "cpu"], False), (["cuda:0"], False), ([], False),
])
def test_which_runs_shared_a_gpu(devices, shared):
    from dbench.results import _shares_a_gpu

    assert _shares_a_gpu(devices) is shared
