"""bench.toml suites, `dbench suite` and `dbench check` against golden figures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from dbench import check as checker
from dbench import suites
from dbench.errors import DbenchError
from dbench.registry import METHODS
from dbench.run import RunInterrupted

DBENCH = str(Path(sys.executable).parent / "dbench")
REPO = Path(__file__).resolve().parents[1]

TINY = """
[suite.tiny]
description = "two methods, a few seconds"
epochs = 2
batch_size = 128
lr = {lr}

[[suite.tiny.grid]]
methods = ["bp", "fr"]
models = ["mlp"]
datasets = ["synthetic-small"]
gpus = [2]
seeds = [0]
"""


def write(tmp_path: Path, text: str, name: str = "bench.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_repository_suites_are_valid(tmp_path, monkeypatch):
    from dbench.data import cifar

    # The paper suites read CIFAR from ./data, lm-gpu text from ./data/text: a tree with every file the
    # archives hold (empty: a suite's check looks for them, loading reads them).
    for layout in (cifar.CIFAR10, cifar.CIFAR100):
        for relative in cifar.expected_files(layout):
            (tmp_path / "data" / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / relative).touch()
    (tmp_path / "data" / "text").mkdir()  # lm-gpu's own text folder
    monkeypatch.chdir(tmp_path)
    found = suites.load_all(REPO / "bench.toml")
    for suite in found.values():  # every run plans as `dbench run` would plan it (no typo waits for its turn)
        assert set(suites.check(suite, tmp_path / "results").values()) == {"missing"}
    assert {"smoke", "paper-cifar10", "paper-cifar100", "speed"} <= set(found)
    smoke = found["smoke"]
    # every registered method, the exact-gradient baselines included, is in CI's regression check, and a
    # language model too (its figure is bits per byte)
    assert sorted(r.config.method for r in smoke.runs if r.config.model == "cnn") == sorted(METHODS.names())
    assert {r.config.dataset for r in smoke.runs if r.config.model == "gpt-nano"} == {"synthetic-text"}
    lm = found["lm"]  # every method and baseline on the CPU-sized transformer at K=2 and 4, bp also on one device
    assert {(r.config.model, r.config.dataset) for r in lm.runs} == {("gpt-nano", "synthetic-text")}
    for k in (2, 4):  # every method that can cut gpt-nano's six blocks into its V·K modules, and split the
        # epoch's last batch of 2 sequences into its micro-batches (DualPipeV needs M >= 2K: bench.toml says why)
        fits = sorted(n for n, c in METHODS.items() if c.modules_per_device() * k <= 6 and n != "dualpipev")
        assert sorted(r.config.method for r in lm.runs if r.config.gpus == k) == fits
    assert len(fits) < len(METHODS.names())  # at K = 4 the schedules holding two modules per device do not fit
    assert [r.config.method for r in lm.runs if r.config.gpus == 1] == ["bp"]
    assert {r.config.model for r in found["lm-gpu"].runs} == {"gpt-small"}
    for name, k in (("honest-speed", 2), ("honest-speed-gpu", 4)):
        honest = found[name]
        assert sorted({r.config.method for r in honest.runs}) == sorted(METHODS.names())  # every method and baseline
        assert {r.config.gpus for r in honest.runs if r.config.method != "bp"} == {k}
        assert sorted(r.config.gpus for r in honest.runs if r.config.method == "bp") == [1, k]  # one device, and K
        assert len({(r.config.model, r.config.batch_size, r.config.epochs) for r in honest.runs}) == 1  # same work
    paper = found["paper-cifar10"]
    assert {(r.config.model, r.config.gpus) for r in paper.runs} >= {("resnet56", 2), ("resnet110", 4), ("resnet164", 4)}
    assert all(r.config.epochs == 300 and r.config.milestones == [150, 225] for r in paper.runs)
    sigma = [r for r in paper.runs if r.config.model == "resnet164"]
    assert all(r.config.sigma_every == 50 for r in sigma)  # a grid overrides a shared setting


@pytest.mark.parametrize("text,message", [
    ("[suite.a]\nepochz = 2\n[[suite.a.grid]]\nmethods=['bp']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[1]\nseeds=[0]\n",
     "suite.a: unknown key 'epochz'"),
    ("[suite.a]\n[[suite.a.grid]]\nmethods=['bp']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[1]\nseeds=[0]\nwidth=3\n",
     "suite.a.grid[0]: unknown key 'width'"),
    ("[suite.a]\n[[suite.a.grid]]\nmethods=['bp']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=['two']\nseeds=[0]\n",
     "suite.a.grid[0].gpus: expected a list of ints, got ['two']"),
    ("[suite.a]\nepochs = '3'\n[[suite.a.grid]]\nmethods=['bp']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[1]\nseeds=[0]\n",
     "suite.a: epochs = '3' should be an integer"),
    ("[suite.a]\n[[suite.a.grid]]\nmethods=[]\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[1]\nseeds=[0]\n",
     "suite.a.grid[0].methods is empty"),
    ("[suite.a]\nepochs = 2\n", "suite.a has no [[suite.a.grid]]"),
    ("[suite.a]\n[[suite.a.grid]]\nmethods=['bp']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[0]\nseeds=[0]\n",
     "bad --gpus 0"),
    ("[suites.a]\n", "unknown top-level key 'suites'"),
    ("[suite.a\n", "is not valid TOML"),
    ("[suite.a]\nepochs = 1\nlr = 0.1\nepochs = 2\n", "key 'epochs' is set twice in one table"),
    ("[suite.a]\n[suite.b]\n[[suite.a.grid]]\nmodels = ['mlp']\nmodels = ['cnn']\n", "key 'models' is set twice"),
])
def test_bad_suites_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DbenchError) as caught:
        suites.load_all(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_cli_dry_run_and_errors(tmp_path):
    write(tmp_path, TINY.format(lr=0.05))
    done = subprocess.run([DBENCH, "suite", "tiny", "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[1/2] bp-mlp-synthetic-small-k2-s0: missing" in done.stdout and "[2/2] fr-mlp-synthetic-small-k2-s0: missing" in done.stdout
    assert not (tmp_path / "results").exists()
    bad = subprocess.run([DBENCH, "suite", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: bench.toml: no suite 'nope'; suites: tiny"


def test_interrupted_suite_finishes_every_run_once(tmp_path):
    suite = suites.load(write(tmp_path, TINY.format(lr=0.05)), "tiny")
    root = tmp_path / "results"
    calls = []

    def stop_in_second_run(done):
        calls.append(done)
        if len(calls) == 3:  # bp's two epochs, then fr's first
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        suites.run_suite(suite, root, echo=lambda line: None, on_epoch_end=stop_in_second_run)
    first = (root / "tiny" / "bp-mlp-synthetic-small-k2-s0" / "metrics.jsonl").read_text()
    assert suites.status(suite.runs[1], root) == "interrupted"

    lines = []
    final = suites.run_suite(suite, root, echo=lines.append)
    assert final == {"bp-mlp-synthetic-small-k2-s0": "complete", "fr-mlp-synthetic-small-k2-s0": "complete"}
    assert "[1/2] bp-mlp-synthetic-small-k2-s0: complete, skipped" in lines and "[2/2] fr-mlp-synthetic-small-k2-s0: resuming" in lines
    assert (root / "tiny" / "bp-mlp-synthetic-small-k2-s0" / "metrics.jsonl").read_text() == first  # not run again
    for run in suite.runs:
        rows = [json.loads(x) for x in (run.path(root) / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_a_diverged_run_is_recorded_and_the_suite_goes_on(tmp_path):
    text = TINY.format(lr=0.05).replace('methods = ["bp", "fr"]', 'methods = ["bp"]') + """
