"""A run stopped after an epoch and resumed ends with the numbers of an uninterrupted run."""
from __future__ import annotations

import json

import pytest

from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError

# measurements of the machine, not of the run: they differ between any two runs
TIMING = {"train_seconds", "eval_seconds", "epoch_seconds", "samples_per_s", "load_avg_1m"}


def numbers(path):
    """Every recorded number but timings (per-module memory and σ included)."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: strip_timing(v) for k, v in row.items() if k not in TIMING} for row in rows]


def strip_timing(value):
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if not k.endswith("_s")}
    return value


def stop_after(epoch):
    def hook(done):
        if done == epoch:
            raise KeyboardInterrupt  # what Ctrl-C raises

    return hook


@pytest.mark.parametrize(
    "schedule,method", [("cosine", "bp"), ("step", "bp"), ("cosine", "fr"), ("cosine", "ddg"), ("cosine", "cdni"),
                        ("cosine", "1f1b")]
)
def test_resume_equals_uninterrupted(tmp_path, schedule, method):
    """Through the checkpoint file: weights, optimizer, method state and gradients in flight."""
    cfg = dict(method=method, model="mlp", gpus=3, epochs=3, lr_schedule=schedule, batch_size=256, seed=3)
    whole = runner.start(RunConfig(**cfg), tmp_path / "whole", quiet=True)

    cut = tmp_path / "cut"
    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(**cfg), cut, quiet=True, on_epoch_end=stop_after(1))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 1
    assert [r["kind"] for r in numbers(cut)] == ["probe"] * 4 + ["epoch"]

    runner.resume(cut, quiet=True)
    assert numbers(cut) == numbers(whole)
    assert json.loads((cut / "summary.json").read_text())["status"] == "complete"
    with pytest.raises(DbenchError, match="already complete"):
        runner.resume(cut, quiet=True)


def test_same_seed_same_numbers(tmp_path):
    cfg = dict(model="mlp", epochs=1, batch_size=256, seed=5)
    a = runner.start(RunConfig(**cfg), tmp_path / "a", quiet=True)
    b = runner.start(RunConfig(**cfg), tmp_path / "b", quiet=True)
    c = runner.start(RunConfig(**{**cfg, "seed": 6}), tmp_path / "c", quiet=True)
    assert numbers(a) == numbers(b)
    assert numbers(a) != numbers(c)


def test_failure_marks_the_run_failed(tmp_path):
    def boom(done):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.start(RunConfig(model="mlp", epochs=2, batch_size=256), tmp_path / "f", quiet=True, on_epoch_end=boom)
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["error"]
    assert not [p for p in (tmp_path / "f").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_run_in_use_cannot_be_resumed_twice(tmp_path):
    from dbench.record import RunDir

    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(model="mlp", epochs=2, batch_size=256), tmp_path / "r", quiet=True,
                     on_epoch_end=stop_after(1))
    with RunDir.open(tmp_path / "r").exclusive():  # as another process training it would hold it
        with pytest.raises(DbenchError, match="being trained by another process"):
            runner.resume(tmp_path / "r", quiet=True)
    runner.resume(tmp_path / "r", quiet=True)  # free again


def test_completed_starts_reuses_and_refuses_other_settings(tmp_path):
    import dataclasses

    cfg = RunConfig(model="mlp", epochs=1, batch_size=512, sigma_every=0)
    first = runner.completed(cfg, tmp_path / "run")
    assert first["status"] == "complete"
    stamp = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    assert runner.completed(cfg, tmp_path / "run") == first  # read, not rerun
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(DbenchError, match="other settings"):
        runner.completed(dataclasses.replace(cfg, seed=1), tmp_path / "run")


def test_a_run_stopped_after_its_last_checkpoint_is_complete(tmp_path):
    """Stopped between the last epoch's checkpoint and the end (a Ctrl-C, the launcher dying): the run is
    complete, and a run left marked interrupted in that state completes on --resume without training more."""
    from dbench import loop
    from dbench.record import RunDir

    path = runner.start(RunConfig(model="mlp", epochs=1, batch_size=512), tmp_path / "run", quiet=True)
    run = RunDir(path)
    metrics = (path / "metrics.jsonl").read_text()
    checkpoint = (path / "checkpoint.pt").read_bytes()
    runner.mark(run, "interrupted", error="the launcher process died")
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "complete" and summary.get("error") is None
    loop.write_summary(run, [json.loads(line) for line in metrics.splitlines()], "interrupted")  # as before the fix
    runner.resume(path, quiet=True)
    assert json.loads((path / "summary.json").read_text())["status"] == "complete"
    assert (path / "metrics.jsonl").read_text() == metrics and (path / "checkpoint.pt").read_bytes() == checkpoint
