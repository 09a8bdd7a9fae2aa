"""The meters: time per module, accounted memory by category, and σ as ALGORITHMS.md defines it."""
from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

from conftest import batches, group, record_grads, tiny_blocks
from dbench import Trainer
from dbench import run as runner
from dbench.config import RunConfig
from dbench.meters import STATES
from dbench.meters.stage_meter import EVERY_ITERATION
from dbench.partition import partition, split_modules
from dbench.method import MODEL_PARALLEL
from dbench.registry import METHODS, MODELS

# one process holds the K modules (the data-parallel methods have their own tests: test_ddp.py)
ALL_METHODS = sorted(name for name, cls in METHODS.items()  # every method the local engine runs
                     if cls.parallelism == MODEL_PARALLEL and "local" in cls.engines)
RANGES3 = [(0, 2), (2, 4), (4, 5)]


def trainer(method, ranges=RANGES3, measure=True, seed=0):
    return Trainer(group(tiny_blocks(seed), ranges), method, lr=0.05, momentum=0.9, measure=measure, num_classes=10)


# --- σ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_probing_does_not_change_the_trajectory(method):
    """Same losses, same final weights and state with a probe at every other step and without meters."""
    data, probe = batches(6, seed=1), batches(2, seed=9)
    plain, probed = trainer(method, measure=False), trainer(method)
    for i, (x, y) in enumerate(data):
        a = plain.step(x, y)
        if i % 2:
            out = probed.sigma_step(x, y, probe)[0]
            b = None if out is None else out.loss  # None: no batch scored in this iteration (FDG's first K-1)
        else:
            b = probed.step(x, y)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"step {i}"
    for m, n in zip(plain.modules, probed.modules):
        for (name, u), v in zip(m.state_dict().items(), n.state_dict().values()):
            assert torch.equal(u, v), name


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bp_sigma_is_one_when_the_probe_is_the_batch(k):
    """Probing on the very batch BP trains on: g_k is the true gradient, so σ = cos = 1 (float tolerance 1e-5)."""
    ranges = {1: [(0, 5)], 2: [(0, 3), (3, 5)], 3: RANGES3}[k]
    t = trainer("bp", ranges)
    for x, y in batches(3, seed=4):
        _, modules, network = t.sigma_step(x, y, [(x, y)])
        for r in [*modules, network]:
            assert r.sigma == pytest.approx(1, abs=1e-5) and r.cosine == pytest.approx(1, abs=1e-5)
            assert r.sigma_corrected is None  # one batch: no halves to take the noise out with
        # Two halves that are the same batch: <∇_A, ∇_B> = ||∇||², so the corrected σ is 1 too.
        _, modules, network = t.sigma_step(x, y, [(x, y), (x, y)])
        for r in [*modules, network]:
            assert r.sigma_corrected == pytest.approx(1, abs=1e-5)


def test_corrected_sigma_uses_independent_halves():
    """sigma_corrected = <∇,g> / <∇_A,∇_B>, with ∇_A, ∇_B the mean gradients of the two halves of the probe set."""
    t = trainer("bp", [(0, 5)])
    x, y = batches(1, seed=3)[0]
    probe = batches(3, seed=8)  # halves of 2 and 1 batches
    whole = copy.deepcopy(t.modules[0]).train()
    params = list(whole.parameters())

    def grad(bs):
        loss = sum(nn.functional.cross_entropy(whole(xb), yb) for xb, yb in bs) / len(bs)
        return torch.autograd.grad(loss, params)

    g_all, g_a, g_b = grad(probe), grad(probe[:2]), grad(probe[2:])
    applied = record_grads(t)
    _, (module,), _ = t.sigma_step(x, y, probe)
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g_all, applied[(0, 0)])).item()
    cross = sum((a.double() * b.double()).sum() for a, b in zip(g_a, g_b)).item()
    assert module.sums[0] == pytest.approx(dot, rel=1e-4) and module.sums[2] == pytest.approx(cross, rel=1e-4)
    # A cross term <= 0 means the probe set is too noisy to estimate ||∇f||²: no value then.
    assert module.sigma_corrected == (pytest.approx(dot / cross, rel=1e-4) if cross > 0 else None)


