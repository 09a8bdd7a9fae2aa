"""PETRA against a hand-unrolled reference written here from docs/ALGORITHMS.md's PETRA section.

The reference indexes every message by the step that sent it and lets each module read only what was sent
at step s-1, so every module works "at once" as the section says. Within a step it runs the section's order:
forward (at θ_k^s, no graph, BatchNorm counting the batch), backward (block by block from the module's top
block: a reversible block's input rebuilt with its ``inverse`` at the current weights, or at the weights of
that batch's forward with the parameter buffer, a block that is not reversible or every block with the input
buffer taking the input stored by the forward; the block recomputed at that input with a graph, its
running statistics left alone), then the update every A backwards with the mean gradient. It shares no
code with methods/petra.py: its weight copies are deep copies of the module, its BatchNorm is restored by
hand.
"""
from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch import nn

from conftest import (SGD, batches, bn_state, group, record_grads, restore_bn, run_cli, sgd, tiny_blocks,
                      tiny_revnet_blocks)
from dbench import Trainer
from dbench.errors import DbenchError
from dbench.method import parse_options
from dbench.registry import METHODS

# tiny_revnet_blocks: stem, R, R, D, head
RANGES = {1: [(0, 5)], 2: [(0, 3), (3, 5)], 3: [(0, 2), (2, 4), (4, 5)], 4: [(0, 1), (1, 2), (2, 3), (3, 5)]}
VARIANTS = {"petra": {}, "input buffer": {"input_buffer": True}, "param buffer": {"param_buffer": True},
            "both buffers": {"input_buffer": True, "param_buffer": True}}


def reversible(block):
    return hasattr(block, "inverse")


def reference_petra(modules, data, accumulation=1, input_buffer=False, param_buffer=False):
    """PETRA unrolled. Returns {t: (batch, loss)}, {(t, k): grads handed to the optimizer}, every module's
    state after each step, {(t, k, j): max |rebuilt input - stored input|} of each reversible block's
    backward, and the modules."""
    modules = copy.deepcopy(modules)
    for m in modules:
        m.train()
    K = len(modules)
    opts = [sgd(m) for m in modules]
    ups = {}  # (k, t) -> the output module k sent up at step t
    downs = {}  # (k, t) -> (input, gradient) module k+1 sent down to module k at step t
    kept = {}  # (k, batch) -> (every block's input in the forward, a copy of the module as it ran it or None)
    counted = [0] * K  # backwards since module k's last update
    losses, grads, states, gaps = {}, {}, [], {}
    for t in range(len(data)):
        backwards = []
        for k in range(K):  # any order: a module reads only messages of step t-1
            batch = t - k
            if k == K - 1:  # the top: forward, loss, backward of the batch it received (exact)
                if batch >= 0:
                    h = data[batch][0] if K == 1 else ups[(k - 1, t - 1)]
                    inp = h.clone().requires_grad_(K > 1)
                    loss = nn.functional.cross_entropy(modules[k](inp), data[batch][1])
                    loss.backward()  # into the accumulator, .grad
                    losses[t] = (batch, loss.item())
                    if K > 1:
                        downs[(k - 1, t)] = (h.clone(), inp.grad.clone())
                    backwards.append(k)
                continue
            if batch >= 0:  # forward of batch t-k at θ_k^t, no graph; BatchNorm counts the batch here
                h = data[batch][0] if k == 0 else ups[(k - 1, t - 1)]
                inputs = []
                with torch.no_grad():
                    for block in modules[k]:
                        inputs.append(h)
                        h = block(h)
                snapshot = None
                if param_buffer:
                    snapshot = copy.deepcopy(modules[k])
                    snapshot.zero_grad(set_to_none=True)
                kept[(k, batch)] = (inputs, snapshot)
                ups[(k, t)] = h
            late = t - 2 * (K - 1) + k
            if late >= 0:  # backward of batch t-2(K-1)+k with the pair module k+1 sent at t-1
                inputs, snapshot = kept.pop((k, late))
                at = snapshot if param_buffer else modules[k]  # the weights of the reconstruction and recompute
                y, delta = downs[(k, t - 1)]
                for j in reversed(range(len(at))):
                    block = at[j]
                    if reversible(block):
                        saved = bn_state(block)
                        with torch.no_grad():
                            rebuilt = block.inverse(y)
                        restore_bn(block, saved)
                        gaps[(t, k, j)] = (rebuilt - inputs[j]).abs().max().item()
                    x = inputs[j] if input_buffer or not reversible(block) else rebuilt
                    x = x.clone().requires_grad_()
                    saved = bn_state(block)
                    out = block(x)
                    restore_bn(block, saved)
                    out.backward(delta)
                    y, delta = x.detach(), x.grad
                if snapshot is not None:  # the stored weights' gradient goes to the module's accumulator
                    for p, q in zip(modules[k].parameters(), snapshot.parameters()):
                        p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
                if k > 0:
                    downs[(k - 1, t)] = (y, delta)
                backwards.append(k)
        for k in backwards:  # then the updates, every A backwards, with the mean gradient
            counted[k] += 1
            if counted[k] == accumulation:
                for p in modules[k].parameters():
                    p.grad /= accumulation
                grads[(t, k)] = [p.grad.clone() for p in modules[k].parameters()]
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                counted[k] = 0
        states.append([copy.deepcopy(m.state_dict()) for m in modules])
    return losses, grads, states, gaps, modules


