"""Every method: K=1 is BP; DNI/cDNI and DFA/BDFA behave as ALGORITHMS.md says; options are validated."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import batches, group, record_grads, tiny_blocks
from dbench import DbenchError, Trainer
from dbench.registry import METHODS

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
THREE = [(0, 2), (2, 4), (4, 5)]
ALL = ["bp", "fr", "ddg", "fdg", "petra", "dni", "cdni", "dfa", "bdfa", "dgl"]


def make(method, ranges=THREE, **kw):
    return Trainer(group(tiny_blocks(), ranges), method, num_classes=10, **{**SGD, **kw})


# The exact-gradient baselines have their own tests: test_pipeline.py (gpipe, 1f1b), test_ddp.py (ddp) and
# test_schedules.py (torch's multi-stage schedules, which run on torch's runner, not the local engine).
BASELINES = ["gpipe", "1f1b", "ddp", "interleaved-1f1b", "looped-bfs", "zb-interleaved", "zbv", "dualpipev"]
# Decoupled but not BP at K=1 (2BW's K=1 is gradient accumulation with a one-batch delay): test_2bw.py checks
# its K=1 against that loop; the tests below that hold for any method include it.
NOT_BP_AT_K1 = ["2bw"]


def test_every_registered_method_is_covered():
    assert sorted(METHODS.names()) == sorted(ALL + BASELINES + NOT_BP_AT_K1)


@pytest.mark.parametrize("method", ALL)
def test_k1_reduces_to_bp_exactly(method):
    data = batches(5)
    bp, other = make("bp", [(0, 5)]), make(method, [(0, 5)])
    assert [bp.step(x, y).item() for x, y in data] == [other.step(x, y).item() for x, y in data]
    for a, b in zip(bp.modules[0].state_dict().values(), other.modules[0].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ALL + NOT_BP_AT_K1)
def test_every_method_lowers_the_loss_on_a_fixed_batch(method):
    x, y = batches(1)[0]
    trainer = make(method, lr=0.02)
    losses = [trainer.step(x, y) for _ in range(61)]
    # None: no batch reached the top in that iteration (FDG's first K-1, while its pipeline fills)
    first, last = next(l for l in losses if l is not None).item(), losses[-1].item()
    assert last < 0.9 * first, (first, last)  # a loose bar: each method must learn, not race


def grads_at(trainer, t):
    """What each stage hands its optimizer at iteration t (runs t+1 steps of generated data)."""
    seen = record_grads(trainer)
    for x, y in batches(t + 1):
        trainer.step(x, y)
    return {k: g for (it, k), g in seen.items() if it == t}


# --- DNI / cDNI ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_first_synthetic_gradient_is_zero(method):
    trainer = make(method)
    grads = grads_at(trainer, 0)
    for k in (0, 1):
        assert all(torch.count_nonzero(g) == 0 for g in grads[k])  # δ̂ = 0: no gradient yet
    assert any(torch.count_nonzero(g) > 0 for g in grads[2])  # the top has its true gradient
    h = torch.randn(4, 8, 8, 8)
    synth = trainer.stages[0].synth
    fresh = type(synth)(synth.shape, 64, 2, synth.num_classes)
    assert torch.count_nonzero(fresh(h, torch.arange(4) if synth.num_classes else None)) == 0


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_synthesizer_learns_a_fixed_problem(method):
    """Modules nearly frozen (tiny lr), one batch: each synthesizer's regression loss falls."""
    x, y = batches(1)[0]
    trainer = make(method, lr=1e-6, momentum=0.0, weight_decay=0.0, options={"synth_lr": 1e-3})
    history = []
    for _ in range(150):
        trainer.step(x, y)
        history.append([s.synth_loss.item() for s in trainer.stages[:-1]])
    early = torch.tensor(history[1:6]).mean(0)
    late = torch.tensor(history[-5:]).mean(0)
    assert (late < 0.5 * early).all(), (early, late)


def test_dni_target_carries_no_graph(monkeypatch):
    import methods.dni as dni

    seen = []
    real = dni.F.mse_loss

    def spy(prediction, target):
        seen.append((target.requires_grad, target.grad_fn))
        return real(prediction, target)

    monkeypatch.setattr(dni.F, "mse_loss", spy)
    trainer = make("dni")
    for x, y in batches(3):
        trainer.step(x, y)
    assert seen and all(not rg and fn is None for rg, fn in seen)  # 3 steps × 2 synthesizers
    assert len(seen) == 6


