"""Partitions are contiguous, cover every block once, and balance what they claim to."""
from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from dbench.errors import DbenchError
from dbench.partition import (ELEMENT_FLOPS, BlockTime, balance_time, boundary_costs, by_count, count_work,
                              counted_costs, from_cuts, median_seconds, min_max, min_max_by, parse_split, partition,
                              step_costs)
from dbench.registry import METHODS


def assert_valid(ranges, n, k):
    assert len(ranges) == k
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c
    assert all(a < b for a, b in ranges)


@pytest.mark.parametrize("n,k", [(11, 1), (11, 2), (11, 4), (56, 4), (5, 5), (35, 3)])
def test_by_count(n, k):
    ranges = by_count(n, k)
    assert_valid(ranges, n, k)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first modules take the remainder


def brute_force(costs, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_min_max_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    k = rng.randint(1, n)
    costs = [rng.choice([0.0, rng.random() * 10]) for _ in range(n)]
    ranges = min_max(costs, k)
    assert_valid(ranges, n, k)
    assert max(sum(costs[a:b]) for a, b in ranges) == pytest.approx(brute_force(costs, k))


def fr_like(j, a, b, k, costs):
    # a part cost that depends on the part's position: the top part pays once, the others twice
    return sum(costs[a:b]) * (1 if j == k - 1 else 2)


@pytest.mark.parametrize("seed", range(20))
def test_min_max_by_position_dependent_cost_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    k = rng.randint(1, n)
    costs = [rng.random() * 10 for _ in range(n)]
    ranges = min_max_by(n, k, lambda j, a, b: fr_like(j, a, b, k, costs))
    assert_valid(ranges, n, k)
    best = min(
        max(fr_like(j, a, b, k, costs) for j, (a, b) in enumerate(zip(bounds, bounds[1:])))
        for cuts in itertools.combinations(range(1, n), k - 1)
        for bounds in [[0, *cuts, n]]
    )
    assert max(fr_like(j, a, b, k, costs) for j, (a, b) in enumerate(ranges)) == pytest.approx(best)


def test_fr_balances_its_own_step_not_bps():
    """FR's modules below the top run two forwards a step, so its balanced cut gives the top more blocks."""
    times = [BlockTime(1.0, 2.0)] * 8  # backward = 2 forwards, as ALGORITHMS.md's cost model
    fr, bp = METHODS.get("fr").step_cost, METHODS.get("bp").step_cost
    assert balance_time(times, 2, bp) == [(0, 4), (4, 8)]  # 12 | 12
    assert balance_time(times, 2, fr) == [(0, 3), (3, 8)]  # 3·(2+2)=12 | 5·3=15
    assert step_costs(times, [(0, 3), (3, 8)], fr) == [12.0, 15.0]
    assert step_costs(times, [(0, 4), (4, 8)], fr) == [16.0, 12.0]  # BP's cut leaves FR's module 0 the slowest
    for name in ("bp", "ddg", "dfa", "bdfa", "dni"):
        assert METHODS.get(name).step_cost(1.0, 2.0, 0, 2) == 3.0


class Sleepy(nn.Module):
    """A fake block whose forward takes a known time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        time.sleep(self.seconds)
        return x * self.scale


def test_time_split_isolates_the_slow_block():
    blocks = [Sleepy(0.002), Sleepy(0.002), Sleepy(0.002), Sleepy(0.002), Sleepy(0.03)]
    ranges = partition(blocks, 2, "time", sample=torch.ones(2, 3), device=torch.device("cpu"))
    assert ranges == [(0, 4), (4, 5)]
    assert by_count(5, 2) == [(0, 3), (3, 5)]  # what equal counts would have done


def test_time_split_uses_the_method_cost():
    blocks = [Sleepy(0.01) for _ in range(6)]  # forward-only cost: sleeping
    sample, cpu = torch.ones(2, 3), torch.device("cpu")
    assert partition(blocks, 2, "time", sample=sample, device=cpu) == [(0, 3), (3, 6)]
    fr = METHODS.get("fr").step_cost
    assert partition(blocks, 2, "time", sample=sample, device=cpu, step_cost=fr) == [(0, 2), (2, 6)]  # 2·2 | 4


def test_profiling_uses_the_threads_a_cpu_worker_gets(monkeypatch):
    from dbench import plan as run
    from dbench import placement

    from dbench import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "_core_of", lambda cpu: ("0", str(cpu)))
    before = torch.get_num_threads()
    cpu = [torch.device("cpu")] * 4
    with run.profiling_threads("distributed", cpu):
        assert torch.get_num_threads() == 2  # 8 cores shared by 4 module processes
    assert torch.get_num_threads() == before
    with run.profiling_threads("local", cpu):
        assert torch.get_num_threads() == before  # the local engine trains every module in this process
    assert placement.worker_threads(["cuda:0", "cuda:1"]) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_cpus_are_those_the_process_may_use():
    """Under an affinity mask of one CPU (as `taskset -c 0` sets), one CPU is shared out, whatever the machine has."""
    code = "import os; os.sched_setaffinity(0, {0}); from dbench.cpus import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_cpu_modules_get_disjoint_shares_of_the_mask(monkeypatch):
    from dbench import cpus
    from dbench import placement

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {9, 2, 3, 4, 5})
    monkeypatch.setattr(cpus, "_core_of", lambda cpu: ("0", str(cpu)))  # one thread per core
    assert cpus.module_shares(2) == [[2, 3], [4, 5]]  # equal shares; the fifth CPU is left over
    assert cpus.module_shares(5) == [[2], [3], [4], [5], [9]]
    assert cpus.module_shares(6) is None  # fewer CPUs than modules: they share them all, unpinned
    assert placement.worker_cpus(["cpu", "cpu"]) == [[2, 3], [4, 5]]
    assert placement.worker_threads(["cpu", "cpu"]) == 2
    assert placement.worker_cpus(["cuda:0", "cuda:1"]) is None

    # Two threads per core, numbered apart as Linux does on x86 (cpu i and i + 4 are one core's):
    # a module gets whole cores, never one sibling of a core whose other sibling computes for another.
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "_core_of", lambda cpu: ("0", str(cpu % 4)))
    assert cpus.module_shares(2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert cpus.module_shares(4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert cpus.module_shares(8) == [[cpu] for cpu in range(8)]  # more modules than cores: single CPUs
    assert placement.worker_threads(["cpu"] * 3) == 2  # 4 cores // 3 modules: one core (two CPUs) each

    # No affinity mask to read (macOS): no pinning, the machine's CPUs split evenly among the modules.
    monkeypatch.delattr(cpus.os, "sched_getaffinity")
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 8)
    assert placement.worker_cpus(["cpu", "cpu"]) is None and placement.worker_threads(["cpu", "cpu"]) == 4


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_pinned_process_and_its_later_threads_keep_to_their_share():
    """What a CPU module's process does first (launch._worker): pinned, it and the threads it starts after
    (torch's pool, gloo's) run on its share; the run's CPU count stays the whole mask's."""
    code = """
import os, threading
from dbench import cpus
first = min(os.sched_getaffinity(0))
whole = cpus.usable_cpus()
cpus.pin([first])
seen = []
t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
t.start(); t.join()
print(sorted(os.sched_getaffinity(0)) == [first], seen == [[first]], cpus.usable_cpus(), cpus.run_cpus() == whole)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "1", "True"]


