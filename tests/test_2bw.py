"""PipeDream-2BW against references written here from ALGORITHMS.md ("PipeDream-2BW"), independently of
methods/twobw.py.

The rule: every micro-batch of batch t runs its forward and its backward at W(t−1), with W(−1) := W(0);
after its last backward of batch t, module k applies g_k(t) (accumulated over the M weighted micro-batches)
to the newest version with the run's own SGD: W(t+1) = opt(W(t), g(t)), at the lr the schedule gave batch t.
Module k (0-based, of K) runs w_k = K−1−k warm-up forwards, then the pairs (F(u + w_k), B(u)), forward first,
over the micro-batches u = t·M + i of every batch in turn, with no flush.

Float tolerance, where one is given: dbench computes each module's gradient from the gradient sent to it, the
reference backpropagates through the whole network in one graph, and the engine (local or distributed) may
run the modules' kernels in other float orders; these agree to float32 rounding, a few ulps per step, which
after 7 SGD steps with momentum stays below rtol 1e-5 / atol 1e-7 (assert_close), while a wrong version
(the gradient at W(t) instead of W(t−1)) moves the weights by ~1e-3 and fails it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import batches, group, tiny_blocks
from dbench import DbenchError, Trainer

SGD = dict(momentum=0.9, weight_decay=5e-4)
LRS = [0.05, 0.04, 0.06, 0.03, 0.05, 0.02, 0.045]  # a schedule that moves every step: η_t must be batch t's
M = 3  # batch 16 in micro-batches of 6, 5, 5: the weighting by each one's share matters
RANGES = {1: [(0, 5)], 2: [(0, 2), (2, 5)], 3: [(0, 2), (2, 4), (4, 5)]}
TOL = dict(rtol=1e-5, atol=1e-7)


def mlp_blocks() -> list[nn.Module]:
    """A small BatchNorm-free MLP on the 3x8x8 batches, as four blocks."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
            nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 10)]


MLP_RANGES = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


def delayed_reference(modules: list[nn.Module], data, microbatches: int, lrs, nesterov=False):
    """The whole network in plain torch: W(t+1) = SGD step from W(t) with the gradient at W(t−1).

    ``newer`` holds W(t) and carries the optimizer; ``older`` holds W(t−1) (W(0) at t = 0) and computes
    the gradient, accumulated over the micro-batches (torch.tensor_split), each micro-batch's mean loss
    weighted by its share of the batch. BatchNorm's running statistics are not versioned: they live in
    ``newer`` and are lent to ``older`` for each batch's forwards, which update them once per micro-batch,
    in micro-batch order. Returns the losses (batch t's, at W(t−1)) and W(0), W(1), … as state dicts.
    """
    newer = nn.Sequential(*copy.deepcopy(modules)).train()
    older = copy.deepcopy(newer)
    opt = torch.optim.SGD(newer.parameters(), lr=lrs[0], nesterov=nesterov, foreach=False, **SGD)
    losses, history = [], [copy.deepcopy(newer.state_dict())]
    for t, (x, y) in enumerate(data):
        with torch.no_grad():
            for a, b in zip(older.buffers(), newer.buffers()):
                a.copy_(b)
        older.zero_grad(set_to_none=True)
        total = 0.0
        for xm, ym in zip(x.tensor_split(microbatches), y.tensor_split(microbatches)):
            loss = F.cross_entropy(older(xm), ym) * (len(ym) / len(y))
            loss.backward()
            total += loss.item()
        losses.append(total)
        with torch.no_grad():
            for a, b in zip(newer.buffers(), older.buffers()):
                a.copy_(b)
            for p, q in zip(older.parameters(), newer.parameters()):
                p.copy_(q)  # W(t): what batch t+1 computes at
        for p, q in zip(newer.parameters(), older.parameters()):
            p.grad = q.grad.clone()
        for g in opt.param_groups:
            g["lr"] = lrs[t]
        opt.step()
        history.append(copy.deepcopy(newer.state_dict()))
    return losses, history