def test_cdni_reads_the_labels_and_dni_does_not():
    outputs = {}
    for method in ("dni", "cdni"):
        trainer = make(method, options={"synth_lr": 1e-3})
        for x, y in batches(10):
            trainer.step(x, y)
        stage = trainer.stages[0]
        h = torch.randn(6, *stage.synth.shape)
        with torch.no_grad():
            stage.synth.eval()
            a = stage.predict_gradient(h, torch.zeros(6, dtype=torch.long))
            b = stage.predict_gradient(h, torch.full((6,), 7))
        outputs[method] = (a, b)
    assert torch.equal(*outputs["dni"])
    assert not torch.allclose(*outputs["cdni"])


def test_cdni_needs_the_number_of_classes():
    with pytest.raises(DbenchError, match="num_classes"):
        Trainer(group(tiny_blocks(), THREE), "cdni")


# --- DFA / BDFA ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["dfa", "bdfa"])
def test_feedback_is_fixed_and_top_gradient_is_bp(method):
    trainer = make(method)
    dfa_grads = grads_at(trainer, 0)
    bp_grads = grads_at(make("bp"), 0)
    for a, b in zip(dfa_grads[2], bp_grads[2]):  # same weights, same batch: the top's true gradient
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = [copy.deepcopy(s.feedback) for s in trainer.stages[:-1]]
    for x, y in batches(6, seed=4):
        trainer.step(x, y)
    for fb, s in zip(before, trainer.stages[:-1]):
        assert torch.equal(fb, s.feedback)
    if method == "bdfa":
        for s in trainer.stages[:-1]:
            assert s.feedback.dtype == torch.int8
            assert set(s.feedback.unique().tolist()) == {-1, 1}
    else:
        assert trainer.stages[0].feedback.dtype == torch.float32


@pytest.mark.parametrize("method", ["dfa", "bdfa"])
def test_lower_module_learns_from_e_times_b(method):
    """Module 0's gradient at t=0 is the backprop of e·B_0·scale/sqrt(n) through module 0, computed here."""
    trainer = make(method, options={"scale": 2.0})
    modules = [copy.deepcopy(m) for m in trainer.modules]
    grads = grads_at(trainer, 0)
    x, y = batches(1)[0]
    h0 = modules[0](x)
    h1 = modules[1](h0.detach())
    logits = modules[2](h1.detach().requires_grad_())
    logits.retain_grad()
    nn.functional.cross_entropy(logits, y).backward()
    e = logits.grad
    B = trainer.stages[0].feedback.float()
    n = h0[0].numel()
    h0.backward((e @ B * (2.0 / math.sqrt(n))).view_as(h0))
    for mine, ref in zip(grads[0], [p.grad for p in modules[0].parameters()]):
        torch.testing.assert_close(mine, ref)


# --- options ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("dfa", {"scale": -1}, "bad feedback scale -1.0"),
        ("bdfa", {"feedback_seed": -2}, "bad feedback_seed -2"),
        ("dni", {"hidden": 0}, "bad hidden 0"),
        ("cdni", {"synth_lr": "nan"}, "bad synth_lr nan"),
        ("dni", {"hidden": "wide"}, "bad value 'wide' for option 'hidden' of 'dni': expected int"),
        ("dfa", {"hidden": 3}, "option 'hidden' does not apply to method 'dfa'; its options: scale, feedback_seed"),
        ("fr", {"scale": 1}, "option 'scale' does not apply to method 'fr'; its options: none"),
        ("2bw", {"microbatches": 2}, "bad microbatches 2: 2bw needs at least K = 3 micro-batches per batch "
                                     "(K <= M <= batch size, the paper's m >= d)"),
        ("2bw", {"microbatches": 0}, "bad microbatches 0: must be an integer >= 1"),
    ],
)
def test_options_are_validated(method, options, message):
    with pytest.raises(DbenchError) as info:
        make(method, options=options)
    assert message in str(info.value)


def test_dni_unnormalized_is_the_papers_plain_regression():
    """normalize=false: δ̂ = M(h) and M regresses the raw target, checked by hand on the first two steps."""
    import torch.nn.functional as F

    trainer = make("dni", options={"normalize": "false", "synth_lr": 1e-3})
    stage = trainer.stages[0]
    (x0, y0), (x1, y1) = batches(2)
    seen = []
    real = F.mse_loss

    def spy(prediction, target):
        seen.append((prediction.detach().clone(), target.clone()))
        return real(prediction, target)

    import methods.dni as dni
    dni.F.mse_loss = spy
    try:
        trainer.step(x0, y0)
        # After one step: the prediction the module backpropagates is the raw synthesizer output (gain 1).
        h = torch.randn(4, *stage.synth.shape)
        with torch.no_grad():
            assert torch.equal(stage.predict_gradient(h, y0[:4]), stage.synth(h))
        trainer.step(x1, y1)
    finally:
        dni.F.mse_loss = real
    assert float(stage.target_scale) == 0.0  # no running RMS is kept
    for prediction, target in seen:
        assert target.pow(2).mean().sqrt() < 0.1  # raw gradients of a batch-mean loss, not rescaled to RMS 1
    # The regression loss is plain MSE between the raw prediction and the raw target.
    prediction, target = seen[0]
    assert torch.allclose(real(prediction, target), ((prediction - target) ** 2).mean())


