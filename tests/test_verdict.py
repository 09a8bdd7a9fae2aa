"""The verdict ("which method buys what") against numbers computed by hand from run directories written by hand.

No training: each run directory holds a config.json, summary.json and
metrics.jsonl with known accuracies, seconds and peak memory, so every cell of
the verdict can be worked out here from those numbers.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dbench import results
from dbench.errors import DbenchError
from dbench.report import build_report, verdict
from dbench.report.section import ReportData

DBENCH = str(Path(sys.executable).parent / "dbench")  # the console script of this environment
MIB = 2**20
BATCH = 128

# method -> facts, as the built-in methods record them at K=2 (dbench.method.Stage.facts)
FACTS = {
    "bp": {"family": "exact gradient", "table_order": 0, "reference": True, "locking": "locked",
           "parallelism": "model", "ideal_speedup": 1.0},
    "ddp": {"family": "exact gradient", "table_order": 0.25, "reference": False, "locking": "locked",
            "parallelism": "data", "ideal_speedup": 2.0},
    "fr": {"family": "delayed gradient", "table_order": 1, "reference": False, "locking": "unlocked",
           "parallelism": "model", "ideal_speedup": 1.5},
    "ddg": {"family": "delayed gradient", "table_order": 2, "reference": False, "locking": "unlocked",
            "parallelism": "model", "ideal_speedup": 2.0},
    "dni": {"family": "synthetic gradient", "table_order": 3, "reference": False, "locking": "unlocked",
            "parallelism": "model", "ideal_speedup": None},
    "dfa": {"family": "feedback alignment", "table_order": 5, "reference": False, "locking": "forward locked",
            "parallelism": "model", "ideal_speedup": 1.5},
}

# name -> (method, model, K, seed, engine, test accuracy per epoch, train seconds per epoch,
#          accounted peak MiB per module, CUDA peak allocated MiB per module or None)
RUNS = {
    "bp-s0": ("bp", "mlp", 2, 0, "distributed", [0.50, 0.80, 0.90], [10, 10, 10], [100, 60], None),
    "bp-s1": ("bp", "mlp", 2, 1, "distributed", [0.60, 0.885, 0.88], [11, 11, 11], [102, 60], None),
    "fr-s0": ("fr", "mlp", 2, 0, "distributed", [0.55, 0.87, 0.89], [8, 8, 8], [150, 90], None),
    "fr-s1": ("fr", "mlp", 2, 1, "distributed", [0.60, 0.90, 0.91], [9, 9, 9], [150, 90], None),
    # reaches the default target in seed 0 only
    "ddg-s0": ("ddg", "mlp", 2, 0, "distributed", [0.50, 0.70, 0.887], [6, 6, 6], [200, 120], None),
    "ddg-s1": ("ddg", "mlp", 2, 1, "distributed", [0.50, 0.70, 0.85], [7, 7, 7], [200, 120], None),
    # never reaches it
    "dfa-s0": ("dfa", "mlp", 2, 0, "distributed", [0.30, 0.40, 0.45], [5, 5, 5], [80, 40], None),
    # exact baselines: the model on one device, and ddp on the same two devices (with CUDA peaks)
    "bp-k1-s0": ("bp", "mlp", 1, 0, "local", [0.60, 0.88, 0.90], [7, 7, 7], [180], None),
    "ddp-s0": ("ddp", "mlp", 2, 0, "distributed", [0.60, 0.85, 0.90], [9, 9, 9], [100, 100], [130, 128]),
    # the local engine at K=2: not a parallel measurement
    "dni-s0": ("dni", "mlp", 2, 0, "local", [0.50, 0.80, 0.89], [12, 12, 12], [90, 50], None),
    # a comparison without a reference run
    "cnn-fr-s0": ("fr", "cnn", 2, 0, "distributed", [0.50, 0.60], [4, 4], [30, 20], None),
}


def write_run(folder: Path, method, model, k, seed, engine, accs, seconds, peaks, cuda) -> None:
    """A complete run directory holding exactly these numbers, in the files dbench run writes."""
    folder.mkdir(parents=True)
    settings = {"method": method, "method_options": {}, "model": model, "dataset": "synthetic", "gpus": k,
                "seed": seed, "epochs": len(accs), "batch_size": BATCH, "lr": 0.05, "lr_schedule": "cosine",
                "engine": engine, "split": "blocks", "momentum": 0.9, "weight_decay": 0.0005, "nesterov": False,
                "milestones": [], "lr_gamma": 0.1, "data_dir": None, "download": False, "devices": None,
                "comm_timeout": 300.0, "sigma_every": 0, "sigma_batches": 2}
    facts = {**FACTS[method], **({"ideal_speedup": 1.0} if k == 1 else {})}
    config = {"run": settings, "engine": engine, "devices": ["cpu"] * k, "method_facts": facts,
              "method_options": {}, "partition": [[i, i + 1] for i in range(k)], "num_params": 1000}
    (folder / "config.json").write_text(json.dumps(config))
    modules = []
    for m, mib in enumerate(peaks):
        record = {"module": m, "device": "cpu", "accounted_peak_bytes": mib * MIB,
                  "accounted_bytes": {"parameters": mib * MIB // 2, "activations": mib * MIB // 2}}
        if cuda:
            record["cuda_peak_allocated_bytes"] = cuda[m] * MIB
        modules.append(record)
    rows = [{"kind": "epoch", "epoch": e + 1, "train_seconds": s, "epoch_seconds": s + 1, "test_acc": a,
             "test_loss": 1 - a, "train_loss": 1.2 - a, "train_acc": a, "lr": 0.05, "samples_per_s": 1000 / s,
             "eval_seconds": 0.5, "modules": modules}
            for e, (a, s) in enumerate(zip(accs, seconds))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(range(len(accs)), key=lambda e: accs[e])
    summary = {"status": "complete", "epochs": len(accs), "epochs_done": len(accs), "best_test_acc": accs[best],
               "best_test_error": 1 - accs[best], "best_epoch": best + 1, "final_test_acc": accs[-1],
               "final_test_loss": 1 - accs[-1], "final_train_loss": 1.2 - accs[-1], "final_train_acc": accs[-1],
               "train_seconds": sum(seconds), "seconds": sum(seconds) + len(seconds),
               "samples_per_s": sum(1000 / s for s in seconds) / len(seconds), "modules": modules}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for name, spec in RUNS.items():
        write_run(root / name, *spec)
    return root


@pytest.fixture(scope="module")
def data(root) -> ReportData:
    return ReportData.of(results.load_runs([root]).runs)


# --- the numbers, by hand -------------------------------------------------------------------------

def acc(name: str) -> float:
    return max(RUNS[name][5])


def err(*names: str) -> list[float]:
    return [100 * (1 - acc(n)) for n in names]


def s_per_epoch(*names: str) -> float:
    return statistics.mean(sum(RUNS[n][6]) / len(RUNS[n][6]) for n in names)


def first_time(name: str, target: float) -> float | None:
    """Training seconds up to the end of the first epoch at or above the target; None: never."""
    accs, seconds = RUNS[name][5], RUNS[name][6]
    return next((sum(seconds[:e + 1]) for e, a in enumerate(accs) if a >= target), None)


def f2(value: float) -> str:
    return f"{value:.2f}"


def mean_std(values: list[float]) -> str:
    return f"{f2(statistics.mean(values))} ± {f2(statistics.stdev(values))}" if len(values) > 1 \
        else f2(values[0])


def signed(value: float) -> str:
    return "0.00" if f2(abs(value)) == "0.00" else f"{value:+.2f}"


def memory(*names: str, cuda: bool = False) -> tuple[str, str]:
    index = 8 if cuda else 7
    return (f2(statistics.mean(max(RUNS[n][index]) for n in names)),
            f2(statistics.mean(sum(RUNS[n][index]) for n in names)))


def time_cell(names: tuple[str, ...], target: float) -> str:
    times = [t for t in (first_time(n, target) for n in names) if t is not None]
    if not times:
        return "not reached"
    text = f2(statistics.mean(times))
    return text if len(times) == len(names) else f"{text} ({len(times)} of {len(names)} seeds)"


BP2 = ("bp-s0", "bp-s1")
BP1 = ("bp-k1-s0",)
# the default targets: 0.99 × bp's mean best test accuracy in the same comparison
TARGET_K2 = 0.99 * statistics.mean(acc(n) for n in BP2)  # 0.99 × 0.8925 = 0.883575
TARGET_K1 = 0.99 * acc("bp-k1-s0")  # 0.891
BP2_S, BP1_S = s_per_epoch(*BP2), s_per_epoch(*BP1)  # 10.5 s; the fastest exact baseline: bp on one device, 7 s
BP2_ERR = statistics.mean(err(*BP2))  # 10.75 %

# (model, K, label, engine, runs, ideal) in the table's order: model, data set, K, then the methods' table order
ROWS = [
    ("cnn", 2, "fr", "distributed", ("cnn-fr-s0",), 1.5),
    ("mlp", 1, "bp", "local", BP1, 1.0),
    ("mlp", 2, "bp", "distributed", BP2, 1.0),
    ("mlp", 2, "ddp", "distributed", ("ddp-s0",), 2.0),
    ("mlp", 2, "fr", "distributed", ("fr-s0", "fr-s1"), 1.5),
    ("mlp", 2, "ddg", "distributed", ("ddg-s0", "ddg-s1"), 2.0),
    ("mlp", 2, "dni", "local", ("dni-s0",), None),
    ("mlp", 2, "dfa", "distributed", ("dfa-s0",), 1.5),
]


def expected_row(model, k, label, engine, names, ideal, target_acc=None) -> dict:
    """Every cell of one verdict row, from the numbers above."""
    has_ref = model == "mlp"
    ref_s, ref_err = (BP2_S, BP2_ERR) if k == 2 else (BP1_S, statistics.mean(err(*BP1)))
    target = target_acc or (TARGET_K2 if k == 2 else TARGET_K1) if has_ref else target_acc
    seconds = s_per_epoch(*names)
    parallel = engine != "local" or k == 1
    if not parallel:
        over_bp = over_exact = "not a parallel measurement"
    elif has_ref:
        over_bp = f"{f2(ref_s / seconds)} ({f2(ideal)})"
        over_exact = f"{f2(BP1_S / seconds)} ({f2(ideal / 1.0)})"  # bp on one device: ideal 1
    else:  # no bp and no exact baseline measured for cnn
        over_bp, over_exact = f"– ({f2(ideal)})", "– (–)"
    cuda = RUNS[names[0]][8] is not None
    largest, total = memory(*names, cuda=cuda)
    return {
        "model": model, "data set": "synthetic", "K": k, "method": label, "engine": engine, "batch": BATCH,
        "seeds": len(names), "s/epoch": f2(seconds), "× bp (ideal)": over_bp,
        "fastest exact": "bp (N=1)" if has_ref else "–", "× fastest exact (ideal)": over_exact,
        "peak MiB, largest device": largest, "peak MiB, all devices": total,
        "memory": "CUDA peak allocated" if cuda else "accounted",
        "best test error %": mean_std(err(*names)),
        "Δ error vs bp (pp)": signed(statistics.mean(err(*names)) - ref_err) if has_ref else "–",
        "target acc %": f2(100 * target) if target else "–",
        "time to target (s)": time_cell(names, target) if target else "–",
    }


def test_every_cell_with_the_default_target(data):
    shown = verdict.shown(verdict.table(data))
    assert shown.to_dict("records") == [expected_row(*row) for row in ROWS]
    # the cases the brief names, spelled out once more
    cells = shown.set_index(["model", "K", "method"])
    assert TARGET_K2 == pytest.approx(0.883575) and cells.loc[("mlp", 2, "bp"), "target acc %"] == "88.36"
    assert cells.loc[("mlp", 2, "bp"), "time to target (s)"] == "26.00"  # seed 0 at 30 s, seed 1 at 22 s
    assert cells.loc[("mlp", 2, "ddg"), "time to target (s)"] == "18.00 (1 of 2 seeds)"
    assert cells.loc[("mlp", 2, "dfa"), "time to target (s)"] == "not reached"
    assert cells.loc[("mlp", 2, "fr"), "× bp (ideal)"] == "1.24 (1.50)"  # 10.5 / 8.5
    assert cells.loc[("mlp", 2, "fr"), "× fastest exact (ideal)"] == "0.82 (1.50)"  # 7 / 8.5
    assert cells.loc[("mlp", 2, "ddp"), "peak MiB, all devices"] == "258.00"  # CUDA peaks 130 + 128
    assert cells.loc[("mlp", 2, "bp"), "peak MiB, largest device"] == "101.00"  # mean of 100 and 102
    assert cells.loc[("mlp", 2, "ddg"), "best test error %"] == "13.15 ± 2.62"
    assert cells.loc[("mlp", 2, "ddg"), "Δ error vs bp (pp)"] == "+2.40"
    assert cells.loc[("cnn", 2, "fr"), "time to target (s)"] == "–"


def test_every_cell_with_a_given_target(data):
    shown = verdict.shown(verdict.table(data, target_acc=0.75))
    assert shown.to_dict("records") == [expected_row(*row, target_acc=0.75) for row in ROWS]
    cells = shown.set_index(["model", "K", "method"])
    assert cells.loc[("mlp", 2, "ddg"), "time to target (s)"] == "19.50"  # 18 and 21 s: both reach 0.75
    assert cells.loc[("cnn", 2, "fr"), "time to target (s)"] == "not reached"  # a target without a reference


def test_numbers_hold_the_exact_values(data):
    numbers = verdict.table(data).set_index(["model", "k", "method"])
    fr = numbers.loc[("mlp", 2, "fr")]
    assert fr["speedup_epoch_time"] == pytest.approx(10.5 / 8.5) and fr["ideal_speedup"] == 1.5
    assert fr["fastest_exact"] == "bp (N=1)" and fr["speedup_vs_exact"] == pytest.approx(7 / 8.5)
    assert fr["ideal_vs_exact"] == pytest.approx(1.5)
    assert fr["best_test_error_mean"] == pytest.approx(10.0) and fr["best_test_error_std"] == pytest.approx(2**0.5)
    assert fr["error_vs_reference"] == pytest.approx(-0.75) and fr["reference"] == "bp"
    assert fr["target_acc"] == pytest.approx(TARGET_K2) and fr["time_to_target_s"] == pytest.approx(21.0)
    assert fr["runs_reached"] == 2 and fr["memory_source"] == verdict.ACCOUNTED
    ddp = numbers.loc[("mlp", 2, "ddp")]
    assert ddp["memory_source"] == verdict.CUDA and ddp["peak_mib_largest_device"] == pytest.approx(130)
    dni = numbers.loc[("mlp", 2, "dni")]
    assert not dni["parallel"] and math.isnan(dni["speedup_epoch_time"]) and math.isnan(dni["speedup_vs_exact"])
    dfa = numbers.loc[("mlp", 2, "dfa")]
    assert dfa["runs_reached"] == 0 and math.isnan(dfa["time_to_target_s"])
    cnn = numbers.loc[("cnn", 2, "fr")]
    assert cnn["reference"] is None or (isinstance(cnn["reference"], float) and math.isnan(cnn["reference"]))
    assert math.isnan(cnn["target_acc"]) and math.isnan(cnn["error_vs_reference"])


def test_a_bad_target_is_an_error(data, root, tmp_path):
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(DbenchError, match="not a test accuracy in"):
            verdict.table(data, target_acc=bad)
    with pytest.raises(DbenchError, match="not a test accuracy in"):
        build_report([root], tmp_path / "out", target_acc=2.0)
    assert not (tmp_path / "out").exists()  # nothing written


def test_pareto_front():
    import pandas as pd

    x = pd.Series([26.0, 27.0, 21.0, 18.0, 36.0, float("nan"), 21.0])
    y = pd.Series([10.75, 10.0, 10.0, 13.15, 11.0, 55.0, 10.0])
    # fr (21, 10) beats bp, ddp and dni; ddg is faster than everything; an equal point is not dominated
    assert list(verdict.pareto(x, y)) == [False, False, True, True, False, False, True]


def test_the_verdict_needs_no_torch():
    code = "import sys, dbench.report.verdict, dbench.report.build; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --- the report -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(root, tmp_path_factory):
    return build_report([root], tmp_path_factory.mktemp("report"))


def test_the_report_opens_with_the_verdict(report):
    assert [s.key for s in report.sections][0] == "verdict"
    lines = (report.out / "index.md").read_text().splitlines()
    assert lines[0] == "# dbench report"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[0] == "## " + verdict.TITLE
    assert "[Verdict" in next(line for line in lines if line.startswith("Contents: ")).split(" · ")[0]
    for stem in ("verdict", ):
        for ext in (".md", ".csv", ".tex"):
            assert (report.out / "verdict" / f"{stem}{ext}").stat().st_size > 0
    for comparison in ("mlp-synthetic-k2", "mlp-synthetic-k1", "cnn-synthetic-k2"):
        for ext in (".png", ".pdf"):
            assert (report.out / "verdict" / f"{comparison}{ext}").stat().st_size > 0


def test_the_pareto_figure_names_its_front(report):
    section = report.sections[0]
    figures = {f.title: f for f in section.items if hasattr(f, "png")}
    k2 = figures["Verdict: mlp, synthetic, N=2 devices"]
    # fr (21 s, 10.00%) beats bp, ddp and dni; ddg (18 s) is the fastest; dfa never reached the target
    assert "joined by the dashed line: fr, ddg." in k2.caption
    assert "never reached the target (dfa)" in k2.caption
    assert set(k2.runs) == {n for n, spec in RUNS.items() if spec[1] == "mlp" and spec[2] == 2}
    cnn = figures["Verdict: cnn, synthetic, N=2 devices"]
    assert "seconds per epoch (no target: no reference run)" in cnn.caption
    table = next(i for i in section.items if hasattr(i, "shown"))
    assert any("cnn · synthetic · N=2 devices has no run of a reference method" in n for n in section.notes)
    for column in table.shown.columns:  # every column is defined in the caption
        assert column in table.caption, column


def test_where_no_method_reaches_the_target_the_figure_uses_seconds_per_epoch(data, tmp_path):
    section = verdict.build(data, tmp_path, target_acc=0.99)  # no run reaches 99%
    k2 = next(i for i in section.items if i.title == "Verdict: mlp, synthetic, N=2 devices")
    assert "x: seconds per epoch (no method reached the target)" in k2.caption
    # dfa (5 s per epoch, 55%) and ddg (6.5 s, 13.15%) and fr (8.5 s, 10.00%): each faster or more accurate
    assert "joined by the dashed line: fr, ddg, dfa." in k2.caption
    assert (tmp_path / k2.png).stat().st_size > 0
    table = next(i for i in section.items if hasattr(i, "shown"))
    assert set(table.shown["time to target (s)"]) == {"not reached"}


# --- dbench compare -------------------------------------------------------------------------------

def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DBENCH, "compare", *args], capture_output=True, text=True, timeout=120)


def block(output: str, header: str) -> tuple[list[str], dict[str, str]]:
    """One comparison's block: its header lines, and its table rows by method."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    rule = next(i for i in range(start, end) if lines[i].startswith("------"))
    return lines[start:rule - 1], {line.split()[0]: line for line in lines[rule + 1:end]}