@pytest.mark.parametrize("method", ["fr", "dfa", "dni"])
def test_sigma_matches_its_definition(method):
    """σ_k = <∇_k f(w^t), g_k^t> / ||∇_k f(w^t)||², computed here by hand from a copy of the weights before the step."""
    t = trainer(method)
    data, probe = batches(4, seed=2), batches(2, seed=7)
    for x, y in data[:3]:
        t.step(x, y)
    # The true gradient at w^t by plain BP over the whole chain, batch statistics, mean over probe batches.
    whole = nn.Sequential(*copy.deepcopy(t.modules)).train()
    params = [list(m.parameters()) for m in whole]
    truth = [[torch.zeros_like(p) for p in ps] for ps in params]
    for xp, yp in probe:
        loss = nn.functional.cross_entropy(whole(xp), yp) / len(probe)
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps])
        flat = iter(grads)
        for acc in truth:
            for a in acc:
                a.add_(next(flat))
    applied = record_grads(t)
    x, y = data[3]
    _, modules, network = t.sigma_step(x, y, probe)
    dots, norms, gnorms = [], [], []
    for k, r in enumerate(modules):
        g = applied[(3, k)]
        dot = sum((a.double() * b.double()).sum() for a, b in zip(truth[k], g)).item()
        nn2 = sum(a.double().pow(2).sum() for a in truth[k]).item()
        gg = sum(b.double().pow(2).sum() for b in g).item()
        assert r.sigma == pytest.approx(dot / nn2, rel=1e-5, abs=1e-8)
        assert r.cosine == pytest.approx(dot / (nn2 * gg) ** 0.5, rel=1e-5, abs=1e-8)
        dots.append(dot), norms.append(nn2), gnorms.append(gg)
    assert network.sigma == pytest.approx(sum(dots) / sum(norms), rel=1e-5)
    assert network.cosine == pytest.approx(sum(dots) / (sum(norms) * sum(gnorms)) ** 0.5, rel=1e-5)


def test_modules_in_warm_up_have_no_sigma():
    """DDG at K=3, first iteration: modules 0 and 1 make no update, so they have no σ; the top module has."""
    t = trainer("ddg")
    x, y = batches(1)[0]
    _, modules, network = t.sigma_step(x, y, [(x, y)])
    assert [r.sigma is None for r in modules] == [True, True, False]
    assert modules[0].true_grad_norm > 0 and modules[0].method_grad_norm is None
    assert network.sigma is not None  # the network took a step with zero on the waiting modules


def test_sigma_needs_measuring_trainer():
    from dbench.errors import DbenchError

    t = trainer("bp", measure=False)
    x, y = batches(1)[0]
    with pytest.raises(DbenchError, match="measure=True"):
        t.sigma_step(x, y, [(x, y)])


# --- memory ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_peaks():
    """Accounted peaks per module for every method: ResNet-8 in K=4 modules, batch 8, 6 steps (past every warm-up)."""
    torch.manual_seed(0)
    blocks = MODELS.get("resnet8")(num_classes=10).blocks
    ranges = partition(blocks, 4, "blocks")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    peaks, inputs = {}, []
    for method in ALL_METHODS:
        t = Trainer(split_modules(copy.deepcopy(blocks), ranges), method, measure=True, num_classes=10)
        t.meters.start_epoch()
        for x, y in data:
            t.step(x, y)
        peaks[method] = t.meters.stop_epoch()
    h = data[0][0]
    for m in split_modules(copy.deepcopy(blocks), ranges):
        inputs.append(h.numel() * h.element_size())
        h = m(h)
    return peaks, inputs


def test_ddg_holds_k_minus_k_plus_1_graphs(resnet_peaks):
    """Module k (1-based) of DDG holds K-k+1 times BP's activations (tolerance 1%: BN statistics are saved per graph too)."""
    peaks, _ = resnet_peaks
    K = 4
    for i in range(K):
        bp, ddg = (peaks[m][i]["accounted_bytes"] for m in ("bp", "ddg"))
        if bp["activations"] == 0:
            continue
        assert ddg["activations"] / bp["activations"] == pytest.approx(K - i, rel=0.01), f"module {i}"
        # and K-k+1 copies of its weights, to keep the old graphs valid
        assert ddg["weight_snapshots"] >= (K - 1 - i) * ddg["parameters"] * 0.99 if i < K - 1 else True


def test_fr_holds_bp_plus_stored_inputs(resnet_peaks):
    """FR's module k holds K-k+1 inputs: K-k in its history and one in the replay graph, which BP's graph holds too.

    So FR's peak is BP's plus exactly K-k inputs (1-based k; tolerance: 0.5% of BP's peak), and DDG > FR >= BP below K.
    """
    peaks, inputs = resnet_peaks
    K = 4
    for i in range(K):
        bp, fr, ddg = (peaks[m][i]["accounted_peak_bytes"] for m in ("bp", "fr", "ddg"))
        assert fr - bp == pytest.approx((K - 1 - i) * inputs[i], abs=0.005 * bp), f"module {i}"
        assert peaks["fr"][i]["accounted_bytes"].get("stored_inputs", 0) == (K - 1 - i) * inputs[i]
        if i < K - 1:
            assert ddg > fr >= bp, f"module {i}"
        else:
            assert ddg == fr == bp  # the top module is the same in all three


