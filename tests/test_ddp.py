"""ddp: the K = 1 layout of the hybrid (N whole-model replicas, gradients averaged); the full batch's gradient."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import batches, tiny_blocks
from distributed_workers import STEPS, hybrid_worker
from dbench import Trainer
from dbench.config import RunConfig
from dbench.engine.launch import free_port
from dbench.errors import DbenchError
from dbench.registry import METHODS

DBENCH = str(Path(sys.executable).parent / "dbench")


@pytest.mark.parametrize("batch", [16, 15])
def test_ddp_equals_bp_on_the_full_batch(batch, tmp_path):
    """BatchNorm-free model, 2 replicas in 2 processes; batch 15 splits 8 + 7, so the shards' losses must be weighted.

    Tolerance: the all-reduce adds the two replicas' gradients and divides by 2, BP reduces over the
    16 (or 15) samples at once: the same sum in another float order, a few ulps apart after 5 SGD steps.
    """
    out = tmp_path / "ddp.pt"
    runs = [("ddp", "ddp", [(0, 5)], 2, batch, "image-nobn", None)]
    mp.start_processes(hybrid_worker, args=(2, free_port(), runs, str(out)), nprocs=2, start_method="forkserver")
    got = torch.load(out, weights_only=True)["ddp"]
    torch.set_num_threads(1)
    bp = Trainer([nn.Sequential(*tiny_blocks(batchnorm=False))], "bp", lr=0.05, momentum=0.9, weight_decay=5e-4)
    want = [bp.step(x, y) for x, y in batches(STEPS, batch=batch, seed=11)]
    assert torch.stack(got["losses"]).tolist() == pytest.approx(torch.stack(want).tolist(), rel=1e-6)
    torch.testing.assert_close(got["logits"], bp.predict(batches(1, batch=batch, seed=13)[0][0]), rtol=1e-5, atol=1e-6)
    mine = bp.modules[0].state_dict()
    for replica in got["state"]["engine"]["stages"]:  # both replicas hold the same weights
        for name, value in mine.items():
            torch.testing.assert_close(replica["module"][name], value, rtol=1e-5, atol=1e-7)


def test_a_ddp_run_records_every_device_and_sigma_near_one(tmp_path):
    done = subprocess.run([DBENCH, "run", "--method", "ddp", "--model", "mlp", "--gpus", "2", "--epochs", "1",
                           "--dataset", "synthetic-small", "--sigma-batches", "4", "--quiet", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["status"] == "complete" and config["engine"] == "distributed"
    assert config["partition"] == [[0, 3]]  # one module: the whole model, on each device
    assert config["layout"]["modules"] == 1 and config["layout"]["replicas"] == 2
    assert [m["device"] for m in summary["modules"]] == ["cpu", "cpu"]
    assert all(m["accounted_peak_bytes"] > 0 and m["compute_s"] > 0 for m in summary["modules"])
    # an exact gradient points downhill: a positive cosine with the true gradient and a positive σ (how close
    # the corrected σ comes to 1 is the probe estimator's noise, which issue 15 is about)
    assert all(m["mean_cosine"] > 0 and m["sigma_corrected"] > 0 for m in summary["modules"])
    assert config["method_facts"]["ideal_speedup"] == 2.0 and config["method_facts"]["parallelism"] == "data"


@pytest.mark.parametrize("cfg,message", [
    (RunConfig(method="ddp", model="mlp", gpus=4, batch_size=3), "bad --batch-size 3 for 4 replicas"),
    (RunConfig(method="ddp", model="mlp", gpus=4, replicas=2), "bad --replicas 2 for ddp"),
    (RunConfig(method="ddp", model="mlp", gpus=2, split="time"), "--split time does not apply to ddp"),
    (RunConfig(method="ddp", model="cnn", gpus=2, method_options={"sync_bn": "true"}), "sync_bn=true needs a CUDA"),
])
def test_bad_settings_are_one_line_before_anything_is_written(cfg, message, tmp_path):
    from dbench import run as runner

    with pytest.raises(DbenchError, match=message):
        runner.start(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_python_trainer_runs_ddp_as_replicas_of_one_module():
    with pytest.raises(DbenchError, match="give it the model as one module"):
        Trainer([nn.Linear(4, 2), nn.Linear(2, 2)], "ddp", replicas=2)
    t = Trainer([nn.Linear(4, 2)], "ddp", replicas=2)
    assert t.step(torch.randn(6, 4), torch.randint(0, 2, (6,))) is not None
    with pytest.raises(DbenchError, match="batch of 1 sample.* 2 replicas"):
        t.step(torch.randn(1, 4), torch.randint(0, 2, (1,)))


def test_ddp_ideal_and_family():
    cls = METHODS.get("ddp")
    assert cls.ideal_speedup(4) == 4.0 and cls.family == "exact gradient"