def petra(K, blocks=None, **options):
    text = {name: str(value).lower() for name, value in options.items()}
    return Trainer(group(blocks or tiny_revnet_blocks(), RANGES[K]), "petra", options=text, num_classes=10, **SGD)


def assert_same_state(mine, ref, what=""):
    for k, (a, sb) in enumerate(zip(mine, ref)):
        sa = a.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:  # weights and BatchNorm running statistics
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6, msg=f"{what} module {k} {name}")


CASES = [(K, variant, 1) for K in (2, 3) for variant in VARIANTS] + [(3, "petra", 2), (3, "param buffer", 2)]


@pytest.mark.parametrize("K,variant,accumulation", CASES)
def test_matches_hand_unrolled_reference(K, variant, accumulation):
    """Step by step: the loss and which batch it belongs to, the weights and BN statistics of every module;
    and the gradient of every update (which also says who updates when: the warm-up)."""
    blocks, data = tiny_revnet_blocks(), batches(10)
    options = {**VARIANTS[variant], "accumulation": accumulation}
    ref_losses, ref_grads, ref_states, _, _ = reference_petra(group(blocks, RANGES[K]), data, **options)
    trainer = petra(K, blocks, **options)
    grads = record_grads(trainer)
    for t, (x, y) in enumerate(data):
        out = trainer.step_output(x, y)
        if t < K - 1:
            assert out is None and t not in ref_losses  # the first K-1 steps score nothing
        else:
            batch, loss = ref_losses[t]
            assert batch == t - (K - 1)
            assert torch.equal(out.labels, data[batch][1])  # the labels of the batch it scored
            assert out.loss.item() == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {t}"
        assert_same_state(trainer.modules, ref_states[t], f"step {t}")
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        for mine, ref in zip(grads[key], ref_grads[key]):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7, msg=str(key))


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_warm_up(K, accumulation):
    """Module k's first backward comes at step 2(K-1)-k and then one every step; its updates at the A-th
    backward and every A steps after."""
    trainer = petra(K, accumulation=accumulation)
    grads = record_grads(trainer)
    backwards = {k: [] for k in range(K)}
    for k, stage in enumerate(trainer.stages):
        real = stage.backward

        def spy(tensor, grad=None, k=k, real=real):
            backwards[k].append(trainer.iteration)
            return real(tensor, grad)

        stage.backward = spy
    n = 2 * (K - 1) + 5
    for x, y in batches(n):
        trainer.step(x, y)
    for k in range(K):
        first = 2 * (K - 1) - k
        assert sorted(set(backwards[k])) == list(range(first, n)), f"module {k}"
        assert sorted(t for t, m in grads if m == k) == list(range(first + accumulation - 1, n, accumulation))


