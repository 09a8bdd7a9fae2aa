"""The projection (ALGORITHMS.md, "Projection"): hand-built traces whose timelines are worked out by hand, the
replay of every built-in method's real trace, and a trace that changes no number."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import batches, group, tiny_blocks
from dbench import Trainer
from dbench.errors import DbenchError
from dbench.projection import PROFILES, Link, link, relayout, replay
from dbench.registry import METHODS

DBENCH = str(Path(sys.executable).parent / "dbench")
FREE = Link("free", 0.0, float("inf"), 0.0)  # messages cost nothing: the timeline is the compute's alone


def compute(s):
    return {"op": "compute", "s": s}


def send(channel, nbytes=0):
    return {"op": "send", "channel": channel, "tag": [], "bytes": nbytes}


def recv(channel):
    return {"op": "recv", "channel": channel}


END = {"op": "end"}


def trace(stages, modules, replicas=1, steps=1):
    return {"modules": modules, "replicas": replicas, "steps": steps, "stages": stages}


def test_a_two_module_pipeline():
    """BP at K=2: module 0's forward (1 s), module 1's forward, loss and backward (3 s), module 0's backward
    (2 s): 1 + 3 + 2 = 6 s, module 0 waiting 3 s for its gradient and module 1 1 s for its input."""
    p = replay(trace([[compute(1), send("up"), recv("down"), compute(2), END],
                      [recv("up"), compute(3), send("down"), END]], 2), FREE)
    assert p.seconds == 6
    assert p.devices[0]["wait_s"] == 3 and p.devices[1]["wait_s"] == 1
    assert p.devices[0]["compute_s"] == 3 and p.devices[1]["compute_s"] == 3


def test_a_delayed_gradient_overlaps_the_next_iteration():
    """DDG-like, two iterations: module 0 forwards batch 1 (at 1..2) while module 1 still works on batch 0
    (1..4); it then takes batch 0's gradient (at 4), backpropagates it (4..6); module 1 does batch 1 (4..7)."""
    stage0 = [compute(1), send("up"), END, compute(1), send("up"), recv("down"), compute(2), END]
    stage1 = [recv("up"), compute(3), send("down"), END, recv("up"), compute(3), send("down"), END]
    p = replay(trace([stage0, stage1], 2, steps=2), FREE)
    assert p.seconds == 7
    assert p.devices[0]["wait_s"] == 2  # 2..4, waiting for batch 0's gradient
    assert p.devices[1]["wait_s"] == 1  # 0..1, waiting for batch 0
    assert p.per_step == 3.5


def test_a_fifo_link_queues_two_messages():
    """α = 1 s, β = 1 byte/s, two sends of 10 bytes at once: the first arrives at max(0 + 1, 0) + 10 = 11, the
    second waits for the link: max(1 + 1, 11) + 10 = 21 (the sender posts each for α = 1 s)."""
    slow = Link("slow", 1.0, 1.0)
    p = replay(trace([[send("up", 10), send("up", 10), END], [recv("up"), recv("up"), END]], 2), slow)
    assert p.seconds == 21
    assert p.devices[0]["comm_s"] == 2 and p.devices[1]["wait_s"] == 21


def test_an_all_reduce_waits_for_its_last_participant():
    """K = 1, D = 2: the copies reach the all-reduce at 1 s and 5 s; it starts at 5 s and takes
    2(D−1)(α + b/(Dβ)) = 2·(1 + 10/2) = 12 s: both end at 17 s, the first having waited 4 s."""
    allreduce = {"op": "allreduce", "bytes": 10}
    p = replay(trace([[compute(1), allreduce, END], [compute(5), allreduce, END]], 1, replicas=2), Link("l", 1.0, 1.0))
    assert p.seconds == 17
    assert p.devices[0]["wait_s"] == 4 and p.devices[1]["wait_s"] == 0
    assert p.devices[0]["comm_s"] == p.devices[1]["comm_s"] == 12


def test_a_receiver_pays_its_taking_cost_even_when_it_never_waits():
    """r = 1 s per message taken, α = 0: module 1 computes 5 s, then takes the message that arrived at 1 s
    (5 + 1 = 6), then waits for the one sent at 7 s: max(6 + 1, 7) = 7, the second take hidden by its wait."""
    taking = Link("taking", 0.0, float("inf"), 0.0, recv_s=1.0)
    p = replay(trace([[compute(1), send("up"), compute(6), send("up"), END],
                      [compute(5), recv("up"), recv("up"), END]], 2), taking)
    assert p.seconds == 7
    assert p.devices[1]["comm_s"] == 2 and p.devices[1]["wait_s"] == 0