def test_compare_prints_the_verdict(root):
    done = compare(str(root))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    header, rows = block(done.stdout, "mlp · synthetic · N=2 devices")
    # one batch size and one fastest exact baseline: said once; two engines and two memory sources: columns
    assert header == ["mlp · synthetic · N=2 devices · batch 128 · fastest exact bp (N=1)",
                      "target: 88.36% test accuracy (0.99 × bp's mean best test accuracy)"]
    assert list(rows) == ["bp", "ddp", "fr", "ddg", "dni", "dfa"]
    assert rows["fr"].split() == ["fr", "distributed", "2", "8.50", "1.24", "(1.50)", "0.82", "(1.50)", "150.00",
                                  "240.00", "accounted", "10.00", "±", "1.41", "-0.75", "21.00"]
    assert rows["ddg"].endswith("18.00 (1 of 2 seeds)") and rows["dfa"].endswith("not reached")
    assert rows["dni"].count("not parallel") == 2 and " CUDA " in rows["ddp"]
    header, rows = block(done.stdout, "cnn · synthetic · N=2 devices")
    assert header == ["cnn · synthetic · N=2 devices · engine distributed · batch 128 · fastest exact – · memory accounted"]
    assert rows["fr"].split() == ["fr", "1", "4.00", "–", "(1.50)", "–", "(–)", "30.00", "50.00", "40.00", "–", "–"]
    # this worst case (two engines and two memory sources in one block) fits 150 columns
    assert max(len(line) for line in done.stdout.splitlines()) <= 150
    assert "has no run of a reference method" in done.stdout


