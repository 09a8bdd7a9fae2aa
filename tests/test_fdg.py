"""FDG against a hand-unrolled reference written here from ALGORITHMS.md's FDG section.

The reference indexes every message by the iteration that sent it and lets each
module read only what was sent at iteration t-1, so every module works "at
once" as the section says; it shares no code with methods/fdg.py. Snapshots of
the weights a forward used are deep copies of the module (as test_delayed.py's
DDG reference), so a delayed backward sees the weights of its forward.
"""
from __future__ import annotations

import copy
import io
import json
import math
import re

import pytest
import torch
from torch import nn

from conftest import SGD, batches, group, interrupted_at_step, record_grads, run_cli, sgd, tiny_blocks
from dbench import Trainer
from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError
from dbench.method import StepOutput, Stage, parse_options
from dbench.registry import METHODS

RANGES = {1: [(0, 5)], 2: [(0, 2), (2, 5)], 3: [(0, 1), (1, 3), (3, 5)], 4: [(0, 1), (1, 2), (2, 3), (3, 5)]}


def reference_fdg(modules, data, beta):
    """FDG unrolled. Returns {t: (batch, loss)}, {(t, k): grads handed to the optimizer}, the modules."""
    modules = copy.deepcopy(modules)
    for m in modules:
        m.train()
    K = len(modules)
    opts = [sgd(m) for m in modules]
    ups = {}  # (k, t) -> output module k sent up at iteration t
    downs = {}  # (k, t) -> gradient module k+1 sent down to module k at iteration t
    graphs = {}  # (k, batch) -> (input, output, snapshot the forward ran on)
    losses, grads = {}, {}
    for t in range(len(data)):
        for k in range(K):  # any order: a module reads only messages of iteration t-1
            batch = t - k  # module k forwards batch t-k
            if k == K - 1:  # the top: forward, loss, backward, update on the batch it received
                if batch < 0:
                    continue
                h = data[batch][0] if K == 1 else ups[(k - 1, t - 1)]
                inp = h.clone().requires_grad_(K > 1)
                loss = nn.functional.cross_entropy(modules[k](inp), data[batch][1])
                opts[k].zero_grad()
                loss.backward()
                losses[t] = (batch, loss.item())
                grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
                if K > 1:
                    downs[(k - 1, t)] = inp.grad.clone()
                opts[k].step()
                continue
            back = t - 2 * (K - 1 - k) - k  # the batch whose gradient module k+1 sent at t-1
            if back >= 0:
                inp, out, snapshot = graphs.pop((k, back))
                out.backward(beta * downs[(k, t - 1)])
                for p, sp in zip(modules[k].parameters(), snapshot.parameters()):
                    p.grad = sp.grad.clone()
                grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
                if k > 0:
                    downs[(k - 1, t)] = inp.grad.clone()
                opts[k].step()
            if batch >= 0:  # then the new forward, at the weights just updated
                h = data[batch][0] if k == 0 else ups[(k - 1, t - 1)]
                snapshot = copy.deepcopy(modules[k])
                inp = h.clone().requires_grad_(k > 0)
                out = snapshot(inp)
                with torch.no_grad():  # the batch counts once in the live module's running statistics
                    for live, snap in zip(modules[k].buffers(), snapshot.buffers()):
                        live.copy_(snap)
                graphs[(k, batch)] = (inp, out, snapshot)
                ups[(k, t)] = out.detach()
    return losses, grads, modules


def fdg(K, beta=1.0, blocks=None, **kwargs):
    return Trainer(group(blocks or tiny_blocks(), RANGES[K]), "fdg", options={"shrink": beta}, **SGD, **kwargs)


def assert_same_state(mine, ref):
    for a, b in zip(mine, ref):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:  # weights and BatchNorm running statistics
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("K", [2, 3])
def test_matches_hand_unrolled_reference(K, beta):
    blocks, data = tiny_blocks(), batches(8)
    ref_losses, ref_grads, ref_modules = reference_fdg(group(blocks, RANGES[K]), data, beta)
    trainer = fdg(K, beta, blocks)
    grads = record_grads(trainer)
    for t, (x, y) in enumerate(data):
        out = trainer.step_output(x, y)
        if t < K - 1:
            assert out is None and t not in ref_losses  # the first K-1 iterations score nothing
            continue
        batch, loss = ref_losses[t]
        assert batch == t - (K - 1)
        assert torch.equal(out.labels, data[batch][1])  # the labels of the batch it scored, not of (x, y)
        assert out.loss.item() == pytest.approx(loss, rel=1e-6, abs=1e-7), f"iteration {t}"
    assert grads.keys() == ref_grads.keys()  # who updates when: the warm-up
    for key in ref_grads:
        for mine, ref in zip(grads[key], ref_grads[key]):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7, msg=str(key))
    assert_same_state(trainer.modules, ref_modules)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_warm_up(K):
    """Module k makes its first update at iteration 2(K-1-k)+k and then one at every iteration."""
    trainer = fdg(K)
    grads = record_grads(trainer)
    n = 2 * (K - 1) + 2
    for x, y in batches(n):
        trainer.step(x, y)
    for k in range(K):
        assert sorted(t for t, m in grads if m == k) == list(range(2 * (K - 1 - k) + k, n)), f"module {k}"


