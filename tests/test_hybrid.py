"""K modules × D replicas (ALGORITHMS.md, "At scale"): checked against the specification's own equalities.

- D = 1 is the method at K; bp with K = 1 and D replicas is ddp;
- on a model without BatchNorm, bp, gpipe and 1f1b with D replicas equal the full-batch method, and every
  other method with D replicas equals the same method at K on the full batch, up to the summation order;
- side models and DFA's feedback are the same in every replica after training;
- the local and the distributed engine agree; a run resumes exactly; bad layouts are one line, nothing written.

Float tolerance: a replica's gradient sums its shard's per-sample terms, the all-reduce then adds the
replicas' sums; the full batch adds the same terms in one reduction. The two orders differ by float32
rounding (about 1e-7 relative per addition), which grows over the steps through the updates: after 5 SGD
steps with momentum the losses and weights agree to 1e-5 relative (what the checks allow), while a wrong
weighting of the shards (8 + 7 samples, unweighted) moves the first loss by ~1e-2 and fails them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import group
from distributed_workers import WORKLOADS, hybrid_data, hybrid_worker
from dbench import Trainer
from dbench.config import RunConfig
from dbench.engine.launch import free_port
from dbench.registry import METHODS

DBENCH = str(Path(sys.executable).parent / "dbench")
RANGES = [(0, 3), (3, 5)]
# Methods whose gradients all derive from the loss: with replicas, the full-batch method's (ALGORITHMS.md).
EXACT_ON_FULL_BATCH = ["bp", "gpipe", "1f1b", "2bw", "fr", "ddg", "fdg", "petra", "dfa", "bdfa"]


def train(method: str, replicas: int, batch: int, workload: str = "image-nobn", ranges=RANGES, options=None):
    """``Trainer`` on the workload's blocks cut at ``ranges``, STEPS steps: (losses, trainer, test logits)."""
    blocks, _, classes = WORKLOADS[workload]
    data, test_x = hybrid_data(workload, batch)
    t = Trainer(group(blocks(), ranges), method, lr=0.05, momentum=0.9, weight_decay=5e-4, num_classes=classes,
                replicas=replicas, options=options)
    losses = [t.step(x, y) for x, y in data]
    return [loss for loss in losses if loss is not None], t, t.predict(test_x)