def train(modules, data, microbatches, lrs, **kw):
    trainer = Trainer(modules, "2bw", lr=lrs[0], options={"microbatches": str(microbatches)}, **SGD, **kw)
    losses = []
    for t, (x, y) in enumerate(data):
        trainer.set_lr(lrs[t])
        losses.append(trainer.step(x, y).item())
    return losses, trainer


def flat(trainer) -> list[torch.Tensor]:
    """The whole network's state, module after module (the reference's order)."""
    return [v for m in trainer.modules for v in m.state_dict().values()]


# --- 1. K = 1: gradient accumulation with a one-batch delay ------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_k1_is_sgd_with_a_one_batch_delay(nesterov):
    """K = 1: the hand-written loop above, BatchNorm-free MLP, 7 steps with momentum, weight decay and a moving
    lr. The same ops in the same order: equal to float32 rounding (TOL), in practice bit for bit."""
    data = batches(7)
    want_losses, history = delayed_reference(mlp_blocks(), data, M, LRS, nesterov=nesterov)
    losses, trainer = train(group(mlp_blocks(), MLP_RANGES[1]), data, M, LRS, nesterov=nesterov)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    # batch 0 runs at W(−1) := W(0)
    assert want_losses[0] == pytest.approx(F.cross_entropy(nn.Sequential(*mlp_blocks())(data[0][0]),
                                                           data[0][1]).item(), rel=1e-6)
    for value, ref in zip(flat(trainer), history[7].values(), strict=True):
        torch.testing.assert_close(value, ref, **TOL)
    # and this is not BP: the gradient of batch t at W(t) would give other weights
    bp = Trainer(group(mlp_blocks(), MLP_RANGES[1]), "bp", lr=LRS[0], nesterov=nesterov, **SGD)
    for t, (x, y) in enumerate(data):
        bp.set_lr(LRS[t])
        bp.step(x, y)
    assert not torch.allclose(flat(bp)[0], flat(trainer)[0], rtol=1e-4, atol=1e-6)


# --- 2. K = 2, 3: the same point W(t−1) on every module --------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_every_k_equals_k1_and_the_whole_network_reference(k):
    """BatchNorm-free: at any K every module computes at W(t−1), so K modules give K = 1's weights up to float
    summation order, and the reference's. Modules below the top have not applied the last batch's update yet
    (no drain): their weights are W(7−1), the top module's W(7)."""
    blocks = lambda: tiny_blocks(batchnorm=False)  # noqa: E731
    data = batches(7)
    want_losses, history = delayed_reference(blocks(), data, M, LRS)
    one_losses, one = train(group(blocks(), RANGES[1]), data, M, LRS)
    losses, trainer = train(group(blocks(), RANGES[k]), data, M, LRS)
    assert losses == pytest.approx(one_losses, rel=1e-6)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    for j, (a, b) in enumerate(RANGES[k]):
        reached = 7 if j == k - 1 else 6
        for name, value in trainer.modules[j].state_dict().items():
            block, rest = name.split(".", 1)
            torch.testing.assert_close(value, history[reached][f"{a + int(block)}.{rest}"], msg=f"{j} {name}", **TOL)
    # the top module's blocks also equal K = 1's
    top_a = RANGES[k][-1][0]
    for name, value in trainer.modules[-1].state_dict().items():
        block, rest = name.split(".", 1)
        torch.testing.assert_close(value, one.modules[0].state_dict()[f"{top_a + int(block)}.{rest}"], **TOL)


# --- 3. the schedule and the version each forward uses ----------------------------------------------------------