def test_first_gradients_are_bp_of_batch_0_shrunk_by_beta_to_the_depth():
    """Every module's first update comes from batch 0, whose forwards and backwards all ran at the initial
    weights: it is BP's gradient of batch 0 times β^(K-1-k) (the shrinking compounds down the modules)."""
    K, beta = 3, 0.5
    blocks, data = tiny_blocks(), batches(2 * (K - 1) + 1)
    whole = nn.Sequential(*copy.deepcopy(blocks)).train()
    nn.functional.cross_entropy(whole(data[0][0]), data[0][1]).backward()
    bp = [[p.grad for p in nn.Sequential(*whole[a:b]).parameters()] for a, b in RANGES[K]]
    trainer = fdg(K, beta, blocks)
    grads = record_grads(trainer)
    for x, y in data:
        trainer.step(x, y)
    for k in range(K):
        first = min(t for t, m in grads if m == k)
        for mine, ref in zip(grads[(first, k)], bp[k]):
            torch.testing.assert_close(mine, beta ** (K - 1 - k) * ref, rtol=1e-5, atol=1e-7, msg=f"module {k}")


def test_k1_is_bp():
    blocks, data = tiny_blocks(), batches(5)
    bp = Trainer(group(blocks, RANGES[1]), "bp", **SGD)
    other = fdg(1, 0.5, blocks)  # no module below the top: nothing to shrink
    assert [bp.step(x, y).item() for x, y in data] == [other.step(x, y).item() for x, y in data]
    for a, b in zip(bp.modules[0].state_dict().values(), other.modules[0].state_dict().values()):
        assert torch.equal(a, b)


def test_batchnorm_counts_each_batch_once():
    """Module k has run the forward of n-k batches after n iterations, each counted once in its statistics."""
    K, n = 3, 6
    trainer = fdg(K)
    for x, y in batches(n):
        trainer.step(x, y)
    for k, module in enumerate(trainer.modules):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.num_batches_tracked.item() == n - k, f"module {k}"


def test_memory_module_k_holds_2_k_graphs_and_snapshots():
    """Backward first, then the new forward: module k's accounted peak holds 2(K-1-k) graphs (BP's module
    holds one; the other order would peak at 2(K-1-k)+1) and as many copies of its weights and buffers."""
    K = 3
    data = batches(2 * (K - 1) + 3)
    peaks = {}
    for method in ("bp", "fdg"):
        t = Trainer(group(tiny_blocks(), RANGES[K]), method, measure=True, **SGD)
        t.meters.start_epoch()
        for x, y in data:
            t.step(x, y)
        peaks[method] = t.meters.stop_epoch()
    module_bytes = [sum(v.numel() * v.element_size() for v in m.state_dict().values()) for m in t.modules]
    for k in range(K):
        bp, mine = peaks["bp"][k]["accounted_bytes"], peaks["fdg"][k]["accounted_bytes"]
        graphs = 2 * (K - 1 - k) if k < K - 1 else 1
        # tolerance 1%: each graph also saves its own BatchNorm batch statistics
        assert mine["activations"] / bp["activations"] == pytest.approx(graphs, rel=0.01), f"module {k}"
        if k < K - 1:
            assert mine["weight_snapshots"] == 2 * (K - 1 - k) * module_bytes[k], f"module {k}"
        else:
            assert mine["weight_snapshots"] == 0
            assert mine["stored_labels"] == (K - 1) * data[0][1].numel() * data[0][1].element_size()


@pytest.mark.parametrize("text", ["0", "-0.5", "1.5", "nan", "inf"])
def test_shrink_outside_0_1_is_refused(text):
    message = rf"^bad shrink {re.escape(str(float(text)))}: must be a number with 0 < shrink <= 1$"
    with pytest.raises(DbenchError, match=message):
        parse_options(METHODS.get("fdg"), {"shrink": text})
    with pytest.raises(DbenchError, match=message):  # also when the Options come built, not parsed
        Trainer(group(tiny_blocks(), RANGES[2]), "fdg", options=METHODS.get("fdg").Options(shrink=float(text)))


def test_facts():
    cls = METHODS.get("fdg")
    assert parse_options(cls, {"shrink": "0.25"}).shrink == 0.25
    assert cls.Options().shrink == 1.0
    facts = cls.facts(4)
    assert facts["family"] == "delayed gradient" and facts["locking"] == "unlocked"
    assert facts["ideal_speedup"] == 4.0 and facts["default_options"] == {"shrink": 1.0}
    assert METHODS.get("ddg").table_order < cls.table_order < METHODS.get("dni").table_order