def test_k1_is_bp():
    blocks, data = tiny_revnet_blocks(), batches(5)
    bp = Trainer(group(blocks, RANGES[1]), "bp", **SGD)
    other = petra(1, blocks)
    assert [bp.step(x, y).item() for x, y in data] == [other.step(x, y).item() for x, y in data]
    for a, b in zip(bp.modules[0].state_dict().values(), other.modules[0].state_dict().values()):
        assert torch.equal(a, b)


def test_k1_with_accumulation_is_bp_with_gradient_accumulation():
    """A = 2 at K = 1: one step of the run's SGD every 2 batches, with the mean of their two gradients."""
    blocks, data = tiny_revnet_blocks(), batches(6)
    model = nn.Sequential(*copy.deepcopy(blocks)).train()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    ref = []
    for i, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        ref.append(loss.item())
        if i % 2 == 1:
            for p in model.parameters():
                p.grad /= 2
            opt.step()
            opt.zero_grad(set_to_none=True)
    trainer = petra(1, blocks, accumulation=2)
    assert [trainer.step(x, y).item() for x, y in data] == ref
    for (name, a), b in zip(trainer.modules[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_param_buffer_gives_the_same_weights_with_or_without_the_input_buffer():
    """With the forward's weights, the reconstruction is exact up to rounding (the section's second test)."""
    data = batches(10)
    a, b = petra(3, param_buffer=True), petra(3, param_buffer=True, input_buffer=True)
    for x, y in data:
        la, lb = a.step(x, y), b.step(x, y)
        assert (la is None) == (lb is None)
    for ma, mb in zip(a.modules, b.modules):
        for (name, u), v in zip(ma.state_dict().items(), mb.state_dict().values()):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)


def test_the_reconstruction_is_an_approximation_once_the_weights_move():
    """Without buffers the input is rebuilt at the current weights: exact while a module has not updated
    since the forward, not after. PETRA's gradients are then the reconstructing reference's, not those of
    the stored inputs (the input-buffer variant)."""
    K, data = 3, batches(10)
    blocks = tiny_revnet_blocks()
    _, ref_grads, _, gaps, _ = reference_petra(group(blocks, RANGES[K]), data)
    _, stored_grads, _, _, _ = reference_petra(group(blocks, RANGES[K]), data, input_buffer=True)
    # module 0's first backward (step 4, batch 0) comes before its first update: every rebuilt input exact
    first = 2 * (K - 1)
    assert [g for (t, k, _), g in gaps.items() if k == 0 and t == first] and \
        all(g < 1e-5 for (t, k, _), g in gaps.items() if k == 0 and t == first)
    # two updates later, the rebuilt inputs are visibly off
    assert max(g for (t, k, _), g in gaps.items() if k == 0 and t == first + 2) > 1e-3
    trainer = petra(K, blocks)
    grads = record_grads(trainer)
    for x, y in data:
        trainer.step(x, y)
    late = (len(data) - 1, 0)
    for mine, ref, stored in zip(grads[late], ref_grads[late], stored_grads[late]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(mine, stored, rtol=1e-3, atol=1e-5)
               for mine, stored in zip(grads[late], stored_grads[late]))


@pytest.mark.parametrize("variant", ["petra", "param buffer"])
def test_the_fused_reconstruction_is_inverse_then_forward_bit_for_bit(variant, monkeypatch):
    """A reversible block that offers ``reconstruct`` rebuilds its input and recomputes its output with one
    evaluation of its residual function F (the section's fused cost: forward, recompute, backward); without
    it, ``inverse`` then the forward evaluate F twice. The numbers are the same, bit for bit."""
    from dbench.models.revnet import Reversible

    def run():
        trainer = petra(3, **VARIANTS[variant])
        calls = {"forward": 0}
        for module in trainer.modules:
            for block in module:
                if isinstance(block, Reversible):
                    block.residual.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
        losses = [trainer.step(x, y) for x, y in batches(8)]
        return trainer, [None if v is None else v.item() for v in losses], calls["forward"]

    fused, fused_losses, fused_calls = run()
    monkeypatch.delattr(Reversible, "reconstruct")
    plain, plain_losses, plain_calls = run()
    assert fused_losses == plain_losses
    for a, b in zip(fused.modules, plain.modules):
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), name
    # K = 3, 8 steps: module 0 (its one R) backpropagates batches 0-3, module 1 (its one R) batches 0-4
    reconstructions = 4 + 5
    assert plain_calls - fused_calls == reconstructions