def record_schedule(trainer, data, m):
    """Per module: the events (kind, index, iteration) in the order they ran (F a forward, B a backward,
    U an update), the weights each forward saw, and the module's weights after each update."""
    events = [[] for _ in trainer.stages]
    seen = [[] for _ in trainer.stages]
    after = [[[p.detach().clone() for p in s.module.parameters()]] for s in trainer.stages]  # W(0), W(1), …
    clock = {"t": 0}
    inputs = [xm for x, _ in data for xm in x.tensor_split(m)]
    for k, stage in enumerate(trainer.stages):
        counts = {"F": 0, "B": 0, "U": 0}

        def forward_hook(module, args, k=k, counts=counts):
            if k == 0:  # module 0's input tells which micro-batch it is
                (index,) = [u for u, xm in enumerate(inputs) if torch.equal(xm, args[0])]
                assert index == counts["F"]
            events[k].append(("F", counts["F"], clock["t"]))
            seen[k].append([p.detach().clone() for p in module.parameters()])
            counts["F"] += 1

        stage.module.register_forward_pre_hook(forward_hook)
        backward = stage.backward

        def record_backward(tensor, grad=None, k=k, counts=counts, backward=backward):
            events[k].append(("B", counts["B"], clock["t"]))
            counts["B"] += 1
            return backward(tensor, grad)

        stage.backward = record_backward
        update = stage.apply_update

        def record_update(k=k, counts=counts, update=update, stage=stage):
            events[k].append(("U", counts["U"], clock["t"]))
            counts["U"] += 1
            yield from update()
            after[k].append([p.detach().clone() for p in stage.module.parameters()])

        stage.apply_update = record_update
    for t, (x, y) in enumerate(data):
        clock["t"] = t
        trainer.step(x, y)
    return events, seen, after