def test_laid_out_on_replicas_by_hand():
    """A K = 1 trace of 4 steps (1 s compute, an update of 10 bytes) on D' = 2: each copy replays the first
    ⌈4/2⌉ = 2 steps; every all-reduce takes 2(D'−1)(α + b/(D'β)) = 2·(1 + 10/2) = 12 s: 2·(1 + 12) = 26 s."""
    allreduce = {"op": "allreduce", "bytes": 10}
    one = trace([[compute(1), allreduce, END] * 4], 1, steps=4)
    laid = relayout(one, 2)
    assert laid["replicas"] == 2 and laid["steps"] == 2 and laid["stages"] == [[compute(1), allreduce, END] * 2] * 2
    assert replay(one, Link("l", 1.0, 1.0)).seconds == 4  # on one device the update averages nothing
    assert replay(laid, Link("l", 1.0, 1.0)).seconds == 26
    with pytest.raises(DbenchError, match="cannot project 1 replica"):
        relayout(laid, 1)
    with pytest.raises(DbenchError, match="marks no update"):
        relayout(trace([[compute(1), END]], 1), 2)


@pytest.mark.parametrize("method", ["bp", "ddg", "dni", "dfa"])
def test_a_run_laid_out_on_replicas_has_the_events_of_one_traced_there(method):
    """Independent of the re-layout: the trace of the same method really run on 2 replicas (batch 32, shards
    of 16) holds, per replica, the very events (op, channel, bytes) of the trace at batch 16 without replicas
    laid out on 2 replicas, only the durations differ."""
    def shape(events):
        return [(e["op"], e.get("channel"), e.get("bytes")) for e in events]

    def run(replicas, batch, steps):
        t = Trainer(group(tiny_blocks(), [(0, 2), (2, 3), (3, 5)]), method, num_classes=10, replicas=replicas)
        t.start_trace()
        for x, y in batches(steps, batch=batch, seed=3):
            t.step(x, y)
        return t.take_trace()

    laid, real = relayout(run(1, 16, 6), 2), run(2, 32, 3)
    assert laid["steps"] == real["steps"] == 3
    assert [shape(s) for s in laid["stages"]] == [shape(s) for s in real["stages"]]
    assert any(e["op"] == "allreduce" for e in laid["stages"][0])


def test_a_trace_that_cannot_be_replayed_says_where():
    with pytest.raises(DbenchError, match="every stage waits"):
        replay(trace([[recv("down"), END], [recv("up"), END]], 2), FREE)


def traced(method: str, replicas: int = 1, options=None):
    t = Trainer(group(tiny_blocks(), [(0, 2), (2, 3), (3, 5)]), method, num_classes=10, replicas=replicas,
                options=options)
    t.start_trace()
    losses = [t.step(x, y) for x, y in batches(6, batch=16, seed=3)]
    return t.take_trace(), losses


@pytest.mark.parametrize("method", sorted(n for n in METHODS.names()  # a trace is the local engine's
                                            if METHODS.get(n).parallelism == "model" and "local" in METHODS.get(n).engines))
def test_every_built_in_method_replays_deterministically(method):
    record, _ = traced(method)
    a, b = replay(record, PROFILES["pcie4"]), replay(record, PROFILES["pcie4"])
    assert a.seconds == b.seconds > 0 and a.devices == b.devices
    computed = sum(e["s"] for s in record["stages"] for e in s if e["op"] == "compute")
    # K devices at once: never slower than the stages' compute one after another plus the messages, never
    # faster than the busiest device's compute
    assert max(d["compute_s"] for d in a.devices) <= a.seconds
    assert sum(d["compute_s"] for d in a.devices) == pytest.approx(computed)


@pytest.mark.parametrize("method", ["ddg", "dni", "gpipe"])
def test_a_trace_with_replicas_replays(method):
    record, _ = traced(method, replicas=2)
    assert len(record["stages"]) == 6 and any(e["op"] == "allreduce" for e in record["stages"][0])
    assert replay(record, PROFILES["nvlink4"]).seconds > 0