def test_params_split_balances_parameters():
    widths = [(4, 64), (64, 64), (64, 64), (64, 4), (4, 4), (4, 4)]  # 320, 4160, 4160, 260, 20, 20 parameters
    blocks = [nn.Linear(a, b) for a, b in widths]
    ranges = partition(blocks, 2, "params")
    assert ranges == [(0, 2), (2, 6)]  # 4480 | 4460
    assert by_count(6, 2) == [(0, 3), (3, 6)]  # 8640 | 300


def test_explicit_cuts_and_errors():
    assert from_cuts([4, 8], 11, 3) == [(0, 4), (4, 8), (8, 11)]
    assert parse_split("4,8") == [4, 8]
    assert parse_split("time") == "time"
    with pytest.raises(DbenchError, match="bad --split 'fast'"):
        parse_split("fast")
    with pytest.raises(DbenchError, match="need 2 cut points"):
        from_cuts([4], 11, 3)
    with pytest.raises(DbenchError, match="increase strictly"):
        from_cuts([8, 4], 11, 3)
    with pytest.raises(DbenchError, match="increase strictly"):
        from_cuts([0, 4], 11, 3)
    with pytest.raises(DbenchError, match=r"\(5 blocks\) into 6 modules"):
        partition([nn.Identity()] * 5, 6, "blocks")


@pytest.mark.parametrize("method,expected", [("fr", [(0, 4), (4, 11)]), ("bp", [(0, 5), (5, 11)])])
def test_run_balances_the_cost_of_the_method_it_runs(monkeypatch, timing_confirms_profile, method, expected):
    from dbench import plan as run
    from dbench.config import RunConfig

    fake = [BlockTime(1.0, 2.0)] * 10 + [BlockTime(0.1, 0.2)]  # resnet20 has 11 blocks, the head is cheap
    monkeypatch.setattr(run, "time_costs", lambda blocks, sample, device: fake)
    setup, _ = run.make(RunConfig(method=method, model="resnet20", gpus=2, split="time", epochs=1))
    assert setup.ranges == balance_time(fake, 2, METHODS.get(method).step_cost)
    # BP: 5·3=15 | 5·3+0.3=15.3; FR: 4·4=16 | 6·3+0.3=18.3, where BP's cut would cost FR 20 | 15.3
    assert setup.ranges == expected


