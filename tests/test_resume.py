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
    "schedule,method", [("cosine", "bp"), ("step", "bp"), ("cosine", "fr"), ("cosine", "ddg"), ("cosine", "petra"),
                        ("cosine", "cdni"), ("cosine", "1f1b"), ("cosine", "2bw")]
)
def test_resume_equals_uninterrupted(tmp_path, schedule, method):
    """Through the checkpoint file: weights, optimizer, method state and gradients in flight. Two epochs, cut
    after the first: the resumed epoch runs on what the checkpoint restored (the step schedule's milestone,
    at 50% of the epochs, falls on the cut, so the resumed run must also apply it)."""
    cfg = dict(method=method, model="mlp", gpus=3, epochs=2, lr_schedule=schedule, batch_size=128, seed=3,
               dataset="synthetic-small")
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
    cfg = dict(model="mlp", epochs=1, batch_size=256, seed=5, dataset="synthetic-small")
    a = runner.start(RunConfig(**cfg), tmp_path / "a", quiet=True)
    b = runner.start(RunConfig(**cfg), tmp_path / "b", quiet=True)
    c = runner.start(RunConfig(**{**cfg, "seed": 6}), tmp_path / "c", quiet=True)
    assert numbers(a) == numbers(b)
    assert numbers(a) != numbers(c)


def test_failure_marks_the_run_failed(tmp_path):
    def boom(done):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.start(RunConfig(model="mlp", epochs=2, batch_size=256, dataset="synthetic-small"), tmp_path / "f", quiet=True, on_epoch_end=boom)
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["error"]
    assert not [p for p in (tmp_path / "f").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_run_in_use_cannot_be_resumed_twice(tmp_path):
    from dbench.record import RunDir

    with pytest.raises(runner.RunInterrupted):
        runner.start(RunConfig(model="mlp", epochs=2, batch_size=256, dataset="synthetic-small"), tmp_path / "r", quiet=True,
                     on_epoch_end=stop_after(1))
    with RunDir.open(tmp_path / "r").exclusive():  # as another process training it would hold it
        with pytest.raises(DbenchError, match="being trained by another process"):
            runner.resume(tmp_path / "r", quiet=True)
    runner.resume(tmp_path / "r", quiet=True)  # free again


def test_completed_starts_reuses_and_refuses_other_settings(tmp_path):
    import dataclasses

    cfg = RunConfig(model="mlp", epochs=1, batch_size=512, sigma_every=0, dataset="synthetic-small")
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

    path = runner.start(RunConfig(model="mlp", epochs=1, batch_size=512, dataset="synthetic-small"), tmp_path / "run", quiet=True)
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


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run that finished 1 of its 2 epochs (marked interrupted, as a stop leaves it): resumable."""
    path = tmp_path_factory.mktemp("stopped") / "run"
    runner.start(RunConfig(method="ddg", model="mlp", gpus=2, epochs=1, batch_size=512, sigma_every=0,
                              dataset="synthetic-small"), path,
                 quiet=True)
    config = json.loads((path / "config.json").read_text())
    config["run"]["epochs"] = 2
    (path / "config.json").write_text(json.dumps(config))
    summary = json.loads((path / "summary.json").read_text())
    (path / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    return path


def _config(change):
    def damage(path):
        record = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(change(record)))
    return damage


def _checkpoint(change):
    def damage(path):
        import torch

        state = torch.load(path / "checkpoint.pt", weights_only=True)
        torch.save(change(state), path / "checkpoint.pt")
    return damage


def _file(name, content):
    def damage(path):
        (path / name).write_text(content)
    return damage


# Every file a resume reads × a wrong shape of it (valid JSON or a loadable checkpoint, of the wrong shape).
WRONG_SHAPES = {
    "config.json a list": (_config(lambda r: [r]), "config.json holds a list, not the run's plan"),
    "config.json run not an object": (_config(lambda r: {**r, "run": "ddg"}), "'run' is a str, not a dict"),
    "config.json partition missing": (_config(lambda r: {k: v for k, v in r.items() if k != "partition"}),
                                      "'partition' is missing"),
    "config.json a setting of the wrong type": (_config(lambda r: {**r, "run": {**r["run"], "gpus": "two"}}),
                                                "run setting 'gpus' is 'two', not a int"),
    "checkpoint.pt without trainer state": (_checkpoint(lambda s: {"epochs_done": 1}), "no trainer state"),
    "checkpoint.pt trainer without iteration": (
        _checkpoint(lambda s: {**s, "trainer": {k: v for k, v in s["trainer"].items() if k != "iteration"}}),
        "no whole number iteration"),
    "checkpoint.pt a list": (_checkpoint(lambda s: [s["epochs_done"]]), "it holds a list, not a dict"),
    "summary.json a list": (_file("summary.json", "[1, 2]"), "summary.json is not a JSON object"),
    "summary.json an unknown status": (_file("summary.json", '{"status": 3}'),
                                       "summary.json has status 3, not one of running, interrupted, failed"),
    "metrics.jsonl a row that is a list": (_file("metrics.jsonl", "[1, 2]\n"), "is not a dbench metrics row"),
    "metrics.jsonl an epoch of the wrong type": (_file("metrics.jsonl", '{"kind": "epoch", "epoch": "1"}\n'),
                                                 "is not a dbench metrics row"),
    "checkpoint.pt stages not a list": (
        _checkpoint(lambda s: {**s, "trainer": {**s["trainer"], "engine": {"stages": 3}}}),
        "no list of module states"),
}


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_resuming_a_run_file_of_the_wrong_shape_is_one_line_and_changes_nothing(stopped_run, tmp_path, case,
                                                                                  monkeypatch, capsys):
    import shutil

    from conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    damage, message = WRONG_SHAPES[case]
    damage(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = run_cli(["run", "--resume", str(run)], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_the_stopped_run_itself_resumes(stopped_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    runner.resume(run, quiet=True)
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