def test_method_state_is_counted(resnet_peaks):
    peaks, _ = resnet_peaks
    for i in range(3):
        dfa, bdfa = peaks["dfa"][i]["accounted_bytes"]["feedback"], peaks["bdfa"][i]["accounted_bytes"]["feedback"]
        assert dfa == 4 * bdfa > 0  # float32 against int8
        assert peaks["dni"][i]["accounted_bytes"]["synthesizer"] > 0
        assert peaks["cdni"][i]["accounted_bytes"]["synthesizer"] > peaks["dni"][i]["accounted_bytes"]["synthesizer"]
    parameters = {m: [p["accounted_bytes"]["parameters"] for p in peaks[m]] for m in ALL_METHODS}
    assert len({tuple(v) for v in parameters.values()}) == 1  # one model definition for all


def _epochs(t, data, epochs):
    records = []
    for _ in range(epochs):
        t.meters.start_epoch()
        for x, y in data:
            t.step(x, y)
        records.append(t.meters.stop_epoch())
    return records


@pytest.mark.parametrize("method", ALL_METHODS)
def test_accounting_window_finds_the_peak_of_accounting_at_every_iteration(method):
    """The memory meter accounts in a window at each epoch's start (2K+4 iterations); per epoch and module, its peak
    and breakdown equal those of accounting at every iteration. K=3 (a window of 10), 2 epochs of 16 iterations,
    the last batch smaller, so that epoch 2 starts with graphs built while the hooks were off (DDG, FDG)."""
    data = batches(15) + batches(1, batch=5, seed=3)
    every, windowed = trainer(method), trainer(method)
    for m in every.meters.stages:
        m.window = EVERY_ITERATION
    assert [m.window for m in windowed.meters.stages] == [10, 10, 10]
    for e, (a, b) in enumerate(zip(_epochs(every, data, 2), _epochs(windowed, data, 2))):
        for ra, rb in zip(a, b):
            assert rb["accounted_peak_bytes"] == ra["accounted_peak_bytes"] > 0, f"epoch {e}, module {ra['module']}"
            assert rb["accounted_bytes"] == ra["accounted_bytes"], f"epoch {e}, module {ra['module']}"


def test_accounting_window_closes():
    """Past the window no tensor is tracked: DDG's module 0 keeps graphs across iterations, yet once the window's
    graphs are consumed the meter holds none; the next epoch opens a new window."""
    t = trainer("ddg")
    meter = t.meters.stages[0]
    t.meters.start_epoch()
    for i, (x, y) in enumerate(batches(meter.window + meter.lifetime)):
        t.step(x, y)
        if i < meter.window:
            assert meter.saved.live, f"iteration {i}"
    assert meter.saved.live == {} and meter.saved.born == {}
    t.meters.start_epoch()
    t.step(*batches(1)[0])
    assert meter.saved.live


def test_a_graph_older_than_the_window_assumes_is_an_error():
    """DDG's module 0 keeps each graph K iterations: told that graphs live one iteration, the meter refuses."""
    t = trainer("ddg")
    t.meters.stages[0].lifetime = 1
    t.meters.start_epoch()
    with pytest.raises(RuntimeError, match="still alive at iteration .* longer than the 1 iterations"):
        for x, y in batches(6):
            t.step(x, y)


def test_saved_tensors_keep_autograd_in_place_check():
    """The meters' saved-tensor hooks must not hide an in-place change to a saved tensor."""
    t = trainer("bp", [(0, 5)])
    meter = t.meters.stages[0]
    w = torch.randn(3, 3, requires_grad=True)
    with meter.tracking():
        y = (torch.randn(2, 3, requires_grad=True) @ w).sum()
    with torch.no_grad():
        w.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.backward()


# --- time --------------------------------------------------------------------------------------


def test_timers_add_up_and_attribute_waits():
    """compute + waits + idle + probe = wall-clock (within 2% or 5 ms), and in the sequential local
    engine BP's module 0 waits for its gradient exactly while module 1 computes (within 10% or 20 ms)."""
    t = trainer("bp", [(0, 3), (3, 5)])
    data = batches(8, batch=64)
    start = time.perf_counter()
    t.meters.start_epoch()
    for i, (x, y) in enumerate(data):
        if i == 4:
            t.sigma_step(x, y, data[:1])
        else:
            t.step(x, y)
    modules = t.meters.stop_epoch()
    wall = time.perf_counter() - start
    for m in modules:
        total = sum(m[f"{s}_s"] for s in STATES)
        assert total == pytest.approx(wall, rel=0.02, abs=0.005)
        assert m["compute_s"] > 0 and m["probe_s"] > 0
    assert modules[0]["wait_grad_s"] == pytest.approx(modules[1]["compute_s"], rel=0.1, abs=0.02)
    assert modules[1]["wait_input_s"] > 0