def test_boundary_costs_are_profiled_once_per_shape_and_never_after_the_last_block():
    shapes = [(2, 8, 4, 4)] * 3 + [(2, 16, 2, 2)] * 2 + [(2, 10)]
    times = [BlockTime(1.0, 2.0, shape) for shape in shapes]
    asked = []

    def cost(shape):
        asked.append(shape)
        return float(shape[1])

    assert boundary_costs(times, cost) == [8.0, 8.0, 8.0, 16.0, 16.0, 0.0]
    assert asked == [(2, 8, 4, 4), (2, 16, 2, 2)]


def test_a_costly_boundary_moves_the_cut():
    times = [BlockTime(1.0, 2.0)] * 8
    boundaries = [100.0] * 5 + [0.0] * 3  # a synthesizer after any of the first five blocks would dominate
    assert balance_time(times, 2) == [(0, 4), (4, 8)]
    assert balance_time(times, 2, boundaries=boundaries) == [(0, 6), (6, 8)]
    assert step_costs(times, [(0, 4), (4, 8)], boundaries=boundaries) == [112.0, 12.0]  # the top pays no boundary


def test_dni_balances_its_synthesizer_too(monkeypatch, timing_confirms_profile):
    from dbench import plan as run
    from dbench.config import RunConfig

    # resnet20's 11 blocks; the first six "output at full resolution", where a synthesizer is dear
    fake = [BlockTime(1.0, 2.0, (128, 16, 32, 32))] * 6 + [BlockTime(1.0, 2.0, (128, 64, 8, 8))] * 5
    monkeypatch.setattr(run, "time_costs", lambda blocks, sample, device: fake)
    dni = METHODS.get("dni")
    seen = []

    def synthesizer_step(cls, shape, device, options, num_classes):
        seen.append((shape, options.hidden, num_classes))
        return lambda: shape[2] == 32  # "dear" at full resolution, timed by the median_seconds below

    monkeypatch.setattr(dni, "boundary_step", classmethod(synthesizer_step))
    monkeypatch.setattr(run, "median_seconds", lambda step, device: 100.0 if step() else 0.5)
    setup, _ = run.make(RunConfig(method="dni", model="resnet20", gpus=2, split="time", epochs=1))
    assert setup.ranges == [(0, 7), (7, 11)]  # BP's cost model would cut at 5
    assert seen == [((128, 16, 32, 32), 64, 10), ((128, 64, 8, 8), 64, 10)]


@pytest.mark.parametrize("name", ["dni", "cdni"])
def test_dni_synthesizer_profile_leaves_the_random_generator_alone(name):
    from dbench.method import parse_options

    cls = METHODS.get(name)
    state = torch.get_rng_state()
    for shape in [(4, 8, 4, 4), (4, 16)]:
        step = cls.boundary_step(shape, torch.device("cpu"), parse_options(cls, {}), 10)
        assert median_seconds(step, torch.device("cpu")) > 0
        assert count_work(cls.boundary_step(shape, torch.device("meta"), parse_options(cls, {}), 10)) > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert METHODS.get("fr").boundary_step is None and METHODS.get("bp").boundary_step is None


def test_a_blocks_cost_is_counted_as_by_hand():
    """cost = FLOPs + ELEMENT_FLOPS (200) × the elements every non-view operation writes.

    A linear map 12 → 10 and a ReLU on a batch of 4. Forward: addmm, 2·4·12·10 = 960 FLOPs, writes 40;
    relu writes 40: 960 + 200·80. Backward (from a gradient of ones, written: 40): relu's backward writes
    40; the input's gradient (mm, 960 FLOPs) 48; the weight's (mm, 960) 120; the bias's (sum) 10:
    1920 + 200·258. A convolution 3 → 8, 3×3, padding 1, on 2×3×5×5: 2·400·27 = 21600 FLOPs writing 400;
    backward 43200 FLOPs writing the ones (400), the input's gradient (150) and the weight's (216)."""
    assert ELEMENT_FLOPS == 200
    blocks = [nn.Sequential(nn.Linear(12, 10), nn.ReLU())]
    assert counted_costs(blocks, torch.zeros(4, 12)) == [BlockTime(960 + 200 * 80, 1920 + 200 * 258, (4, 10))]
    conv = [nn.Conv2d(3, 8, 3, padding=1, bias=False)]
    assert counted_costs(conv, torch.zeros(2, 3, 5, 5)) == [
        BlockTime(21600 + 200 * 400, 43200 + 200 * (400 + 150 + 216), (2, 8, 5, 5))]


