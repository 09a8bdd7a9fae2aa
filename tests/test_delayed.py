"""FR and DDG against hand-unrolled references written here, independently of dbench's engine.

The references index every message by the iteration that produced it and let
each module read the one from iteration t-1, exactly as ALGORITHMS.md states;
they share no code with methods/fr.py or methods/ddg.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import SGD, batches, bn_state, group, record_grads, restore_bn, sgd, tiny_blocks
from dbench import Trainer

RANGES = {1: [(0, 5)], 2: [(0, 2), (2, 5)], 3: [(0, 1), (1, 3), (3, 5)]}


def top_reference(modules, opts, h, y, t, losses, grads, deltas):
    """The top module at iteration t, in both references: true loss and gradient, δ sent down."""
    K = len(modules)
    h = h.clone().requires_grad_(K > 1)
    loss = nn.functional.cross_entropy(modules[-1](h), y)
    opts[-1].zero_grad()
    loss.backward()
    losses.append(loss.item())
    grads[(t, K - 1)] = [p.grad.clone() for p in modules[-1].parameters()]
    if K > 1:
        deltas[(K - 2, t)] = h.grad.clone()


def reference_fr(modules, data):
    """Features replay, unrolled: returns losses, per-iteration grads {(t, k): [grads]}, modules."""
    modules = copy.deepcopy(modules)
    for m in modules:
        m.train()
    K = len(modules)
    opts = [sgd(m) for m in modules]
    inputs = {}  # (k, t) -> input of module k at iteration t
    deltas = {}  # (k, t) -> δ that module k+1 sent down at iteration t (for module k)
    losses, grads = [], {}
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K - 1):  # play, no graph
            inputs[(k, t)] = h
            with torch.no_grad():
                h = modules[k](h)
        top_reference(modules, opts, h, y, t, losses, grads, deltas)  # no delay at the top
        new_opt_steps = [K - 1]
        for k in range(K - 1):
            d = K - 1 - k
            if t < d:
                continue
            stored = inputs[(k, t - d)].clone().requires_grad_(k > 0)
            saved = bn_state(modules[k])
            out = modules[k](stored)  # replay with the current weights
            restore_bn(modules[k], saved)  # the replay must not count the batch twice
            opts[k].zero_grad()
            out.backward(deltas[(k, t - 1)])
            grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
            if k > 0:
                deltas[(k - 1, t)] = stored.grad.clone()
            new_opt_steps.append(k)
        for k in new_opt_steps:
            opts[k].step()
    return losses, grads, modules


def reference_ddg(modules, data):
    """Delayed gradients, unrolled: each forward runs on a frozen copy of that iteration's weights."""
    modules = copy.deepcopy(modules)
    for m in modules:
        m.train()
    K = len(modules)
    opts = [sgd(m) for m in modules]
    graphs = {}  # (k, t) -> (input, output, snapshot module)
    deltas = {}
    losses, grads = [], {}
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K - 1):
            # A frozen copy of this iteration's weights and BN buffers; the copy's
            # updated running statistics are then carried over to the live module.
            snapshot = copy.deepcopy(modules[k])
            inp = h.clone().requires_grad_(k > 0)
            out = snapshot(inp)
            with torch.no_grad():
                for live, snap in zip(modules[k].buffers(), snapshot.buffers()):
                    live.copy_(snap)
            graphs[(k, t)] = (inp, out, snapshot)
            h = out.detach()
        top_reference(modules, opts, h, y, t, losses, grads, deltas)
        stepping = [K - 1]
        for k in range(K - 1):
            d = K - 1 - k
            if t < d:
                continue
            inp, out, snapshot = graphs.pop((k, t - d))
            out.backward(deltas[(k, t - 1)])
            for p, sp in zip(modules[k].parameters(), snapshot.parameters()):
                p.grad = sp.grad.clone()
            grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
            if k > 0:
                deltas[(k - 1, t)] = inp.grad.clone()
            stepping.append(k)
        for k in stepping:
            opts[k].step()
    return losses, grads, modules


REFERENCES = {"fr": reference_fr, "ddg": reference_ddg}


@pytest.mark.parametrize("method", ["fr", "ddg"])
@pytest.mark.parametrize("k", [2, 3])
def test_matches_hand_unrolled_reference(method, k):
    blocks = tiny_blocks()
    data = batches(7)
    ref_losses, ref_grads, ref_modules = REFERENCES[method](group(blocks, RANGES[k]), data)
    trainer = Trainer(group(blocks, RANGES[k]), method, **SGD)
    grads = record_grads(trainer)
    losses = [trainer.step(x, y).item() for x, y in data]
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert grads.keys() == ref_grads.keys()  # who updates when: the warm-up
    for key in ref_grads:
        for mine, ref in zip(grads[key], ref_grads[key]):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    for mine, ref in zip(trainer.modules, ref_modules):
        for (name, a), (_, b) in zip(mine.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["fr", "ddg"])
@pytest.mark.parametrize("k", [2, 3])
def test_warm_up(method, k):
    """Module k (0-based) makes its first update at iteration K-1-k."""
    trainer = Trainer(group(tiny_blocks(), RANGES[k]), method, **SGD)
    grads = record_grads(trainer)
    for x, y in batches(k + 1):
        trainer.step(x, y)
    for m in range(k):
        first = min(t for t, mod in grads if mod == m)
        assert first == k - 1 - m


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_batchnorm_counts_each_batch_once(method):
    trainer = Trainer(group(tiny_blocks(), RANGES[3]), method, **SGD)
    n = 6
    for x, y in batches(n):
        trainer.step(x, y)
    for module in trainer.modules:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.num_batches_tracked.item() == n


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_k1_is_bp(method):
    blocks, data = tiny_blocks(), batches(5)
    bp = Trainer(group(blocks, RANGES[1]), "bp", **SGD)
    other = Trainer(group(blocks, RANGES[1]), method, **SGD)
    assert [bp.step(x, y).item() for x, y in data] == [other.step(x, y).item() for x, y in data]
    for a, b in zip(bp.modules[0].state_dict().values(), other.modules[0].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["bp", "fr", "ddg", "dni", "cdni", "dfa", "bdfa"])
def test_state_dict_round_trip_continues_exactly(method):
    """Stop after some steps, rebuild from the saved state, continue: same as never stopping."""
    data = batches(8)
    whole = Trainer(group(tiny_blocks(), RANGES[3]), method, num_classes=10, **SGD)
    expected = [whole.step(x, y).item() for x, y in data]

    first = Trainer(group(tiny_blocks(), RANGES[3]), method, num_classes=10, **SGD)
    got = [first.step(x, y).item() for x, y in data[:4]]
    state = copy.deepcopy(first.state_dict())
    second = Trainer(group(tiny_blocks(seed=99), RANGES[3]), method, num_classes=10, **SGD)  # other weights, overwritten
    second.load_state_dict(state)
    got += [second.step(x, y).item() for x, y in data[4:]]
    assert got == expected
