"""DGL against a hand-unrolled reference written here from ALGORITHMS.md's DGL section.

The reference shares no code with methods/dgl.py: plain torch modules, one
torch.optim.SGD per module covering the module and its head (as the section
says), the heads rebuilt here from the documented layout and seed rule.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

from conftest import batches, group, record_grads, run_cli, tiny_blocks
from dbench import DbenchError, Trainer
from dbench.method import UP
from dbench.partition import median_seconds
from dbench.registry import METHODS

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RANGES = {1: [(0, 5)], 2: [(0, 1), (1, 5)], 3: [(0, 2), (2, 4), (4, 5)]}
DEFAULT_HEAD = dict(width=None, depth=3, pooled=2, mlp=3, aux_seed=0)


def make(k=3, modules=None, **kw):
    kw = {**SGD, "num_classes": 10, **kw}
    return Trainer(modules if modules is not None else group(tiny_blocks(), RANGES[k]), "dgl", **kw)


def flat_modules() -> list[nn.Module]:
    """K=3 on flat features (N, 6): every head reads (N, F)."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 12), nn.ReLU()), nn.Linear(12, 10)]


def flat_batches(n, batch=16):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


# --- the reference ---------------------------------------------------------------------------------


def reference_head(shape, classes, seed, width=None, depth=3, pooled=2, mlp=3):
    """A_k as documented: conv features: pool each side to ceil(side/4), `depth` 1x1 conv (no bias)-BN-ReLU,
    pool to at most pooled x pooled, BN if no hidden linear layer, flatten, `mlp` linear-BN-ReLU as wide as the
    flattened map, linear to the classes. Flat features: the same with linear layers and no pools."""
    c = shape[0]
    width = c if width is None else width
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if len(shape) == 3:
            h, w = (math.ceil(s / 4) for s in shape[1:])
            layers.append(nn.AdaptiveAvgPool2d((h, w)))
            for i in range(depth):
                layers += [nn.Conv2d(c if i == 0 else width, width, kernel_size=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU()]
            channels = width if depth else c
            ph, pw = min(pooled, h), min(pooled, w)
            layers.append(nn.AdaptiveAvgPool2d((ph, pw)))
            if mlp == 0:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.Flatten())
            n = channels * ph * pw
        else:
            for i in range(depth):
                layers += [nn.Linear(c if i == 0 else width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            n = width if depth else c
            if mlp == 0:
                layers.append(nn.BatchNorm1d(n))
        for _ in range(mlp):
            layers += [nn.Linear(n, n), nn.BatchNorm1d(n), nn.ReLU()]
        layers.append(nn.Linear(n, classes))
    return nn.Sequential(*layers)


def reference_dgl(modules, data, lrs=None, sgd=SGD, head=DEFAULT_HEAD):
    """DGL unrolled: module k < K trains on CE(A_k(h_k), y) with its input detached, the top on the true loss.

    Returns top losses, local losses {(t, k)}, module gradients {(t, k)}, modules, heads.
    """
    modules = copy.deepcopy(modules)
    K = len(modules)
    heads, opts = [None] * (K - 1), [None] * K
    opts[-1] = torch.optim.SGD(modules[-1].parameters(), foreach=False, **sgd)
    losses, local, grads = [], {}, {}
    for t, (x, y) in enumerate(data):
        lr = lrs[t] if lrs is not None else sgd["lr"]
        h = x
        for k in range(K - 1):
            out = modules[k](h.detach())  # a value: nothing flows back to module k-1
            if heads[k] is None:  # built when h_k's shape is known; one SGD for the module and its head
                heads[k] = reference_head(tuple(out.shape[1:]), 10, head["aux_seed"] * 1000 + k,
                                          head["width"], head["depth"], head["pooled"], head["mlp"])
                opts[k] = torch.optim.SGD([*modules[k].parameters(), *heads[k].parameters()], foreach=False, **sgd)
            for g in opts[k].param_groups:
                g["lr"] = lr
            loss = nn.functional.cross_entropy(heads[k](out), y)
            opts[k].zero_grad()
            loss.backward()
            local[(t, k)] = loss.item()
            grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
            opts[k].step()
            h = out.detach()  # computed before the update: what went up
        for g in opts[-1].param_groups:
            g["lr"] = lr
        loss = nn.functional.cross_entropy(modules[-1](h), y)
        opts[-1].zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads[(t, K - 1)] = [p.grad.clone() for p in modules[-1].parameters()]
        opts[-1].step()
    return losses, local, grads, modules, heads


def assert_states_close(mine: nn.Module, ref: nn.Module):
    a, b = mine.state_dict(), ref.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    for (name, u), v in zip(a.items(), b.values()):  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7, msg=name)


def run_and_compare(trainer, modules, data, lrs=None, sgd=SGD, head=DEFAULT_HEAD):
    ref_losses, ref_local, ref_grads, ref_modules, ref_heads = reference_dgl(modules, data, lrs, sgd, head)
    grads = record_grads(trainer)
    losses, local = [], {}
    for t, (x, y) in enumerate(data):
        if lrs is not None:
            trainer.set_lr(lrs[t])
        losses.append(trainer.step(x, y).item())
        local.update({(t, k): s.local_loss.item() for k, s in enumerate(trainer.stages[:-1])})
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert local == pytest.approx(ref_local, rel=1e-6, abs=1e-7)
    assert grads.keys() == ref_grads.keys()  # every module updates at every iteration: no warm-up
    for key in ref_grads:
        for mine, ref in zip(grads[key], ref_grads[key], strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    for stage, ref in zip(trainer.stages, ref_modules):
        assert_states_close(stage.module, ref)
    for stage, ref in zip(trainer.stages, ref_heads):
        assert_states_close(stage.head, ref)
    assert trainer.stages[-1].head is None  # the top trains on the true loss, with no head


# --- the rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_matches_hand_unrolled_reference(k):
    """Losses (top and local), every module's gradient at every iteration, weights, heads and BN statistics."""
    modules = group(tiny_blocks(), RANGES[k])
    run_and_compare(make(modules=copy.deepcopy(modules)), modules, batches(5))


def test_matches_reference_with_nesterov_and_head_options():
    """The head options reach the head (a BatchNorm before its single linear layer when mlp=0); nesterov
    reaches the heads' SGD as well as the modules'."""
    sgd = dict(lr=0.03, momentum=0.8, nesterov=True, weight_decay=1e-3)
    head = dict(width=5, depth=1, pooled=1, mlp=0, aux_seed=7)
    modules = group(tiny_blocks(), RANGES[3])
    trainer = make(modules=copy.deepcopy(modules), options={k: str(v) for k, v in head.items()}, **sgd)
    run_and_compare(trainer, modules, batches(4), sgd=sgd, head=head)


def test_matches_reference_on_flat_features():
    """Flat features (a cut after a Flatten): linear heads, checked with default and with given widths."""
    run_and_compare(make(modules=flat_modules()), flat_modules(), flat_batches(4))
    head = dict(width=4, depth=2, pooled=2, mlp=1, aux_seed=3)
    trainer = make(modules=flat_modules(), options={k: str(v) for k, v in head.items()})
    run_and_compare(trainer, flat_modules(), flat_batches(4), head=head)


def test_heads_follow_the_lr_schedule():
    """The lr set before every step (the first included, before the heads exist) reaches the heads' updates."""
    lrs = [0.02, 0.1, 0.004, 0.05, 0.001]
    modules = group(tiny_blocks(), RANGES[3])
    trainer = make(modules=copy.deepcopy(modules))
    run_and_compare(trainer, modules, batches(5), lrs=lrs)
    for stage in trainer.stages[:-1]:
        assert [g["lr"] for g in stage.side_optimizer("head").param_groups] == [lrs[-1]]


def test_no_message_goes_down():
    """Every message goes up; module k's gradients do not depend on any module above it."""
    seen = []
    trainer = make()
    for k, stage in enumerate(trainer.stages):
        original = stage.train_step

        def spy(t, x, y, k=k, original=original):
            program = original(t, x, y)
            reply = None
            while True:
                try:
                    op = program.send(reply)
                except StopIteration as done:
                    return done.value
                seen.append((k, type(op).__name__, op.channel))
                reply = yield op

        stage.train_step = spy
    for x, y in batches(3):
        trainer.step(x, y)
    assert set(seen) == {(0, "Send", UP), (1, "Recv", UP), (1, "Send", UP), (2, "Recv", UP)}
    assert all(not q for inbox in trainer.engine.inboxes for q in inbox.values())
    # Other weights above module 1: modules 0 and 1 compute the very same gradients.
    ta, tb = make(), make()
    tb.stages[2].module.load_state_dict(group(tiny_blocks(seed=5), RANGES[3])[2].state_dict())
    a, b = record_grads(ta), record_grads(tb)
    for x, y in batches(3):
        ta.step(x, y)
        tb.step(x, y)
    for key in a:
        same = all(torch.equal(u, v) for u, v in zip(a[key], b[key]))
        assert same == (key[1] < 2), key


def test_k1_is_bp_exactly():
    data = batches(5)
    bp = Trainer(group(tiny_blocks(), RANGES[1]), "bp", **SGD)
    dgl = Trainer(group(tiny_blocks(), RANGES[1]), "dgl", **SGD)  # no head at K=1: no num_classes needed
    assert [bp.step(x, y).item() for x, y in data] == [dgl.step(x, y).item() for x, y in data]
    for a, b in zip(bp.modules[0].state_dict().values(), dgl.modules[0].state_dict().values()):
        assert torch.equal(a, b)
    assert dgl.stages[0].head is None


def test_sigma_reads_the_module_s_gradient_only():
    """σ_k compares the module's local gradient with the true one; the head's parameters are in neither."""
    t = make(measure=True)
    data, probe = batches(3, seed=2), batches(2, seed=7)
    for x, y in data[:2]:
        t.step(x, y)
    whole = nn.Sequential(*copy.deepcopy(t.modules)).train()
    params = [list(m.parameters()) for m in whole]
    loss = sum(nn.functional.cross_entropy(whole(xp), yp) for xp, yp in probe) / len(probe)
    flat = iter(torch.autograd.grad(loss, [p for ps in params for p in ps]))
    truth = [[next(flat) for _ in ps] for ps in params]
    applied = record_grads(t)
    _, modules, _ = t.sigma_step(*data[2], probe)
    for k, r in enumerate(modules):
        g = applied[(2, k)]
        dot = sum((a.double() * b.double()).sum() for a, b in zip(truth[k], g)).item()
        nn2 = sum(a.double().pow(2).sum() for a in truth[k]).item()
        gg = sum(b.double().pow(2).sum() for b in g).item()
        assert r.sigma == pytest.approx(dot / nn2, rel=1e-5, abs=1e-8)
        assert r.cosine == pytest.approx(dot / (nn2 * gg) ** 0.5, rel=1e-5, abs=1e-8)


# --- memory, state ---------------------------------------------------------------------------------


def test_heads_are_counted_under_their_own_category():
    """Each head's parameters, BN statistics, momentum (and gradients, if alive at the peak) are
    "auxiliary_head"; the module's parameters and optimizer state are BP's."""
    records = {}
    for method in ("dgl", "bp"):
        t = Trainer(group(tiny_blocks(), RANGES[3]), method, measure=True, num_classes=10, **SGD)
        t.meters.start_epoch()
        for x, y in batches(3):
            t.step(x, y)
        records[method] = (t, t.meters.stop_epoch())
    t, dgl = records["dgl"]
    _, bp = records["bp"]
    for k in range(3):
        for category in ("parameters", "optimizer"):
            assert dgl[k]["accounted_bytes"][category] == bp[k]["accounted_bytes"][category]
    for k in (0, 1):
        head = t.stages[k].head
        params = sum(p.numel() * p.element_size() for p in head.parameters())
        buffers = sum(b.numel() * b.element_size() for b in head.buffers())
        assert dgl[k]["accounted_bytes"]["auxiliary_head"] in (buffers + 2 * params, buffers + 3 * params)
    assert dgl[2]["accounted_bytes"]["auxiliary_head"] == 0  # declared by the top too, never built there


def test_no_graph_outlives_a_step():
    """Every tensor saved for a backward (the modules' and the heads') is freed by the step's end."""
    t = make(measure=True)
    for x, y in batches(3):
        t.step(x, y)
        assert [m.saved.live for m in t.meters.stages] == [{}, {}, {}]


def test_state_dict_round_trip_continues_exactly():
    """Stop after some steps, save through torch.save, rebuild, continue: the same as never stopping."""
    data = batches(6)
    whole = make()
    expected = [whole.step(x, y).item() for x, y in data]
    first = make()
    got = [first.step(x, y).item() for x, y in data[:3]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = make(modules=group(tiny_blocks(seed=99), RANGES[3]), options={"aux_seed": "4"})  # overwritten
    second.load_state_dict(torch.load(buffer, weights_only=True))
    got += [second.step(x, y).item() for x, y in data[3:]]
    assert got == expected
    for a, b in zip(whole.stages[:-1], second.stages[:-1]):
        assert all(torch.equal(u, b.head.state_dict()[n]) for n, u in a.head.state_dict().items())
        assert torch.equal(a.local_loss, b.local_loss)


def test_a_batch_of_one_sample_trains():
    """One flat sample (an epoch's last batch): the head's BatchNorm uses its running statistics."""
    trainer = make(modules=flat_modules())
    for x, y in flat_batches(2, batch=4) + flat_batches(2, batch=1):
        assert math.isfinite(trainer.step(x, y).item())
        assert all(math.isfinite(s.local_loss.item()) for s in trainer.stages[:-1])


# --- options, facts, cost ------------------------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    ({"width": 0}, "bad width 0: must be >= 1"),
    ({"depth": -1}, "bad depth -1: must be >= 0"),
    ({"pooled": 0}, "bad pooled 0: must be >= 1"),
    ({"mlp": -2}, "bad mlp -2: must be >= 0"),
    ({"aux_seed": -1}, "bad aux_seed -1: must be >= 0 and at most 4294967295"),
    ({"aux_seed": 2**32}, "bad aux_seed 4294967296: must be >= 0 and at most 4294967295"),
    ({"width": "wide"}, "bad value 'wide' for option 'width' of 'dgl': expected int or none"),
    ({"hidden": 3}, "option 'hidden' does not apply to method 'dgl'; its options: width, depth, pooled, mlp, aux_seed"),
])
def test_options_are_validated(options, message):
    with pytest.raises(DbenchError) as info:
        make(options=options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_width_none_is_the_module_s_channels():
    t = make(options={"width": "none"})
    t.step(*batches(1)[0])
    first_conv = next(m for m in t.stages[0].head.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.out_channels == 8  # module 0's output channels


def test_needs_the_number_of_classes_and_conv_flat_or_sequence_features():
    with pytest.raises(DbenchError, match="num_classes"):
        Trainer(group(tiny_blocks(), RANGES[3]), "dgl")
    # A module whose output is (N, 1, 4, 6): neither conv, flat nor (positions, width) features.
    modules = [nn.Sequential(nn.Flatten(), nn.Linear(192, 24), nn.Unflatten(1, (1, 1, 4, 6))),
               nn.Sequential(nn.Flatten(), nn.Linear(24, 10))]
    with pytest.raises(DbenchError) as info:
        make(modules=modules).step(*batches(1)[0])
    assert "shape (1, 1, 4, 6) per sample" in str(info.value) and "\n" not in str(info.value)


def test_facts_and_boundary_cost():
    cls = METHODS.get("dgl")
    assert cls.family == "local loss" and cls.locking == "unlocked"
    assert cls.ideal_speedup(1) == 1.0
    assert all(cls.ideal_speedup(k) is None for k in range(2, 6))  # the heads' cost is known by profiling only
    assert cls.facts(2)["default_options"] == DEFAULT_HEAD
    before = torch.get_rng_state()
    for shape in ((16, 8, 8, 8), (16, 12)):
        assert median_seconds(cls.boundary_step(shape, torch.device("cpu"), cls.Options(), 10), torch.device("cpu")) > 0
    assert torch.equal(torch.get_rng_state(), before)  # profiling does not move the global generator


def test_a_run_through_the_cli(tmp_path, monkeypatch, capsys):
    """dbench run --method dgl with an option, a cut profiled by time (the heads' boundary cost): it trains,
    and every module below the top reports its head's memory."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "--method", "dgl", "--model", "mlp", "--gpus", "3", "--epochs", "1",
                                 "--batch-size", "1000", "--split", "time", "--sigma-every", "0", "--quiet",
                                 "--opt", "width=32", "--opt", "mlp=1", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["method_options"] == {**DEFAULT_HEAD, "width": 32, "mlp": 1}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    heads = [m["accounted_bytes"]["auxiliary_head"] for m in epoch["modules"]]
    assert all(b > 0 for b in heads[:-1]) and heads[-1] == 0
    assert math.isfinite(epoch["train_loss"])