def weight_versions(update_steps, forward_steps):
    """How many different weights the forwards made at ``forward_steps`` ran on: a forward at step f runs on
    the weights after every update made at a step before f."""
    return len({sum(1 for u in update_steps if u < f) for f in forward_steps})


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_what_each_module_stores(variant, accumulation):
    """After every step from the warm-up on, module k < K-1 holds 2(K-1-k) batches in flight: the input of
    each block that is not reversible (every block with the input buffer) and, with the parameter buffer,
    the weights of each forward, one copy per different weights (A = 1: one per forward in steady state).
    The top module stores only the K-1 queued labels."""
    K = 3
    options = VARIANTS[variant]
    trainer = petra(K, accumulation=accumulation, **options)
    grads = record_grads(trainer)
    n = 4 * (K - 1) + 3
    for t, (x, y) in enumerate(batches(n)):
        trainer.step(x, y)
        if t < 2 * (K - 1):
            continue
        for k, stage in enumerate(trainer.stages):
            held = stage.held_tensors()
            if k == K - 1:
                assert held["stored_inputs"] == [] and held["weight_snapshots"] == []
                assert len(held["stored_labels"]) == K - 1
                continue
            in_flight = 2 * (K - 1 - k)
            blocks = list(trainer.modules[k])
            keeping = len(blocks) if options.get("input_buffer") else sum(not reversible(b) for b in blocks)
            assert len(held["stored_inputs"]) == in_flight * keeping, f"step {t} module {k}"
            params = list(trainer.modules[k].parameters())
            if options.get("param_buffer"):
                updates = [s for s, m in grads if m == k]
                forwards = range(t - in_flight + 1, t + 1)
                copies = weight_versions(updates, forwards)
                assert len(held["weight_snapshots"]) == copies * len(params), f"step {t} module {k}"
                if accumulation == 1 and t >= 2 * (K - 1) - k + in_flight:
                    assert copies == in_flight  # steady state: every forward on other weights
            else:
                assert held["weight_snapshots"] == []


def test_the_memory_meter_counts_what_petra_stores():
    """The accounted peak holds 2(K-1-k) batches of stored inputs (backward before the new forward: not
    one more) and no graph but one block's: less in activations than FDG, which keeps 2(K-1-k) graphs."""
    K = 3
    data = batches(2 * (K - 1) + 3)
    peaks = {}
    for method in ("petra", "fdg"):
        t = Trainer(group(tiny_revnet_blocks(), RANGES[K]), method, measure=True, **SGD)
        t.meters.start_epoch()
        for x, y in data:
            t.step(x, y)
        peaks[method] = t.meters.stop_epoch()
    x = data[0][0]
    stem_input = x.numel() * x.element_size()  # module 0 keeps the stem's input (the data); its R none
    with torch.no_grad():
        down_input = group(tiny_revnet_blocks(), [(0, 3)])[0](x)  # module 1 keeps the downsampling block's
    per_batch = [stem_input, down_input.numel() * down_input.element_size()]
    for k in range(K - 1):
        mine, theirs = peaks["petra"][k]["accounted_bytes"], peaks["fdg"][k]["accounted_bytes"]
        assert mine["stored_inputs"] == 2 * (K - 1 - k) * per_batch[k], f"module {k}"
        assert mine["weight_snapshots"] == 0
        assert mine["activations"] < theirs["activations"] / 2, f"module {k}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batchnorm_counts_each_batch_once(variant):
    """Module k has run the forward of n-k batches after n steps, each counted once in its running
    statistics; the reconstructions and recomputes of the backward count none."""
    K, n = 3, 8
    trainer = petra(K, **VARIANTS[variant])
    for x, y in batches(n):
        trainer.step(x, y)
    for k, module in enumerate(trainer.modules):
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms or k == K - 1
        for m in norms:
            assert m.num_batches_tracked.item() == n - k, f"module {k}"