@pytest.mark.parametrize("method", ["dfa", "bdfa"])
def test_feedback_alignment_top_backward_goes_through_stage_backward(method, monkeypatch):
    """The top stage teaches with the output error through Stage.top_step's switch, so the meters see its backward."""
    trainer = make(method)
    top = trainer.stages[-1]
    calls = []
    real = top.backward
    monkeypatch.setattr(top, "backward", lambda tensor, grad=None: (calls.append(grad is not None), real(tensor, grad)))
    for x, y in batches(2):
        trainer.step(x, y)
    assert calls == [False, False]  # once per step, from the loss (the error it sent down came first)


# --- modules without parameters -----------------------------------------------

MODEL_PARALLEL = sorted(name for name in METHODS.names()  # those the local engine runs
                        if METHODS.get(name).parallelism == "model" and "local" in METHODS.get(name).engines)
# Where a module without parameters leaves the numbers of the network without it: the exact-gradient
# methods (the pipelines with M fixed, since their default M is 4K), 2BW (every module at W(t−1) whatever
# K, M fixed), and DFA, whose module 0 draws the same feedback at any K. The delayed and synthetic-gradient methods make it a module with its own delay
# or synthesizer, so their numbers legitimately change.
SAME_WITHOUT_IT = {"bp": {}, "gpipe": {"microbatches": "4"}, "1f1b": {"microbatches": "4"},
                   "2bw": {"microbatches": "4"}, "dfa": {}, "bdfa": {}}


def with_parameter_free(position: str) -> list[nn.Module]:
    """K=3: tiny_blocks' network with a module that has no parameters first, in the middle or at the top."""
    b = tiny_blocks()
    lower, upper, head = nn.Sequential(*b[:2]), nn.Sequential(*b[2:4]), b[4]
    if position == "first":
        return [nn.Identity(), lower, nn.Sequential(upper, head)]
    if position == "middle":  # the conv features flattened on their own module, unflattened by the top
        return [nn.Sequential(lower, upper), nn.Flatten(), nn.Sequential(nn.Unflatten(1, (16, 4, 4)), head)]
    return [lower, nn.Sequential(upper, head), nn.Flatten()]  # the logits, (N, 10), pass unchanged


def test_every_model_parallel_method_is_covered_without_parameters():
    assert set(MODEL_PARALLEL) == set(ALL + ["gpipe", "1f1b"] + NOT_BP_AT_K1)


@pytest.mark.parametrize("position", ["first", "middle", "top"])
@pytest.mark.parametrize("method", MODEL_PARALLEL)
def test_a_module_without_parameters_trains_measures_and_resumes(method, position):
    """Its optimizer holds nothing; it forwards, passes on what its method sends, is probed for σ and
    saved; the modules around it learn (no weight decay: a weight moves only if a gradient reached it)."""
    options = {"microbatches": "4"} if method in ("gpipe", "1f1b") else None
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.0, num_classes=10, options=options)
    trainer = Trainer(with_parameter_free(position), method, measure=True, **kw)
    free = {"first": 0, "middle": 1, "top": 2}[position]
    assert trainer.stages[free].optimizer.param_groups[0]["params"] == []
    before = [copy.deepcopy(m.state_dict()) for m in trainer.modules]
    data = batches(8)
    for x, y in data[:5]:
        loss = trainer.step(x, y)
        assert loss is None or math.isfinite(loss.item())  # None: nothing scored yet (FDG's pipeline filling)
    _, sigmas, network = trainer.sigma_step(*data[5], probe=data[:2])
    assert sigmas[free].sigma is None  # no parameters, no gradient to compare
    assert network.true_grad_norm > 0
    for k, (m, old) in enumerate(zip(trainer.modules, before)):
        if k != free:
            assert any(not torch.equal(w, old[n]) for n, w in m.state_dict().items()), f"module {k} never learned"
    saved = copy.deepcopy(trainer.state_dict())
    resumed = Trainer(with_parameter_free(position), method, **kw)
    resumed.load_state_dict(saved)
    for x, y in data[6:]:
        assert torch.equal(trainer.step(x, y), resumed.step(x, y))
    for a, b in zip(trainer.modules, resumed.modules):
        assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())