def test_the_default_cut_is_the_models_own_on_every_engine_clock_and_device(monkeypatch):
    """--split auto is counted: the same cut on the local and the distributed engine, with the clock
    returning anything at all, and for a sample on the CPU or on another device (meta stands in for one)."""
    from dbench import plan as run
    from dbench.config import RunConfig

    first = {e: run.make(RunConfig(method="fr", model="resnet20", gpus=3, engine=e, epochs=1))[0].ranges
             for e in ("local", "distributed")}
    noise = random.Random(0)
    monkeypatch.setattr(time, "perf_counter", lambda: noise.uniform(0, 1e6))
    again = {e: run.make(RunConfig(method="fr", model="resnet20", gpus=3, engine=e, epochs=1))[0].ranges
             for e in ("local", "distributed")}
    assert first["local"] == first["distributed"] == again["local"] == again["distributed"]
    from dbench.registry import MODELS

    blocks = MODELS.get("resnet20")(num_classes=10).blocks
    assert counted_costs(blocks, torch.zeros(8, 3, 32, 32)) == counted_costs(
        blocks, torch.empty(8, 3, 32, 32, device="meta"))
    # The counted balance of FR's step (its modules below the top forward twice).
    assert first["local"] == balance_time(counted_costs(blocks, torch.zeros(128, 3, 32, 32)), 3,
                                          METHODS.get("fr").step_cost)


DBENCH_CLI = os.path.join(os.path.dirname(sys.executable), "dbench")


def _dbench(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([DBENCH_CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_split_from_a_run_reuses_its_cut_bit_for_bit(tmp_path):
    """A DGL run cut by hand after block 2 (not the default cut, [0, 1) [1, 3)), then a run with --split from:
    it: the same partition recorded, and the very same losses and accuracies, epoch by epoch."""
    common = ["run", "--method", "dgl", "--model", "mlp", "--gpus", "2", "--epochs", "1", "--batch-size", "256",
              "--dataset", "synthetic-small",
              "--engine", "local", "--sigma-every", "0", "--quiet"]
    first, again = tmp_path / "first", tmp_path / "again"
    done = _dbench(*common, "--split", "2", "--out", str(first))
    assert done.returncode == 0, done.stderr
    done = _dbench(*common, "--split", f"from:{first}", "--out", str(again))
    assert done.returncode == 0, done.stderr
    import json

    configs = [json.loads((p / "config.json").read_text()) for p in (first, again)]
    assert configs[0]["partition"] == configs[1]["partition"] == [[0, 2], [2, 3]]
    rows = [[json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (first, again)]
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert [[r.get(k) for k in keys] for r in rows[0]] == [[r.get(k) for k in keys] for r in rows[1]]


@pytest.mark.parametrize("make_source,extra,message", [
    (None, [], "does not exist"),
    ("not-json", [], "cannot read"),
    ("other-model", [], "that run cut model 'cnn', not 'resnet8'"),
    ("other-k", ["--gpus", "3"], "that run cut resnet8 into 2 modules, but this run has K = 3"),
    ("empty-name", [], "name the run whose cut to reuse"),
])
def test_split_from_refuses_in_one_line_and_writes_nothing(tmp_path, make_source, extra, message, monkeypatch, capsys):
    from conftest import run_cli

    import json

    source = tmp_path / "source"
    if make_source == "not-json":
        source.mkdir()
        (source / "config.json").write_text("{not json")
    elif make_source in ("other-model", "other-k"):
        source.mkdir()
        model = "cnn" if make_source == "other-model" else "resnet8"
        (source / "config.json").write_text(json.dumps({"run": {"model": model}, "partition": [[0, 2], [2, 5]]}))
    spec = "from:" if make_source == "empty-name" else f"from:{source}"
    out = tmp_path / "out"
    code, _, err = run_cli(["run", "--method", "fr", "--model", "resnet8", "--gpus", "2", *extra, "--split", spec,
                            "--out", str(out), "--quiet"], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_row_that_averages_runs_cut_differently_is_warned_of():
    import pandas as pd

    from dbench.report.build import mixed_settings

    table = pd.DataFrame({"model": ["resnet20"] * 3, "dataset": ["cifar10"] * 3, "k": [2] * 3, "label": ["fr"] * 3,
                          "seed": [0, 1, 2], "partition": ["[0,4) [4,11)", "[0,3) [3,11)", "[0,4) [4,11)"]})
    warned = mixed_settings(table)
    assert len(warned) == 1 and "cut differently: [0,4) [4,11) (2 runs); [0,3) [3,11) (1 run)" in warned[0]
    assert mixed_settings(table.assign(partition="[0,4) [4,11)")) == []
