"""torch's multi-stage pipeline schedules as exact baselines (methods/schedules.py): GPipe's update, through
torch.distributed.pipelining's runner, with dbench's refusals and ideal speedups (ALGORITHMS.md, "Frontier
exact schedules")."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from conftest import group
from distributed_workers import PIECES, RANGES, WORKLOADS, schedules_worker
from dbench import Trainer
from dbench.config import RunConfig
from dbench.engine.launch import free_port
from dbench.errors import DbenchError
from dbench.method import parse_options
from dbench.plan import check
from dbench.registry import METHODS

SCHEDULES = ["interleaved-1f1b", "looped-bfs", "zb-interleaved", "zbv", "dualpipev"]
M = 4


def gpipe_reference(workload: str, microbatches: int, last: int = 12):
    """dbench's GPipe on the local engine (K = 2, M = 4), the same batches as the worker: its losses, the
    logits of the test inputs, and the weights of every block in order."""
    blocks, batches_of, classes = WORKLOADS[workload]
    train, _, test_x = batches_of()
    trainer = Trainer(group(blocks(), RANGES[2]), "gpipe", lr=0.05, momentum=0.9, weight_decay=0.0,
                      options={"microbatches": str(microbatches)}, num_classes=classes)
    losses = [trainer.step(x, y) for x, y in train + [(train[0][0][:last], train[0][1][:last])]]
    weights = [w for module in trainer.modules for w in module.state_dict().values()]
    return losses, trainer.predict(test_x), weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("schedules") / "out.pt")
    runs = [(m, "image-nobn", M) for m in SCHEDULES] + [("zbv", "text", 2)]
    mp.start_processes(schedules_worker, args=(2, free_port(), runs, path), nprocs=2, start_method="forkserver")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("method,workload,microbatches", [(m, "image-nobn", M) for m in SCHEDULES] + [("zbv", "text", 2)])
def test_equals_gpipe_on_a_batchnorm_free_model(trained, method, workload, microbatches):
    """Five batches of 16 and one of 12 (its own runner: torch's stages keep one shape), with momentum: the
    losses, the final weights of every block and the predicted logits are GPipe's, to float tolerance (the
    same micro-batch sums in another order: torch's runner and the I/W split accumulate differently)."""
    torch.set_num_threads(1)
    want_losses, want_logits, want_weights = gpipe_reference(workload, microbatches)
    got = trained[(method, workload)]
    assert [x.item() for x in got["losses"]] == pytest.approx([x.item() for x in want_losses], rel=1e-5)
    mine = [w for piece in got["weights"] for w in piece.values()]
    assert len(mine) == len(want_weights)
    for a, b in zip(mine, want_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["logits"], want_logits, rtol=1e-4, atol=1e-5)


def test_a_wrong_update_would_fail(trained):
    """The comparison can fail: a GPipe trained with M = 1 on a differently weighted loss is not equal."""
    blocks, batches_of, classes = WORKLOADS["image-nobn"]
    train, _, _ = batches_of()
    other = Trainer(group(blocks(), RANGES[2]), "gpipe", lr=0.1, momentum=0.9, weight_decay=0.0,
                    options={"microbatches": "1"}, num_classes=classes)
    for x, y in train:
        other.step(x, y)
    theirs = [w for m in other.modules for w in m.state_dict().values()]
    mine = [w for piece in trained[("interleaved-1f1b", "image-nobn")]["weights"] for w in piece.values()]
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(mine, theirs))