@pytest.mark.parametrize("method", sorted(SAME_WITHOUT_IT))
def test_a_module_without_parameters_leaves_the_numbers_of_the_network_without_it(method):
    """nn.Flatten on a module of its own, unflattened above: every loss and weight as if it were not there."""
    three = with_parameter_free("middle")
    two = [copy.deepcopy(three[0]), copy.deepcopy(three[2][1])]  # the same weights, without Flatten/Unflatten
    kw = dict(**SGD, num_classes=10, options=SAME_WITHOUT_IT[method])
    a, b = Trainer(three, method, **kw), Trainer(two, method, **kw)
    data = batches(5)
    assert [a.step(x, y).item() for x, y in data] == [b.step(x, y).item() for x, y in data]
    for mine, theirs in zip([a.modules[0], a.modules[2][1]], b.modules):
        assert all(torch.equal(v, theirs.state_dict()[n]) for n, v in mine.state_dict().items())


# --- DNI / cDNI: a batch of one sample, float64 modules ----------------------------


def flat_modules(dtype=torch.float32) -> list[nn.Module]:
    """K=3 on flat features (N, 6): the synthesizers are linear, with BatchNorm1d."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 8), nn.ReLU()).to(dtype), nn.Sequential(nn.Linear(8, 8), nn.ReLU()).to(dtype),
            nn.Linear(8, 10).to(dtype)]


def flat_batches(n, batch, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 6, generator=g).to(dtype), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_trains_on_batches_of_one_flat_sample(method):
    """One value per channel has no batch statistics: the synthesizer's BatchNorm uses its running ones."""
    trainer = Trainer(flat_modules(), method, num_classes=10, **SGD)
    for x, y in flat_batches(3, batch=4) + flat_batches(4, batch=1):
        assert math.isfinite(trainer.step(x, y).item())
    synth = trainer.stages[0].synth
    norms = [m for m in synth.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(int(m.num_batches_tracked) == 3 for m in norms)  # the batches of one left them alone
    assert trainer.stages[0].synth_loss is not None and math.isfinite(trainer.stages[0].synth_loss.item())
    # In training mode, one sample is normalized exactly as in evaluation mode.
    h, y = torch.randn(1, 8), torch.tensor([3])
    with torch.no_grad():
        training = synth.train()(h, y if method == "cdni" else None)
        evaluation = synth.eval()(h, y if method == "cdni" else None)
    assert torch.equal(training, evaluation)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_trains_on_a_batch_of_one_with_one_pixel_features(method):
    """Conv features of 1x1: BatchNorm2d also sees one value per channel at batch size 1."""
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
               nn.Sequential(nn.Flatten(), nn.Linear(4, 10))]
    trainer = Trainer(modules, method, num_classes=10, **SGD)
    for x, y in batches(3, batch=1):
        assert math.isfinite(trainer.step(x, y).item())


def test_dni_synthesizer_batchnorm_is_torch_batchnorm_above_one_sample():
    """Batches of more than one value per channel: the numbers (and running statistics) of nn.BatchNorm, bit for bit."""
    from dbench.method_tools import SynthBatchNorm1d, SynthBatchNorm2d

    for ours, torchs, shape in ((SynthBatchNorm1d, nn.BatchNorm1d, (5, 7)), (SynthBatchNorm2d, nn.BatchNorm2d, (1, 7, 2, 3))):
        a, b = ours(7), torchs(7)
        b.load_state_dict(a.state_dict())
        for seed in range(3):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(a(x), b(x))
        assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())


@pytest.mark.parametrize("normalize", ["true", "false"])
@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_trains_float64_modules_in_float64(method, normalize):
    """The synthesizer takes the dtype of the module's output; δ̂ and every gradient stay float64."""
    trainer = Trainer(flat_modules(torch.float64), method, num_classes=10, options={"normalize": normalize}, **SGD)
    seen = record_grads(trainer)
    for x, y in flat_batches(3, batch=4, dtype=torch.float64) + flat_batches(1, batch=1, dtype=torch.float64):
        assert trainer.step(x, y).dtype == torch.float64
    for stage in trainer.stages[:-1]:
        assert {p.dtype for p in stage.synth.parameters()} == {torch.float64}
        h = torch.randn(2, 8, dtype=torch.float64)
        assert stage.predict_gradient(h, torch.tensor([1, 2])).dtype == torch.float64
    assert {g.dtype for grads in seen.values() for g in grads} == {torch.float64}
    resumed = Trainer(flat_modules(torch.float64), method, num_classes=10, options={"normalize": normalize}, **SGD)
    resumed.load_state_dict(copy.deepcopy(trainer.state_dict()))
    x, y = flat_batches(1, batch=4, dtype=torch.float64)[0]
    assert trainer.step(x, y).item() == resumed.step(x, y).item()