def test_recording_changes_no_number():
    a = traced("fdg")[1]
    t = Trainer(group(tiny_blocks(), [(0, 2), (2, 3), (3, 5)]), "fdg", num_classes=10)
    b = [t.step(x, y) for x, y in batches(6, batch=16, seed=3)]
    assert [None if x is None else x.item() for x in a] == [None if x is None else x.item() for x in b]


def test_a_traced_run_equals_an_untraced_one_and_projects(tmp_path):
    common = ["run", "--method", "ddg", "--model", "mlp", "--gpus", "2", "--epochs", "1", "--engine", "local",
              "--quiet", "--sigma-every", "0", "--dataset", "synthetic-small", "--batch-size", "256"]
    for name, extra in (("plain", []), ("traced", ["--trace"])):
        done = subprocess.run([DBENCH, *common, *extra, "--out", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("plain", "traced")}
    assert [r["train_loss"] for r in rows["plain"]] == [r["train_loss"] for r in rows["traced"]]
    assert not (tmp_path / "plain" / "trace.json").exists()
    done = subprocess.run([DBENCH, "project", str(tmp_path / "traced"), "--link", "pcie4", "--device-memory", "16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PROJECTED (not measured)") and "pcie4: latency 5.0 µs" in done.stdout
    assert "ddg" in done.stdout and "N=2 devices" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["project", "{tmp}"], "holds no trace.json"),
    (["project", "{tmp}", "--link", "carrier-pigeon"], "unknown link profile 'carrier-pigeon'"),
    (["project", "{tmp}", "--device-memory", "0"], "bad --device-memory 0"),
    (["run", "--trace", "--engine", "distributed", "--gpus", "2", "--model", "mlp"], "--trace records the local"),
    (["project", "{run}", "--devices", "3"], "traced at K=2 modules, so --devices 3 is not K × D'"),
    (["project", "{run}", "--devices", "8", "--replicas", "2"], "would be K=4 (another cut"),
    (["project", "{run}", "--replicas", "0"], "--replicas"),
])
def test_bad_projection_input_is_one_line(args, message, tmp_path, traced_run, monkeypatch, capsys):
    from conftest import run_cli

    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)).replace("{run}", str(traced_run)) for a in args],
                           monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """A DDG run at K = 2 recorded with --trace (batch 512: an MLP's few steps)."""
    out = tmp_path_factory.mktemp("traced") / "ddg"
    done = subprocess.run([DBENCH, "run", "--method", "ddg", "--model", "mlp", "--gpus", "2", "--epochs", "1",
                           "--engine", "local", "--quiet", "--sigma-every", "0", "--batch-size", "512", "--trace",
                           "--dataset", "synthetic-small",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_project_lays_runs_out_on_n_devices(traced_run, tmp_path):
    """--devices 4 from a K = 2 trace: DDG 2×2 at the global batch 2·512, marked as laid out anew, its peak
    memory per device the traced module's; the traced layout is unchanged without the option."""
    done = subprocess.run([DBENCH, "project", str(traced_run), "--devices", "4", "--link", "nvlink4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "N=4 devices · batch 1024" in done.stdout and "ddg 2×2*" in done.stdout
    assert "laid out anew" in done.stdout and "ddg 2×2* from 2×1" in done.stdout
    assert done.stdout.count("module 1 replica 1") == 1
    same = subprocess.run([DBENCH, "project", str(traced_run), "--devices", "2"], capture_output=True, text=True,
                          timeout=300)
    assert same.returncode == 0 and "N=2 devices · batch 512" in same.stdout and "*" not in same.stdout


def test_a_stored_profile_reads_back(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "mine", "latency_s": 1e-5, "bandwidth_Bps": 1e9, "post_s": 2e-6}))
    profile = link(str(path))
    assert profile.latency_s == 1e-5 and profile.posting == 2e-6 and "mine" in profile.describe()


def test_probe_link_stores_a_profile_that_projects(tmp_path):
    out = tmp_path / "links" / "here.json"
    done = subprocess.run([DBENCH, "probe-link", "--repeats", "1", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    profile = link(str(out))
    assert profile.latency_s > 0 and profile.bandwidth_Bps > 0 and profile.posting > 0
    assert profile.name == "probe-gloo-cpu" and f"saved in {out}" in done.stdout