def test_compare_filters_and_target(root):
    done = compare(str(root), "--model", "mlp", "--k", "2", "--method", "bp,dfa", "--target-acc", "0.4")
    assert done.returncode == 0, done.stderr
    header, rows = block(done.stdout, "mlp · synthetic · N=2 devices")
    assert header[1] == "target: 40.00% test accuracy (--target-acc 0.4)"
    assert list(rows) == ["bp", "dfa"]
    assert rows["dfa"].endswith("10.00")  # 0.40 at the end of epoch 2: 5 + 5 s
    assert rows["bp"].endswith("10.50")  # 0.5 and 0.6 at the end of epoch 1: 10 and 11 s
    assert "cnn" not in done.stdout and "N=1 devices" not in done.stdout


@pytest.mark.parametrize("args", [["--target-acc", "2"], ["--target-acc", "x"], ["--target-acc", "0"]])
def test_compare_rejects_a_bad_target(root, args):
    done = compare(str(root), *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--target-acc" in done.stderr


def test_compare_without_runs_is_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, says in (([str(tmp_path / "missing")], "does not exist"), ([str(empty)], "no run directories")):
        done = compare(*args)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr


def test_compare_warns_of_skipped_runs_on_stderr(root, tmp_path):
    import shutil

    shutil.copytree(root / "fr-s0", tmp_path / "runs" / "fr-s0")
    shutil.copytree(root / "bp-s0", tmp_path / "runs" / "broken")
    (tmp_path / "runs" / "broken" / "summary.json").write_text('{"status": ')
    done = compare(str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"warning: skipped {tmp_path / 'runs' / 'broken'}")
    assert "fr " in done.stdout


def test_report_takes_the_target(root, tmp_path):
    done = subprocess.run([DBENCH, "report", str(root), "--out", str(tmp_path / "out"), "--target-acc", "0.75"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out" / "verdict" / "verdict.md").read_text()
    assert "target acc %: the accuracy given (--target-acc 0.75)." in table
    bad = subprocess.run([DBENCH, "report", str(root), "--out", str(tmp_path / "bad"), "--target-acc", "1.01"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()