def test_the_loaders_time_is_data_not_idle():
    """A loader that takes 50 ms a batch: every module's clock books that time as data (in the local engine the
    process's loader feeds them all), and the states still add up to the epoch's wall-clock."""
    t = trainer("fr")

    def slow(data):
        for batch in data:
            time.sleep(0.05)
            yield batch

    t.meters.start_epoch()
    start = time.perf_counter()
    for x, y in t.meters.loading(slow(batches(4))):
        t.step(x, y)
    wall = time.perf_counter() - start
    for r in t.meters.stop_epoch():
        assert 0.2 <= r["data_s"] < 0.35, r
        assert sum(r[f"{s}_s"] for s in STATES) == pytest.approx(wall, rel=0.05)


def test_run_records_time_memory_and_sigma(tmp_path):
    """A real run: epoch rows carry per-module time and memory, probe rows σ, the summary both."""
    cfg = RunConfig(method="fr", model="mlp", gpus=3, epochs=2, batch_size=256, sigma_every=10)
    path = runner.start(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((path / "config.json").read_text())
    steps = config["steps_per_epoch"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    probes = [r for r in rows if r["kind"] == "probe"]
    assert len(epochs) == 2 and len(probes) == 2 * (steps // 10)
    for row in epochs:
        assert row["warmup_steps"] == config["warmup_steps"] > 0 and row["samples_per_s"] > 0
        assert [m["module"] for m in row["modules"]] == [0, 1, 2]
        for m in row["modules"]:
            assert sum(m[f"{s}_s"] for s in STATES) == pytest.approx(row["train_seconds"], rel=0.02, abs=0.01)
            assert m["accounted_peak_bytes"] == sum(m["accounted_bytes"].values()) > 0
        assert "stored_inputs" in row["modules"][0]["accounted_bytes"]
    assert all(p["modules"][2]["sigma"] is not None for p in probes)
    summary = json.loads((path / "summary.json").read_text())
    assert [m["sigma_probes"] for m in summary["modules"]] == [len(probes)] * 3
    assert summary["mean_sigma"] == pytest.approx(sum(p["sigma"] for p in probes) / len(probes))
    pooled = sum(sum(s[0] for s in p["sums"]) for p in probes) / sum(sum(s[2] for s in p["sums"]) for p in probes)
    assert summary["sigma_corrected"] == pytest.approx(pooled)
    assert summary["modules"][0]["accounted_peak_bytes"] == max(r["modules"][0]["accounted_peak_bytes"] for r in epochs)
    text = (path / "summary.md").read_text()
    assert "wait grad s" in text and "stored_inputs" in text and "What the columns mean" in text


def test_sigma_off(tmp_path):
    cfg = RunConfig(model="mlp", epochs=1, batch_size=256, sigma_every=0)
    path = runner.start(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["epoch"]
    assert json.loads((path / "summary.json").read_text())["mean_sigma"] is None


@pytest.mark.parametrize("method", ["bp", "dni", "cdni", "dfa", "bdfa", "gpipe", "1f1b"])
def test_no_graph_outlives_a_step_of_a_method_without_delay(method):
    """These methods keep no graph between iterations: every tensor saved for backward is freed by the step's
    end (a node left unvisited by the backward, say the loss's, would pile up one per step)."""
    t = trainer(method)
    for x, y in batches(4):
        t.step(x, y)
        assert [m.saved.live for m in t.meters.stages] == [{}, {}, {}]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_the_window_holds_every_method_at_four_modules(method):
    """At K=4 FDG's module 0 keeps a graph 2(K-1) = 6 iterations, longer than K + 1: the method says so
    (graph_lifetime) and the windowed meter accounts it without error, with the peak of every-iteration accounting."""
    def four():
        return Trainer(group(tiny_blocks(), [(0, 1), (1, 2), (2, 3), (3, 5)]), method, num_classes=10, measure=True)

    data = batches(20)
    every, windowed = four(), four()
    for m in every.meters.stages:
        m.window = EVERY_ITERATION
    for a, b in zip(_epochs(every, data, 1)[0], _epochs(windowed, data, 1)[0]):
        assert b["accounted_peak_bytes"] == a["accounted_peak_bytes"] > 0