def test_placement_and_modules_per_device():
    looped, vshape = METHODS.get("interleaved-1f1b"), METHODS.get("zbv")
    three = parse_options(looped, {"virtual": "3"})
    assert looped.modules_per_device(three) == 3
    assert [looped.placement(k, 2, three) for k in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [vshape.placement(k, 3) for k in range(3)] == [[0, 5], [1, 4], [2, 3]]
    assert vshape.holder(5, 3) == 0 and looped.holder(5, 2, three) == 1
    assert len(PIECES) == 4


def test_ideal_speedups_are_the_papers_bubbles():
    """K / (1 + bubble), the bubble as ALGORITHMS.md gives it per schedule (t_F = t_I = t_W)."""
    def opts(name, **kw):
        return parse_options(METHODS.get(name), {k: str(v) for k, v in kw.items()})

    assert METHODS.get("interleaved-1f1b").ideal_speedup(4, opts("interleaved-1f1b", microbatches=8, virtual=2)) \
        == pytest.approx(4 / (1 + 3 / 16))
    assert METHODS.get("looped-bfs").ideal_speedup(4, opts("looped-bfs", microbatches=8, virtual=3)) \
        == pytest.approx(4 / (1 + 3 / 24))
    # V = 1 interleaved is 1F1B's order: its ideal is 1F1B's
    assert METHODS.get("interleaved-1f1b").ideal_speedup(4, opts("interleaved-1f1b", microbatches=16, virtual=1)) \
        == pytest.approx(METHODS.get("1f1b").ideal_speedup(4, parse_options(METHODS.get("1f1b"), {"microbatches": "16"})))
    assert METHODS.get("zb-interleaved").ideal_speedup(4, opts("zb-interleaved", microbatches=8, virtual=1)) \
        == pytest.approx(4 / (1 + 3 / 24))
    assert METHODS.get("zb-interleaved").ideal_speedup(4, opts("zb-interleaved", microbatches=8, virtual=2)) is None
    assert METHODS.get("zbv").ideal_speedup(4, opts("zbv", microbatches=8)) == pytest.approx(4.0)
    assert METHODS.get("zbv").ideal_speedup(4, opts("zbv", microbatches=4)) is None
    assert METHODS.get("dualpipev").ideal_speedup(4, opts("dualpipev", microbatches=8)) \
        == pytest.approx(4 / (1 + 2 * 3 / 24))
    for name in SCHEDULES:
        assert METHODS.get(name).ideal_speedup(1) == 1.0


REFUSALS = [
    (dict(method="interleaved-1f1b", model="cnn", gpus=2, method_options={"virtual": "3"}),
     r"cannot cut cnn \(5 blocks\) into V\*K = 3\*2 = 6 modules for interleaved-1f1b"),
    (dict(method="dualpipev", model="cnn", gpus=2, method_options={"microbatches": "3"}),
     r"bad microbatches 3 for dualpipev at K = 2: .* \(M >= 2K = 4\)"),
    (dict(method="interleaved-1f1b", model="cnn", gpus=2, method_options={"microbatches": "5"}),
     r"bad microbatches 5 for interleaved-1f1b at K = 2: .* rounds max\(1, M // K\) = 2"),
    (dict(method="zb-interleaved", model="cnn", gpus=2, batch_size=4, method_options={"microbatches": "8"}),
     r"bad microbatches 8: a batch of 4 splits into at most 4"),
    (dict(method="zbv", model="cnn", gpus=2, engine="local"),
     r"method zbv does not run on the local engine; it runs on: distributed"),
    (dict(method="looped-bfs", model="cnn", gpus=2, split="time"),
     r"--split time times looped-bfs's step .* cannot run"),
    (dict(method="looped-bfs", model="cnn", gpus=2, sigma_every=5),
     r"bad --sigma-every 5 for looped-bfs: its layout has no σ probe"),
    (dict(method="zbv", model="cnn", gpus=2, split="1,2"),
     r"bad --split 1,2: 2 cut points make 3 modules, but zbv cuts the model into V\*K = 4"),
    (dict(method="zbv", model="cnn", gpus=2, method_options={"virtual": "2"}),
     r"virtual"),
]


@pytest.mark.parametrize("settings,message", REFUSALS)
def test_impossible_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(DbenchError, match=message) as caught:
        check(RunConfig(**settings), [torch.device("cpu")] * settings["gpus"])
    assert "\n" not in str(caught.value)


def test_auto_picks_the_distributed_engine_and_the_plan_records_the_cut_into_v_k():
    checked = check(RunConfig(method="interleaved-1f1b", model="cnn", gpus=2), [torch.device("cpu")] * 2)
    assert checked.engine == "distributed" and checked.modules == 2 and checked.pieces == 4


def test_a_last_batch_smaller_than_m_is_refused_before_anything_is_written(tmp_path):
    from dbench import run as runner

    # synthetic: 10,000 training images; batch 48 leaves a last batch of 16, which M = 32 cannot split evenly
    with pytest.raises(DbenchError, match="a batch .* of 16 samples does not split into M = 32 micro-batches of equal"):
        runner.start(RunConfig(method="zbv", model="cnn", gpus=2, batch_size=48,
                               method_options={"microbatches": "32"}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_with_replicas_equals_gpipe_on_the_whole_batch(tmp_path):
    """K = 2 devices × D = 2 replicas (4 processes): each replica's runner on its half of every batch (its
    group the mesh's module axis), dbench averaging the gradients over the copies before each update: GPipe's
    update on the whole batch (BatchNorm-free), for a looped and a V-shaped schedule."""
    path = str(tmp_path / "out.pt")
    runs = [("interleaved-1f1b", "image-nobn", M), ("zbv", "image-nobn", M)]
    mp.start_processes(schedules_worker, args=(4, free_port(), runs, path, 2, 8), nprocs=4, start_method="forkserver")
    trained = torch.load(path, weights_only=False)
    torch.set_num_threads(1)
    want_losses, want_logits, want_weights = gpipe_reference("image-nobn", M, last=8)
    for method, _, _ in runs:
        got = trained[(method, "image-nobn")]
        assert [x.item() for x in got["losses"]] == pytest.approx([x.item() for x in want_losses], rel=1e-5)
        for a, b in zip([w for piece in got["weights"] for w in piece.values()], want_weights, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["logits"], want_logits, rtol=1e-4, atol=1e-5)


def test_a_run_whose_activations_were_not_accounted_has_no_accounted_memory_in_the_verdict():
    """The split-backward schedules say so in their facts; the verdict then compares no accounted peak of
    theirs (NaN, shown as not measured), and keeps the CUDA allocator's peak where there is one."""
    from pathlib import Path

    from dbench.report.verdict import run_memory
    from dbench.results import Run

    assert METHODS.get("zbv").facts(2)["accounts_activations"] is False
    assert METHODS.get("interleaved-1f1b").facts(2)["accounts_activations"] is True
    modules = [{"accounted_peak_bytes": 100, "cuda_peak_allocated_bytes": 300}] * 2

    def run(facts):
        return Run(path=Path("run"), config={"method_facts": facts}, environment={}, summary={"modules": modules},
                   epoch_rows=[], probe_rows=[])

    counted = run_memory(run(METHODS.get("interleaved-1f1b").facts(2)))
    assert counted["accounted_largest"] == 100
    skipped = run_memory(run(METHODS.get("zbv").facts(2)))
    assert skipped["accounted_largest"] != skipped["accounted_largest"]  # NaN
    assert skipped["cuda_largest"] == counted["cuda_largest"]