[[suite.tiny.grid]]
methods = ["fr"]
models = ["mlp"]
datasets = ["synthetic-small"]
gpus = [2]
seeds = [0]
lr = 1e30
"""
    suite = suites.load(write(tmp_path, text), "tiny")
    final = suites.run_suite(suite, tmp_path / "results", echo=lambda line: None)
    assert final == {"bp-mlp-synthetic-small-k2-s0": "complete", "fr-mlp-synthetic-small-k2-s0": "diverged"}
    again = suites.run_suite(suite, tmp_path / "results", echo=lambda line: None)
    assert again == final  # a diverged run is not retried


@pytest.fixture(scope="module")
def golden_suite(tmp_path_factory):
    """The tiny suite run once, with its golden figures recorded."""
    base = tmp_path_factory.mktemp("golden")
    suite = suites.load(write(base, TINY.format(lr=0.05)), "tiny")
    suites.run_suite(suite, base / "results", echo=lambda line: None)
    checker.update(suite, base / "results", base / "golden")
    return base


def test_golden_figures_pass_on_an_unchanged_tree(golden_suite):
    suite = suites.load(golden_suite / "bench.toml", "tiny")
    findings, path = checker.check(suite, golden_suite / "results", golden_suite / "golden")
    assert path == golden_suite / "golden" / "tiny" / "cpu.json"
    assert findings and all(f.ok for f in findings)
    env = {**os.environ}
    done = subprocess.run([DBENCH, "check", "tiny", "--golden", "golden"], capture_output=True, text=True,
                          cwd=golden_suite, env=env)
    assert done.returncode == 0 and "all 6 figures within tolerance" in done.stdout


def test_worse_accuracy_fails_the_check(golden_suite, tmp_path):
    """The same runs with a learning rate 1000 times too small: best accuracy falls below golden - 0.03."""
    write(tmp_path, TINY.format(lr=0.00005))
    suites.run_suite(suites.load(tmp_path / "bench.toml", "tiny"), tmp_path / "results", echo=lambda line: None)
    done = subprocess.run([DBENCH, "check", "tiny", "--golden", str(golden_suite / "golden")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    regressed = [line for line in done.stdout.splitlines() if "REGRESSED" in line]
    assert regressed and all("best test accuracy" in line for line in regressed)
    assert "regressed or failed" in done.stderr


def test_bigger_memory_fails_the_check(golden_suite, tmp_path):
    """The same runs with twice the batch: module peaks grow past golden + 5%."""
    write(tmp_path, TINY.format(lr=0.05).replace("batch_size = 128", "batch_size = 256"))
    suite = suites.load(tmp_path / "bench.toml", "tiny")
    suites.run_suite(suite, tmp_path / "results", echo=lambda line: None)
    findings, _ = checker.check(suite, tmp_path / "results", golden_suite / "golden")
    memory = [f for f in findings if "peak MiB" in f.metric and not f.ok]
    assert memory and all(f.measured > f.limit for f in memory)


def test_missing_runs_and_golden_are_reported(golden_suite, tmp_path):
    suite = suites.load(golden_suite / "bench.toml", "tiny")
    with pytest.raises(DbenchError, match="no complete run of suite 'tiny'"):
        checker.check(suite, tmp_path / "nothing", golden_suite / "golden")
    with pytest.raises(DbenchError, match="record them with `dbench check tiny --update`"):
        checker.check(suite, golden_suite / "results", tmp_path / "no-golden")


@pytest.mark.parametrize("damage,message", [
    (lambda good: good[: len(good) // 2], "is not valid JSON ("),
    (lambda good: '{"suite": "tiny"}', 'has no "tolerance" with numbers "accuracy" and "memory"'),
    (lambda good: json.dumps({**json.loads(good), "suite": "smoke"}),
     "holds the golden figures of suite 'smoke', not of 'tiny'"),
    (lambda good: json.dumps({k: v for k, v in json.loads(good).items() if k != "suite"}),
     "holds the golden figures of no named suite"),
    (lambda good: "[1, 2]", "is not a JSON object (it holds a list)"),
    (lambda good: json.dumps({**json.loads(good), "runs": []}), 'has no "runs" object'),
    (lambda good: good.replace('"peak_bytes"', '"peak"'), ": run bp-mlp-synthetic-small-k2-s0 lacks a number best_test_acc, "
                                                         "a memory_kind or a list of numbers peak_bytes"),
    (lambda good: "\udcff", "is not text (not UTF-8)"),
], ids=["truncated", "empty-object", "other-suite", "no-suite", "list", "runs-list", "run-entry", "binary"])
def test_a_damaged_golden_file_is_one_line_exit_2(golden_suite, tmp_path, damage, message, monkeypatch, capsys):
    good = (golden_suite / "golden" / "tiny" / "cpu.json").read_text()
    bad = tmp_path / "golden" / "tiny" / "cpu.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(damage(good).encode("utf-8", "surrogateescape"))
    code, out, err = run_cli(["check", "tiny", "--golden", str(tmp_path / "golden")], monkeypatch, capsys,
                             cwd=golden_suite)
    assert (code, out) == (2, "") and err.startswith(f"error: {bad}") and message in err and err.count("\n") == 1
    assert err.endswith("restore this golden file from version control, or record it again with "
                        "`dbench check tiny --update`\n")


@pytest.mark.parametrize("file,content,message", [
    ("summary.json", "{}", "summary.json has no status: run fr-mlp-synthetic-small-k2-s0 of suite tiny can be neither "
                           "skipped nor resumed"),
    ("summary.json", '{"status": "complete"}', "summary.json says complete but lacks a number best_test_acc"),
    ("environment.json", '{"devices": [', "environment.json is not valid JSON ("),
    ("environment.json", '{"devices": "cpu"}', "environment.json: \"devices\" is not a list of objects"),
])
def test_a_damaged_run_fails_the_check_naming_its_file(golden_suite, tmp_path, file, content, message, monkeypatch,
                                                      capsys):
    shutil.copytree(golden_suite / "results", tmp_path / "results")
    damaged = tmp_path / "results" / "tiny" / "fr-mlp-synthetic-small-k2-s0" / file
    damaged.write_text(content)
    code, out, err = run_cli(["check", "tiny", "--file", str(golden_suite / "bench.toml"), "--golden",
                              str(golden_suite / "golden")], monkeypatch, capsys, cwd=tmp_path)
    assert (code, out) == (2, "") and err.startswith(f"error: {damaged.relative_to(tmp_path)}")
    assert message in err and err.count("\n") == 1


def test_variants_of_a_method_get_folders_of_their_own(tmp_path):
    """Two grids running one method with different options (FDG's β, say) plan two runs, not one twice."""
    grid = "[[suite.a.grid]]\nmethods=['fdg']\nmodels=['mlp']\ndatasets=['synthetic']\ngpus=[2]\nseeds=[0]\n"
    path = write(tmp_path, "[suite.a]\nepochs = 1\n" + grid + grid + "method_options = {shrink = '0.5'}\n")
    runs = suites.load(path, "a").runs
    assert [r.name for r in runs] == ["fdg-mlp-synthetic-k2-s0", "fdg-shrink0.5-mlp-synthetic-k2-s0"]
    assert [r.config.method_options for r in runs] == [{}, {"shrink": "0.5"}]
    same = write(tmp_path, "[suite.a]\n" + grid + grid, "same.toml")
    with pytest.raises(DbenchError, match="appears in two grids"):
        suites.load(same, "a")


def test_resuming_a_diverged_run_is_refused_and_leaves_it_untouched(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    dbench = str(Path(sys.executable).parent / "dbench")
    out = tmp_path / "run"
    # the local engine: refusing to resume depends on the recorded status, not on the processes that ran
    done = subprocess.run([dbench, "run", "--method", "fr", "--model", "mlp", "--gpus", "2", "--epochs", "2",
                           "--lr", "1e30", "--engine", "local", "--dataset", "synthetic-small", "--quiet",
                           "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and json.loads((out / "summary.json").read_text())["status"] == "diverged"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = subprocess.run([dbench, "run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "diverged" in again.stderr and "not resumed" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("grid", [
    'datasets = ["cifar10"]\ndata_dir = "{tmp}/no-such-folder"',  # a folder that does not exist
    'datasets = ["cifar10"]',  # a data set that needs a folder, given none
    'datasets = ["cifar10"]\ndata_dir = "{tmp}"',  # a folder that exists but does not hold the data set
    'datasets = ["text"]\ndata_dir = "{tmp}/no-such-file.txt"',
])
def test_a_suite_refused_for_a_later_grid_writes_nothing(tmp_path, grid, monkeypatch, capsys):
    """The first grid is fine; the second names data the loader could not find: the suite is refused in one
    line before its first run starts, and nothing is written under results/."""
    text = TINY.format(lr=0.05) + "\n[[suite.tiny.grid]]\nmethods = [\"bp\"]\nmodels = [\"resnet8\"]\n" \
        f"{grid.replace('{tmp}', str(tmp_path))}\ngpus = [2]\nseeds = [0]\n"
    if '"text"' in grid:
        text = text.replace('models = ["resnet8"]', 'models = ["gpt-nano"]')
    write(tmp_path, text)
    code, _, err = run_cli(["suite", "tiny"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert "data" in err and "run bp-" in err
    assert not (tmp_path / "results").exists()
