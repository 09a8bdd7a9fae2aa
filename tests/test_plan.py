"""A run is planned once (validation, data, the cut) and every process builds from that plan."""
from __future__ import annotations

import dataclasses
import re

import pytest

from dbench.balance import MAX_CANDIDATES

from dbench import plan as plan_module
from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError
from dbench.partition import BlockTime
from dbench.plan import Plan
from dbench.record import CONFIG, RunDir
from dbench.registry import DATASETS


@pytest.fixture
def counted(monkeypatch, timing_confirms_profile):
    """A data set 'counted' (the synthetic one, smaller) and a fake block profile, each counting its calls
    (and timing the method on a cut gives what the fake profile predicts)."""
    calls = {"load": 0, "profile": 0}
    spec = DATASETS.get("synthetic")

    def load(data_dir, download):
        calls["load"] += 1
        splits = spec.load(data_dir, download)
        return dataclasses.replace(splits, train_x=splits.train_x[:512], train_y=splits.train_y[:512],
                                   test_x=splits.test_x[:256], test_y=splits.test_y[:256])

    def profile(blocks, sample, device):
        calls["profile"] += 1
        return [BlockTime(1.0, 2.0)] * (len(blocks) - 1) + [BlockTime(5.0, 10.0)]

    monkeypatch.setattr(plan_module, "time_costs", profile)
    with DATASETS.temporarily("counted", dataclasses.replace(spec, name="counted", load=load)):
        yield calls


def test_a_local_run_plans_once_and_loads_its_data_once(counted, tmp_path):
    cfg = RunConfig(method="fr", model="mlp", dataset="counted", gpus=2, split="time", epochs=1, batch_size=128)
    path = runner.start(cfg, tmp_path / "run", quiet=True)
    assert counted == {"load": 1, "profile": 1}
    record = RunDir(path).read(CONFIG)
    # the cut the profile chose is the one recorded and trained (the heavy last block alone on the top module)
    assert record["partition"] == [[0, record["num_blocks"] - 1], [record["num_blocks"] - 1, record["num_blocks"]]]


def test_building_from_a_recorded_plan_never_profiles_or_validates_again(counted, tmp_path, monkeypatch):
    cfg = RunConfig(method="bp", model="mlp", dataset="counted", gpus=2, split="time", epochs=2, batch_size=128)
    stop = iter([True])

    def interrupt(epoch):
        if next(stop, False):
            raise KeyboardInterrupt

    with pytest.raises(runner.RunInterrupted):
        runner.start(cfg, tmp_path / "run", quiet=True, on_epoch_end=interrupt)
    assert counted["profile"] == 1

    def no_profile(*args, **kwargs):
        raise AssertionError("profiled again")

    monkeypatch.setattr(plan_module, "time_costs", no_profile)
    monkeypatch.setattr(plan_module, "method_step_seconds", no_profile)
    monkeypatch.setattr(RunConfig, "validate", no_profile)
    runner.resume(tmp_path / "run", quiet=True)  # a worker's path: read the plan, build, train
    assert counted["load"] == 2  # once to plan the run, once to build it again on resume


def test_the_plan_round_trips_through_config_json(counted, tmp_path):
    from dbench import plan

    made, _ = plan.make(RunConfig(method="dni", model="mlp", dataset="counted", gpus=2, epochs=1,
                                  method_options={"hidden": "8"}))
    again = Plan.from_record(made.record(), source="test")
    assert again.record() == made.record()
    assert again.options.hidden == 8 and again.ranges == made.ranges and again.device_note is None


def test_bad_settings_fail_in_the_plan_before_anything_is_written(tmp_path):
    with pytest.raises(DbenchError, match="bad --split 3,4"):
        runner.start(RunConfig(model="mlp", gpus=2, split="3,4"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_default_cut_is_counted_and_time_is_an_explicit_choice(monkeypatch):
    """--split auto (the default): counted on both engines, said in one line; --split time profiles, and says
    so step by step with the profiling's cost."""
    from dbench import plan as planning

    rules = []
    real, real_time = planning.partition, planning.time_cut
    monkeypatch.setattr(planning, "partition", lambda blocks, k, split, **kw: rules.append(split) or real(blocks, k, split, **kw))
    monkeypatch.setattr(planning, "time_cut", lambda *a: rules.append("time") or real_time(*a))
    said = []
    timed_plan, _ = planning.make(RunConfig(model="mlp", gpus=2, engine="distributed", split="time"), say=said.append)
    # the long set-up steps say what they do, before doing it
    assert said[:2] == ["set-up: loading synthetic", "set-up: profiling the 3 blocks of mlp, then timing bp on the "
                        "candidate cuts, for a cut balanced by time"]
    # and then each step as it ends: the profile, and each cut timed (at most MAX_CANDIDATES)
    assert re.fullmatch(r"set-up: 3 blocks profiled in \d+\.\d s", said[2]), said
    timed = said[3:]
    assert 1 <= len(timed) <= MAX_CANDIDATES and all(
        re.fullmatch(r"set-up: bp timed on the cut after block\(s\) \d: slowest module \d+\.\d{3} s per step "
                     r"\(\d+\.\d s\)", line) for line in timed), timed
    distributed, _ = planning.make(RunConfig(model="mlp", gpus=2, engine="distributed"))
    local, _ = planning.make(RunConfig(model="mlp", gpus=2, engine="local"))
    one, _ = planning.make(RunConfig(model="mlp", gpus=1))
    assert rules == ["time", "counted", "counted", "blocks"]
    assert "profiling took" in timed_plan.split_note
    assert distributed.ranges == local.ranges
    assert "balanced by the blocks' counted cost" in distributed.split_note == local.split_note and one.split_note is None
    assert RunConfig().split == "auto"
    ddp, _ = planning.make(RunConfig(model="mlp", method="ddp", gpus=2))  # replicas: nothing to cut, nothing said
    assert ddp.split_note is None and ddp.ranges == [(0, 3)] and ddp.replicas == 2  # one module, two replicas