def expected_events(k: int, k_total: int, steps: int, m: int) -> list[tuple[str, int, int]]:
    """ALGORITHMS.md's order for module k: w_k warm-up forwards, then (F(u + w_k), B(u)); U(b) after
    B(b·M + M − 1). Forward F(u) runs in iteration u // M (the iteration of its batch), so B(u) runs in the
    iteration of F(u + w_k)."""
    w = k_total - 1 - k
    total = steps * m
    order = [("F", u, u // m) for u in range(min(w, total))]
    for u in range(total - w):
        order.append(("F", u + w, (u + w) // m))
        order.append(("B", u, (u + w) // m))
        if u % m == m - 1:
            order.append(("U", u // m, (u + w) // m))
    return order


@pytest.mark.parametrize("k_total,m", [(3, 3), (3, 4), (2, 5)])
def test_schedule_and_versions(k_total, m):
    """Every module's forwards, backwards and updates in the section's order and iterations, at most w_k + 1
    forwards awaiting their backward (w_k at the end of each iteration), and each forward of batch t on
    exactly the weights the module held as W(t−1) (bit for bit: the version, not a recomputation)."""
    steps = 4
    data = batches(steps)
    trainer = Trainer(group(tiny_blocks(), RANGES[k_total]), "2bw", lr=0.05, options={"microbatches": str(m)}, **SGD)
    events, seen, after = record_schedule(trainer, data, m)
    for k in range(k_total):
        assert events[k] == expected_events(k, k_total, steps, m), f"module {k}"
        outstanding, most = 0, 0
        for kind, _, _ in events[k]:
            outstanding += {"F": 1, "B": -1, "U": 0}[kind]
            most = max(most, outstanding)
        assert most == k_total - k  # w_k + 1: 1F1B's K − k
        assert outstanding == k_total - 1 - k
        for u, weights in enumerate(seen[k]):
            version = max(u // m - 1, 0)  # W(t−1), W(−1) := W(0)
            for a, b in zip(weights, after[k][version], strict=True):
                assert torch.equal(a, b), (k, u)
        # and the updates moved the weights: W(1) differs from W(0)
        assert not all(torch.equal(a, b) for a, b in zip(after[k][0], after[k][1]))


# --- 4. BatchNorm ----------------------------------------------------------------------------------------------


def test_batchnorm_once_per_microbatch_in_forward_order():
    """K = 3 with BatchNorm: running statistics move once per micro-batch forward, in micro-batch order.

    By hand for module 0's first BatchNorm over batches 0 and 1 (both at W(0)): r ← 0.9·r + 0.1·mean of each
    micro-batch (variance unbiased); micro-batches of 6, 5 and 5 samples make the order matter. Then the whole
    network (weights and statistics) against the reference after 7 steps."""
    data = batches(7)
    trainer = Trainer(group(tiny_blocks(), RANGES[3]), "2bw", lr=LRS[0], options={"microbatches": str(M)}, **SGD)
    conv = copy.deepcopy(tiny_blocks()[0][0])
    mean, var = torch.zeros(8), torch.ones(8)
    for t, (x, y) in enumerate(data[:2]):
        trainer.set_lr(LRS[t])
        trainer.step(x, y)
        with torch.no_grad():
            for xm in x.tensor_split(M):
                z = conv(xm)
                mean = 0.9 * mean + 0.1 * z.mean((0, 2, 3))
                var = 0.9 * var + 0.1 * z.var((0, 2, 3), unbiased=True)
    bn = trainer.modules[0][0][1]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-7)
    for t, (x, y) in enumerate(data[2:], start=2):
        trainer.set_lr(LRS[t])
        trainer.step(x, y)
    for module in trainer.modules:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.num_batches_tracked.item() == 7 * M
    _, history = delayed_reference(tiny_blocks(), data, M, LRS)
    for j, (a, b) in enumerate(RANGES[3]):
        reached = 7 if j == 2 else 6  # weights: modules below the top have not applied batch 6's update yet
        for name, value in trainer.modules[j].state_dict().items():
            block, rest = name.split(".", 1)
            ref = f"{a + int(block)}.{rest}"
            # running statistics are not versioned: every module has run all 7 batches' forwards
            want = history[7 if "running" in rest or "num_batches" in rest else reached][ref]
            torch.testing.assert_close(value, want, msg=f"{j} {name}", **TOL)


# --- 5. what is held ---------------------------------------------------------------------------------------------


def peaks(method, m):
    trainer = Trainer(group(tiny_blocks(), RANGES[3]), method, options={"microbatches": str(m)}, measure=True)
    trainer.meters.start_epoch()
    for x, y in batches(4):
        trainer.step(x, y)
    return trainer, [r["accounted_bytes"] for r in trainer.meters.stop_epoch()]


@pytest.mark.parametrize("m", [4, 8])
def test_two_weight_versions_and_1f1b_activations_are_counted(m):
    """The memory meter counts one second copy of each module's weights (``weight_stash``: 2 versions, not
    3), and the activations of 1F1B: K − k micro-batches on module k. On module 0 the micro-batches it carries
    into the next iteration are copies of their slice of the input (a view would keep the whole batch alive),
    so it holds at most those w_0 slices more than 1F1B."""
    trainer, twobw = peaks("2bw", m)
    _, onefb = peaks("1f1b", m)
    for k, (mine, theirs) in enumerate(zip(twobw, onefb)):
        weights = sum(p.numel() * p.element_size() for p in trainer.modules[k].parameters())
        assert mine["weight_stash"] == weights
        assert mine["optimizer"] == theirs["optimizer"]
        if k > 0:
            assert mine["activations"] == theirs["activations"]
    slice_bytes = (16 // m) * 3 * 8 * 8 * 4
    assert onefb[0]["activations"] <= twobw[0]["activations"] <= onefb[0]["activations"] + 2 * slice_bytes


def test_only_the_current_batch_s_last_microbatches_stay_in_flight():
    """After iteration t, module k keeps graphs of batch t only (its last w_k micro-batches, built in iteration
    t), and the top module none: nothing is left unvisited to pile up across iterations."""
    trainer = Trainer(group(tiny_blocks(), RANGES[3]), "2bw", options={"microbatches": "4"}, measure=True)
    for t, (x, y) in enumerate(batches(5)):
        trainer.step(x, y)
        live = [m.saved for m in trainer.meters.stages]
        assert live[2].live == {}
        assert set(live[0].born) == set(live[1].born) == {t}


# --- 6. the engines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_the_distributed_engine_equals_the_local_one(k, tmp_path):
    """K processes against the local engine, one thread each: losses, σ at a probe step, predictions and the
    whole state (both weight versions, the gradient accumulated so far, the micro-batches in flight, queued
    messages) bit for bit."""
    from distributed_workers import equivalence_worker
    from dbench.engine.launch import free_port
    from test_distributed import assert_same, local_reference

    out = tmp_path / "results.pt"
    mp.start_processes(equivalence_worker, args=(k, free_port(), ["2bw"], str(out)), nprocs=k, start_method="spawn",
                       join=True)
    got = torch.load(out, weights_only=False)["2bw"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = local_reference("2bw", k)
    finally:
        torch.set_num_threads(threads)
    assert len(want["losses"]) == 5 and want["state"]["engine"]["stages"][0]["in_flight"]  # a micro-batch in flight
    assert_same(want, got, "2bw")


# --- 7. resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 4])
def test_state_dict_round_trip_mid_flight_continues_exactly(cut):
    """Stopped with micro-batches in flight (their graphs rebuilt from the saved inputs without counting them in
    BatchNorm again), half a batch's gradient accumulated, and an lr not yet applied: the same losses, weights
    and running statistics as never stopping, bit for bit."""
    data = batches(8)
    lrs = LRS + [0.01]
    want, whole = train(group(tiny_blocks(), RANGES[3]), data, 4, lrs)
    first = Trainer(group(tiny_blocks(), RANGES[3]), "2bw", lr=lrs[0], options={"microbatches": "4"}, **SGD)
    got = []
    for t, (x, y) in enumerate(data[:cut]):
        first.set_lr(lrs[t])
        got.append(first.step(x, y).item())
    state = copy.deepcopy(first.state_dict())
    stages = state["engine"]["stages"]
    assert [len(s["in_flight"]) for s in stages] == [2, 1, 0]
    assert stages[0]["gradient"] and stages[0]["lrs"]  # batch ``cut``: half its gradient, its lr, not applied
    second = Trainer(group(tiny_blocks(seed=99), RANGES[3]), "2bw", lr=0.3, options={"microbatches": "4"}, **SGD)
    second.load_state_dict(state)
    for t, (x, y) in enumerate(data[cut:], start=cut):
        second.set_lr(lrs[t])
        got.append(second.step(x, y).item())
    assert got == want
    for a, b in zip(flat(whole), flat(second), strict=True):
        assert torch.equal(a, b)


# --- 8. options (and through the CLI: tests/test_cli.py's BAD, tests/test_methods.py's options) ------------------


def test_microbatches_fewer_than_k_are_refused_in_one_line():
    with pytest.raises(DbenchError, match=r"^bad microbatches 2: 2bw needs at least K = 3 micro-batches per batch"):
        Trainer(group(tiny_blocks(), RANGES[3]), "2bw", options={"microbatches": "2"})
    trainer = Trainer(group(tiny_blocks(), RANGES[3]), "2bw", options={"microbatches": "3"})
    x, y = batches(1, batch=2)[0]
    with pytest.raises(DbenchError, match="2bw got a batch of 2 samples at iteration 0: it needs at least K = 3"):
        trainer.step(x, y)


def test_facts():
    from dbench.method import DELAYED_GRADIENT, parse_options
    from dbench.registry import METHODS

    cls = METHODS.get("2bw")
    assert cls.family == DELAYED_GRADIENT
    assert cls.ideal_speedup(1) == 1.0 and cls.ideal_speedup(4) == 4.0
    assert cls.ideal_speedup(4, parse_options(cls, {"microbatches": "16"})) == 4.0  # no bubble: M does not enter
    assert METHODS.get("1f1b").table_order < cls.table_order < METHODS.get("ddg").table_order