def test_a_model_without_reversible_blocks_stores_every_input():
    """No block has an inverse: every block keeps its input, which is the input-buffer variant exactly."""
    data = batches(8)
    ranges = [(0, 2), (2, 4), (4, 5)]
    a = Trainer(group(tiny_blocks(), ranges), "petra", **SGD)
    b = Trainer(group(tiny_blocks(), ranges), "petra", options={"input_buffer": "true"}, **SGD)
    assert [None if v is None else v.item() for v in (a.step(x, y) for x, y in data)] == \
        [None if v is None else v.item() for v in (b.step(x, y) for x, y in data)]
    for ma, mb in zip(a.modules, b.modules):
        assert all(torch.equal(u, v) for u, v in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert len(a.stages[0].held_tensors()["stored_inputs"]) == 2 * 2 * 2  # 2(K-1) batches, 2 blocks


@pytest.mark.parametrize("cut", [3, 7])
@pytest.mark.parametrize("options", [{}, {"param_buffer": True, "accumulation": 2},
                                     {"input_buffer": True, "accumulation": 3}])
def test_state_dict_round_trip_continues_exactly(cut, options):
    """Stop after ``cut`` steps (3: inside module 0's warm-up; 7: batches in flight, with A > 1 a gradient
    half accumulated, with the parameter buffer weight copies shared by forwards), save through a checkpoint
    file's format, load into a fresh trainer, continue: as never stopped, bit for bit."""
    K, data = 3, batches(11)
    whole = petra(K, **options)
    expected = [whole.step(x, y) for x, y in data]

    first = petra(K, **options)
    got = [first.step(x, y) for x, y in data[:cut]]
    held = {k: len(s.held_tensors()["weight_snapshots"]) for k, s in enumerate(first.stages)}
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = petra(K, blocks=tiny_revnet_blocks(seed=99), **options)  # other weights, overwritten
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert {k: len(s.held_tensors()["weight_snapshots"]) for k, s in enumerate(second.stages)} == held
    got += [second.step(x, y) for x, y in data[cut:]]
    assert [None if v is None else v.item() for v in got] == [None if v is None else v.item() for v in expected]
    for a, b in zip(second.modules, whole.modules):
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), name