@pytest.mark.parametrize("cut", [3, 6])
def test_state_dict_round_trip_continues_exactly(cut):
    """Stop after ``cut`` steps (3: inside module 0's warm-up, with forwards stored and labels queued),
    save through a checkpoint file's format, load into a fresh trainer, continue: as never stopped."""
    K, data = 3, batches(9)
    whole = fdg(K, 0.5)
    expected = [whole.step(x, y) for x, y in data]

    first = fdg(K, 0.5)
    got = [first.step(x, y) for x, y in data[:cut]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = fdg(K, 0.5, blocks=tiny_blocks(seed=99))  # other weights, overwritten
    second.load_state_dict(torch.load(buffer, weights_only=True))
    got += [second.step(x, y) for x, y in data[cut:]]
    assert [None if v is None else v.item() for v in got] == [None if v is None else v.item() for v in expected]
    for a, b in zip(second.modules, whole.modules):
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), name


# --- runs through the epoch loop --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_once():
    """The synthetic data set, generated once for this file's runs (it is deterministic: every call builds
    the same tensors, and generating it is most of a short run's time)."""
    from dbench.data import synthetic

    return synthetic.generate()


@pytest.fixture
def quick_data(synthetic_once, monkeypatch):
    from dbench.data import synthetic

    real = synthetic.generate
    monkeypatch.setattr(synthetic, "generate",
                        lambda name=synthetic.NAME: synthetic_once if name == synthetic.NAME else real(name))


def test_cli_run(quick_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--method", "fdg", "--opt", "shrink=0.5", "--model", "mlp", "--gpus", "2",
                            "--epochs", "1", "--batch-size", "512", "--sigma-every", "0", "--quiet",
                            "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and math.isfinite(summary["final_train_loss"])
    assert json.loads((out / "config.json").read_text())["method_options"] == {"shrink": 0.5}


def test_an_epoch_that_scores_nothing_fails_the_run(quick_data, tmp_path):
    """K=3 scores its first batch at the third step: a first epoch of one step has no train loss to record
    (a NaN would read as divergence)."""
    with pytest.raises(DbenchError, match=r"^epoch 1 scored no batch: .*\(1\); give the epoch more steps$"):
        runner.start(RunConfig(method="fdg", model="mlp", gpus=3, epochs=1, batch_size=10_000, sigma_every=0),
                     tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


# --- the epoch loop: loss and accuracy over the batches the top module scored, against their own labels ---



class _ScoresThePreviousBatch(Stage):
    """A top module that reports, at iteration t >= 1, loss t and logits that pick batch t-1's labels."""

    name = "scores_previous"
    family = "test"
    reports: list[tuple[float, int]] = []  # (loss, batch size) of each report

    def train_step(self, t, x, y):
        previous, self.previous = getattr(self, "previous", None), y
        yield from ()  # a program that talks to nobody (one module)
        if previous is None:
            return None
        logits = nn.functional.one_hot(previous, 10).float()
        type(self).reports.append((float(t), len(previous)))
        return StepOutput(loss=torch.tensor(float(t)), logits=logits, labels=previous)


def test_loop_averages_over_scored_batches_with_their_labels(quick_data, tmp_path):
    _ScoresThePreviousBatch.reports = []
    with METHODS.temporarily("scores_previous", _ScoresThePreviousBatch):
        path = runner.start(RunConfig(method="scores_previous", model="mlp", epochs=1, batch_size=512, sigma_every=0),
                            tmp_path / "run", quiet=True)
    row = next(json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "epoch")
    reports = _ScoresThePreviousBatch.reports
    assert len(reports) >= 2
    assert row["train_acc"] == 1.0  # against the labels it reported; the iteration's own would miss ~90%
    assert row["train_loss"] == sum(loss * n for loss, n in reports) / sum(n for _, n in reports)


def test_mid_epoch_checkpoint_keeps_the_scored_count(quick_data, tmp_path, monkeypatch):
    """A stop inside the first epoch (where FDG scores fewer batches than it trains on) resumes from the
    mid-epoch checkpoint to the numbers of an unbroken run: the checkpoint carries the scored count."""
    from test_resume import numbers

    cfg = dict(method="fdg", model="mlp", gpus=3, epochs=1, batch_size=1000, seed=1, sigma_every=0)  # 10 steps
    whole = runner.start(RunConfig(**cfg), tmp_path / "whole", quiet=True)
    cut = tmp_path / "cut"
    # after the checkpoint at step 3: 3 batches trained on, 1 scored
    with interrupted_at_step(monkeypatch, 5), pytest.raises(runner.RunInterrupted, match=r"3 step\(s\) of epoch 1"):
        runner.start(RunConfig(**cfg, checkpoint_every=3), cut, quiet=True)
    runner.resume(cut, quiet=True)
    assert numbers(cut) == numbers(whole)