def assert_close_runs(a, b):
    (la, ta, pa), (lb, tb, pb) = a, b
    assert len(la) == len(lb)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    # the whole model's weights, module after module (the same blocks however many modules cut them)
    wa = [p for m in ta.modules for p in m.state_dict().values()]
    wb = [p for m in tb.modules for p in m.state_dict().values()]
    assert len(wa) == len(wb)
    for i, (p, q) in enumerate(zip(wa, wb)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")


@pytest.mark.parametrize("method", EXACT_ON_FULL_BATCH)
@pytest.mark.parametrize("replicas,batch", [(2, 15), (3, 16)])
def test_replicas_equal_the_method_on_the_full_batch(method, replicas, batch):
    """Unequal shards (8 + 7; 6 + 5 + 5): the shard weights D·n_d/B make the mean the full batch's."""
    assert_close_runs(train(method, replicas, batch), train(method, 1, batch))


def test_dgl_replicas_equal_dgl_on_the_full_batch():
    """DGL's image heads normalize with BatchNorm (shard statistics); a language model's heads are a LayerNorm and a
    linear map, per token: there every loss is the full batch's."""
    ranges = [(0, 2), (2, 5)]
    assert_close_runs(train("dgl", 2, 5, "text", ranges), train("dgl", 1, 5, "text", ranges))


@pytest.mark.parametrize("method", ["bp", "gpipe", "1f1b"])
def test_exact_methods_with_replicas_equal_plain_backpropagation(method):
    assert_close_runs(train(method, 2, 15), train("bp", 1, 15, ranges=[(0, 5)]))


def test_an_unweighted_average_would_fail_these_checks():
    """The checks can fail: without the shard weights (8 + 7 samples) the replicas' mean is not the batch's."""
    from dbench.method import Stage

    weighted = Stage.weighted
    Stage.weighted = lambda self, loss, weight=None: loss  # every replica's shard mean, unweighted
    try:
        with pytest.raises(AssertionError):
            assert_close_runs(train("bp", 2, 15), train("bp", 1, 15))
    finally:
        Stage.weighted = weighted


def test_bp_at_k1_with_replicas_is_ddp():
    a = train("bp", 2, 15, ranges=[(0, 5)])
    b = train("ddp", 2, 15, ranges=[(0, 5)])
    torch.testing.assert_close(torch.stack(a[0]), torch.stack(b[0]), rtol=0, atol=0)
    for p, q in zip(a[1].modules[0].parameters(), b[1].modules[0].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["dni", "cdni", "dgl", "dfa", "bdfa"])
def test_side_models_and_feedback_are_the_same_in_every_replica(method):
    _, t, _ = train(method, 2, 16, workload="image")
    k = t.engine.num_stages
    for j in range(k - 1):
        first, second = t.stages[j], t.stages[k + j]
        for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
            assert torch.equal(a, b)
        if method in ("dfa", "bdfa"):
            assert first.feedback is not None and torch.equal(first.feedback, second.feedback)
        for name in first.side_models:
            sa, sb = first.built_side(name), second.built_side(name)
            assert sa is not None
            for a, b in zip(sa.parameters(), sb.parameters(), strict=True):
                assert torch.equal(a, b), f"{method} side model {name}"


def test_replicas_train_on_their_own_shards():
    """Each replica sees a different shard: its module's input differs from the other replica's."""
    _, t, _ = train("ddg", 2, 16, workload="image")
    a, b = t.stages[0].stored, t.stages[2].stored  # stored forwards of module 0 in replicas 0 and 1
    assert a and b and not torch.equal(a[0].x, b[0].x)


def test_one_replica_is_the_run_without_replicas():
    a = train("ddg", 1, 16, workload="image")
    blocks, _, classes = WORKLOADS["image"]
    data, test_x = hybrid_data("image", 16)
    t = Trainer(group(blocks(), RANGES), "ddg", lr=0.05, momentum=0.9, weight_decay=5e-4, num_classes=classes)
    losses = [t.step(x, y) for x, y in data]
    assert torch.equal(torch.stack(a[0]), torch.stack(losses))


def test_an_update_not_run_is_an_error():
    from dbench.method import Stage, StepOutput

    class Forgets(Stage):
        name = "forgets"

        def train_step(self, t, x, y):
            out = self.module(x)
            loss = self.loss_fn(out, y)
            self.backward(loss)
            self.apply_update()  # without yield from: the update would silently not happen
            return StepOutput(loss=loss.detach(), logits=out.detach())
            yield

    with METHODS.temporarily("forgets", Forgets):
        t = Trainer([torch.nn.Linear(4, 3)], "forgets")
        with pytest.raises(RuntimeError, match="yield from self.apply_update"):
            t.step(torch.randn(5, 4), torch.randint(0, 3, (5,)))


# --- the distributed engine ------------------------------------------------------------------------------------

DISTRIBUTED_RUNS = [  # name, method, ranges, replicas, batch, workload, options
    ("bp", "bp", RANGES, 2, 15, "image", None),
    ("ddg", "ddg", RANGES, 2, 15, "image", None),
    ("fdg", "fdg", RANGES, 2, 16, "image", None),
    ("dni", "dni", RANGES, 2, 16, "image", None),
    ("dgl", "dgl", RANGES, 2, 16, "image", None),
    ("1f1b", "1f1b", RANGES, 2, 16, "image", None),
    ("2bw", "2bw", RANGES, 2, 16, "image", None),
    ("dfa", "dfa", RANGES, 2, 16, "image", None),
]


def test_the_distributed_engine_equals_the_local_one_with_replicas(tmp_path):
    """4 processes (K = 2 × D = 2), one thread each, against the local engine: losses, predictions and the whole
    state agree exactly (a 2-way all-reduce adds the same two numbers in either order)."""
    from test_distributed import assert_same

    out = tmp_path / "hybrid.pt"
    mp.start_processes(hybrid_worker, args=(4, free_port(), DISTRIBUTED_RUNS, str(out)), nprocs=4,
                       start_method="forkserver", join=True)
    got = torch.load(out, weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, method, ranges, replicas, batch, workload, options in DISTRIBUTED_RUNS:
            losses, t, logits = train(method, replicas, batch, workload, ranges, options)
            assert_same(losses, got[name]["losses"], name)
            assert_same(logits, got[name]["logits"], name)
            assert_same(t.state_dict(), got[name]["state"], name)
    finally:
        torch.set_num_threads(threads)


# --- runs ------------------------------------------------------------------------------------------------------

def run(tmp_path, name, *args, ok=True):
    done = subprocess.run([DBENCH, "run", "--model", "mlp", "--epochs", "1", "--quiet", "--sigma-batches", "2",
                           "--out", str(tmp_path / name), *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_a_run_records_its_layout_and_every_device(tmp_path):
    run(tmp_path, "r", "--method", "fr", "--gpus", "4", "--replicas", "2", "--engine", "local", "--batch-size", "512",
        "--dataset", "synthetic-small")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert config["layout"]["devices"] == 4 and config["layout"]["modules"] == 2 and config["layout"]["replicas"] == 2
    assert len(config["partition"]) == 2 and len(config["devices"]) == 4
    assert [(m["module"], m["replica"]) for m in summary["modules"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(m["compute_s"] > 0 and m["accounted_peak_bytes"] > 0 for m in summary["modules"])
    # σ is replica 0's, reported for each copy of its module
    assert summary["modules"][0]["mean_sigma"] == summary["modules"][2]["mean_sigma"]


def test_the_engines_agree_on_a_run_with_replicas_and_it_resumes_exactly(tmp_path):
    common = ["--method", "ddg", "--gpus", "4", "--replicas", "2", "--split", "blocks", "--batch-size", "256",
              "--dataset", "synthetic-small"]
    env_one_thread = {"OMP_NUM_THREADS": "1"}
    import os

    env = {**os.environ, **env_one_thread}
    for name, engine in (("local", "local"), ("dist", "distributed")):
        done = subprocess.run([DBENCH, "run", "--model", "mlp", "--epochs", "2", "--quiet", "--engine", engine,
                               "--out", str(tmp_path / name), *common], capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == 0, done.stderr
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("local", "dist"))
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-5)
    # resume: stop after epoch 1 by running 1 epoch's checkpoint, then resume the 2-epoch run
    from dbench import run as runner

    cut = tmp_path / "cut"

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = RunConfig(method="ddg", model="mlp", gpus=4, replicas=2, split="blocks", batch_size=256, epochs=2,
                    engine="local", dataset="synthetic-small")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs above (OMP_NUM_THREADS=1): the same float sums
    try:
        with pytest.raises(runner.RunInterrupted):
            runner.start(cfg, cut, quiet=True, on_epoch_end=stop)
        runner.resume(cut, quiet=True)
    finally:
        torch.set_num_threads(threads)
    whole = torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(torch.load(cut / "checkpoint.pt", weights_only=True)["trainer"],
                               whole["trainer"], rtol=0, atol=0)


@pytest.mark.parametrize("args,message", [
    (["--gpus", "4", "--replicas", "3"], "bad --replicas 3: it must divide --gpus 4"),
    (["--gpus", "12", "--replicas", "2", "--model", "cnn"], "cannot cut cnn (5 blocks) into 6 modules"),
    (["--gpus", "4", "--replicas", "4", "--batch-size", "3"], "bad --batch-size 3 for 4 replicas"),
    (["--gpus", "2", "--replicas", "2", "--batch-size", "3"], "an epoch's last batch holds 1"),
    (["--gpus", "4", "--replicas", "2", "--devices", "cpu,cpu"], "--devices names 2 devices but --gpus is 4"),
    (["--gpus", "4", "--replicas", "2", "--method", "ddp"], "bad --replicas 2 for ddp"),
    (["--gpus", "4", "--replicas", "0"], "bad --replicas 0"),
    (["--gpus", "2", "--replicas", "2", "--split", "time"], "--split time does not apply"),
])
def test_bad_layouts_are_one_line_and_write_nothing(tmp_path, args, message, monkeypatch, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["run", "--model", "mlp", "--epochs", "1", "--quiet", "--sigma-batches", "2",
                            "--out", str(tmp_path / "bad"), *args], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_torchrun_runs_replicas_as_the_local_engine_does(tmp_path):
    """4 processes under torchrun (module k of replica d = rank d·K + k): the local engine's checkpoint."""
    import os

    from test_distributed import assert_same

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["run", "--gpus", "4", "--replicas", "2", "--model", "mlp", "--epochs", "1", "--quiet", "--method",
              "fr", "--split", "blocks", "--batch-size", "512", "--dataset", "synthetic-small"]
    commands = {"torchrun": [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "4",
                             DBENCH, *common, "--engine", "distributed"],
                "local": [DBENCH, *common, "--engine", "local"]}
    for name, command in commands.items():
        done = subprocess.run([*command, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    assert_same(torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=True),
                torch.load(tmp_path / "torchrun" / "checkpoint.pt", weights_only=True))
    config = json.loads((tmp_path / "torchrun" / "config.json").read_text())
    assert config["layout"]["replicas"] == 2 and config["layout"]["modules"] == 2


def test_a_killed_replica_ends_the_run_cleanly(tmp_path):
    """SIGKILL replica 0's first module (of K = 2 × D = 2): every process stops, the run is marked failed."""
    import signal

    from conftest import alive
    from test_distributed import signal_a_worker

    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [DBENCH, "run", "--engine", "distributed", "--split", "blocks", "--gpus", "4", "--replicas", "2", "--model",
         "mlp", "--dataset", "synthetic-small", "--batch-size", "512", "--epochs", "50", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    workers, stderr, elapsed = signal_a_worker(launcher, out, signal.SIGKILL, pick=0)
    assert len(workers) == 4 and launcher.returncode != 0 and elapsed < 30
    assert "killed by signal 9" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert not any(alive(pid) for pid in workers)