def test_distributed_equals_local(tmp_path):
    """The process-per-module engine reproduces the local one bit for bit on the small RevNet at K = 3:
    losses, σ at a probe step, predictions and the whole final state (flights, weights, optimizer)."""
    import torch.multiprocessing as mp

    from distributed_workers import equivalence_worker
    from dbench.engine.launch import free_port
    from test_distributed import assert_same, local_reference

    out = tmp_path / "results.pt"
    mp.start_processes(equivalence_worker, args=(3, free_port(), ["petra"], str(out), "revnet"), nprocs=3,
                       start_method="spawn", join=True)
    got = torch.load(out, weights_only=False)["petra"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: float sums in the same order
    try:
        want = local_reference("petra", 3, "revnet")
    finally:
        torch.set_num_threads(threads)
    assert len(got["losses"]) == len(want["losses"]) > 0
    assert_same(want, got, "petra")


def test_a_mid_epoch_checkpoint_resumes_to_the_numbers_of_an_unbroken_run(tmp_path, monkeypatch):
    """Through the runner and the checkpoint file, stopped inside the first epoch with batches in flight, a
    gradient half accumulated (A = 2) and weight copies stored: the resumed run ends with every number of
    the unbroken one."""
    from conftest import interrupted_at_step
    from dbench import run as runner
    from dbench.config import RunConfig
    from test_resume import numbers

    cfg = dict(method="petra", method_options={"accumulation": "2", "param_buffer": "true"}, model="mlp", gpus=3,
               epochs=1, batch_size=1000, seed=1, sigma_every=0)  # 10 steps
    whole = runner.start(RunConfig(**cfg), tmp_path / "whole", quiet=True)
    cut = tmp_path / "cut"
    # the checkpoint after 4 steps: module 1 has made one backward (step 3) of the two it accumulates, module 0
    # holds 4 batches in flight with their weights
    with interrupted_at_step(monkeypatch, 6), pytest.raises(runner.RunInterrupted, match=r"4 step\(s\) of epoch 1"):
        runner.start(RunConfig(**cfg, checkpoint_every=4), cut, quiet=True)
    runner.resume(cut, quiet=True)
    assert numbers(cut) == numbers(whole)


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,text,message", [
    ("accumulation", "0", "bad accumulation 0: must be an integer >= 1"),
    ("accumulation", "-2", "bad accumulation -2: must be an integer >= 1"),
    ("accumulation", "1.5", "bad value '1.5' for option 'accumulation' of 'petra': expected int"),
    ("input_buffer", "maybe", "bad value 'maybe' for option 'input_buffer' of 'petra': expected bool"),
    ("param_buffer", "2", "bad value '2' for option 'param_buffer' of 'petra': expected bool"),
])
def test_bad_options_are_refused_in_one_line(option, text, message):
    with pytest.raises(DbenchError, match=f"^{re.escape(message)}$"):
        parse_options(METHODS.get("petra"), {option: text})


@pytest.mark.parametrize("built,message", [
    (dict(accumulation=0), "bad accumulation 0: must be an integer >= 1"),
    (dict(accumulation=True), "bad accumulation True: must be an integer >= 1"),
    (dict(accumulation=2.0), "bad accumulation 2.0: must be an integer >= 1"),
    (dict(input_buffer=1), "bad input_buffer 1: must be true or false"),
    (dict(param_buffer="yes"), "bad param_buffer 'yes': must be true or false"),
])
def test_built_options_are_validated(built, message):
    with pytest.raises(DbenchError, match=f"^{re.escape(message)}$"):
        Trainer(group(tiny_revnet_blocks(), RANGES[2]), "petra", options=METHODS.get("petra").Options(**built))


@pytest.mark.parametrize("opt,message", [
    ("accumulation=0", "bad accumulation 0: must be an integer >= 1"),
    ("input_buffer=maybe", "bad value 'maybe' for option 'input_buffer' of 'petra': expected bool"),
])
def test_bad_options_through_the_cli_exit_2_in_one_line(opt, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--method", "petra", "--opt", opt, "--model", "revnet14"], monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {message}"]
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []


def test_facts():
    cls = METHODS.get("petra")
    options = parse_options(cls, {"accumulation": "4", "input_buffer": "yes", "param_buffer": "off"})
    assert (options.accumulation, options.input_buffer, options.param_buffer) == (4, True, False)
    facts = cls.facts(4)
    assert facts["family"] == "delayed gradient" and facts["locking"] == "unlocked"
    assert facts["ideal_speedup"] == pytest.approx(3 * 4 / 4)  # period 4F/K: the section's fused cost, as FR
    assert facts["default_options"] == {"accumulation": 1, "input_buffer": False, "param_buffer": False}
    assert METHODS.get("fdg").table_order < cls.table_order < METHODS.get("dni").table_order
    assert math.isclose(cls.ideal_speedup(1), 1.0)
