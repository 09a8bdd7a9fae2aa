"""A task defined here, in a test, reaches every consumer of run figures with no edit to dbench.

The task ("log loss": runs judged by their test cross-entropy in nats, lower is better, with a rate of
their own) is one class registered for the module's tests. It must appear in summary.json, the results
tables, `dbench check` (its own criterion and tolerance in the golden file), `dbench compare` and every
section of a report, each in its own words, beside classification runs in their unchanged words. The
expected figures are computed here from the epoch rows written, not read back from dbench.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from dbench import check as checker
from dbench import results, suites
from dbench import summary as summaries
from dbench import task as tasks
from dbench.registry import TASKS
from dbench.report import build_report, verdict
from dbench.report.section import ReportData
from dbench.task import Criterion, Measure, Quality, Target, Task

KIND = "log loss"
SPEC = {"kind": KIND}


class NllTarget(Target):
    def problem(self, value):
        return None if isinstance(value, (int, float)) and value > 0 else f"{value} is not a loss in nats above 0"

    def reference_value(self, reference_runs):
        return reference_runs["best_test_nll"].astype(float).mean()


class LogLoss(Task):
    kind = KIND
    plural = "Log-loss tasks"
    runs_title = "Log-loss runs"
    suffix = "-nll"
    quality = Quality(column="best_test_nll", name="best test NLL", digits=4, short="nll",
                      delta="Δ NLL vs {reference}", axis="best test NLL (nats)", words="best test NLL",
                      better="as low a loss", terminal="NLL")
    target = NllTarget(keyword="target_nll", column="target_nll", epoch_column="test_nll", higher_is_better=False,
                       factor=1.02, metavar="NATS", help="time to a test NLL", name="test NLL", unit=" nats",
                       scale=1, digits=4, reference_name="mean best test NLL", given_name="test NLL",
                       shown="target NLL")
    criterion = Criterion(key="best_test_nll", name="best test NLL", tolerance_key="nll", tolerance=0.01,
                          higher_is_better=False)
    curves = (Measure("train_loss", "training NLL"), Measure("test_nll", "test NLL (nats)"))
    curves_caption = " NLL: the mean cross-entropy in nats."
    runs_columns = (Measure("best_test_nll", "best test NLL", digits=4),)
    generalization_title = "Best test NLL (nats)"
    generalization_intro = " Log-loss tasks: the best test NLL instead."
    verdict_title = "What each method buys: log-loss tasks"
    verdict_intro = "A log-loss task is judged by its test NLL."
    run_columns = ("best_test_nll", "samples_per_min")
    epoch_columns = ("test_nll",)
    rates = (("samples_per_min", "samples/min", "samples/min: samples/s × 60; "),)

    def best_epoch(self, done):
        return min(done, key=lambda r: r["test_loss"])

    def summary_fields(self, best, last, samples_per_s, spec):
        return {"best_test_nll": best["test_loss"],
                "samples_per_min": None if samples_per_s is None else samples_per_s * 60}

    def summary_line(self, summary):
        return f"Best test NLL {summary['best_test_nll']:.4f} nats (epoch {summary['best_epoch']})."

    def run_fields(self, summary, spec):
        return {"best_test_nll": summary.get("best_test_nll"), "samples_per_min": summary.get("samples_per_min")}

    def epoch_fields(self, row):
        return {"test_nll": row.get("test_loss")}

    def verdict_caption(self, reference, target, not_reached, dash):
        return (f"best test NLL: the lowest test NLL. Δ NLL vs {reference}: the difference. target NLL: {target}. "
                f"time to target (s): until the test NLL is at or below it; {not_reached}: never. ")


FACTS = {
    "bp": {"family": "exact gradient", "table_order": 0, "reference": True, "locking": "locked",
           "parallelism": "model", "ideal_speedup": 1.0},
    "fr": {"family": "delayed gradient", "table_order": 1, "reference": False, "locking": "unlocked",
           "parallelism": "model", "ideal_speedup": 1.5},
}
# name -> (method, dataset, seed, test loss per epoch, test accuracy per epoch, train seconds per epoch)
RUNS = {
    "nll-bp-s0": ("bp", "text", 0, [1.2, 1.0, 1.1], [0.5, 0.6, 0.7], [10, 10, 10]),
    "nll-bp-s1": ("bp", "text", 1, [1.3, 1.05, 1.02], [0.5, 0.6, 0.7], [10, 10, 10]),
    # reaches 1.02 × bp's mean best (1.01 → 1.0302) in its second epoch
    "nll-fr-s0": ("fr", "text", 0, [1.1, 1.03, 0.99], [0.5, 0.6, 0.6], [5, 5, 5]),
    "img-bp-s0": ("bp", "synthetic", 0, [0.6, 0.5, 0.4], [0.6, 0.8, 0.9], [10, 10, 10]),
}


def rows(losses, accs, seconds) -> list[dict]:
    return [{"kind": "epoch", "epoch": e + 1, "lr": 0.05, "train_loss": loss + 0.1, "train_acc": acc,
             "test_loss": loss, "test_acc": acc, "train_seconds": s, "eval_seconds": 0.5, "epoch_seconds": s + 1,
             "samples_per_s": 100.0, "modules": [
                 {"module": m, "device": "cpu", "compute_s": 1.0, "accounted_peak_bytes": (m + 1) * 2**20,
                  "accounted_bytes": {"parameters": (m + 1) * 2**20}} for m in range(2)]}
            for e, (loss, acc, s) in enumerate(zip(losses, accs, seconds))]


def write_run(folder: Path, name: str, seed: int | None = None) -> None:
    method, dataset, run_seed, losses, accs, seconds = RUNS[name]
    seed = run_seed if seed is None else seed
    task = SPEC if dataset == "text" else None
    folder.mkdir(parents=True)
    model = "gpt" if dataset == "text" else "mlp"
    settings = {"method": method, "method_options": {}, "model": model, "dataset": dataset, "gpus": 2, "seed": seed,
                "epochs": 3, "batch_size": 32, "lr": 0.05, "lr_schedule": "cosine", "engine": "distributed",
                "split": "blocks", "momentum": 0.9, "weight_decay": 0.0005, "nesterov": False, "milestones": [],
                "lr_gamma": 0.1, "data_dir": None, "download": False, "devices": None, "comm_timeout": 300.0,
                "sigma_every": 0, "sigma_batches": 2}
    config = {"run": settings, "engine": "distributed", "devices": ["cpu"] * 2, "method_facts": FACTS[method],
              "method_options": {}, "partition": [[0, 1], [1, 2]], "num_params": 1000, "warmup_steps": 5,
              **({"task": task} if task else {})}
    metric_rows = rows(losses, accs, seconds)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_rows))
    (folder / "summary.json").write_text(json.dumps(summaries.compute(metric_rows, "complete", 3, task=task)))
    (folder / "environment.json").write_text(json.dumps({"devices": [{"device": "cpu"}]}))


@pytest.fixture(autouse=True)
def log_loss():
    with TASKS.temporarily(KIND, LogLoss()) as task:
        yield task


@pytest.fixture
def root(tmp_path) -> Path:
    for name in RUNS:
        write_run(tmp_path / "runs" / name, name)
    return tmp_path / "runs"


def test_the_summary_is_the_tasks(log_loss):
    _, _, _, losses, accs, seconds = RUNS["nll-bp-s1"]
    summary = summaries.compute(rows(losses, accs, seconds), "complete", 3, task=SPEC)
    assert summary["task"] == KIND and summary["best_epoch"] == 3 and summary["best_test_nll"] == 1.02
    assert summary["best_test_acc"] == 0.7 and summary["samples_per_min"] == 6000.0
    image = summaries.compute(rows(losses, accs, seconds), "complete", 3)  # the default task: as before
    assert "task" not in image and "best_test_nll" not in image and image["best_epoch"] == 3
    assert tasks.of(SPEC) is log_loss and tasks.of(None) is tasks.default() is not log_loss


def test_the_results_tables_have_its_columns(root):
    runs = results.load_runs([root]).runs
    table = results.runs_frame(runs).set_index("run")
    assert table.loc["nll-bp-s0", "task"] == KIND and table.loc["nll-bp-s0", "best_test_nll"] == 1.0
    assert table.loc["nll-fr-s0", "samples_per_min"] == 6000.0
    assert table.loc["img-bp-s0", "task"] == "classification" and pd.isna(table.loc["img-bp-s0", "best_test_nll"])
    epochs = results.epochs_frame(runs)
    assert epochs[epochs["run"] == "nll-fr-s0"]["test_nll"].tolist() == [1.1, 1.03, 0.99]
    assert epochs[epochs["run"] == "img-bp-s0"]["test_nll"].isna().all()


def test_the_verdict_judges_it_by_its_quality_and_target(root):
    data = ReportData.of(results.load_runs([root]).runs)
    numbers = verdict.table(data)
    mine = numbers[numbers["task"] == KIND].set_index("method")
    assert mine.loc["bp", "best_test_nll_mean"] == pytest.approx(1.01)
    assert mine.loc["fr", "nll_vs_reference"] == pytest.approx(0.99 - 1.01)
    assert mine.loc["fr", "target_nll"] == pytest.approx(1.02 * 1.01)
    assert mine.loc["fr", "time_to_target_s"] == pytest.approx(10.0)  # 1.03 ≤ 1.0302 at the end of epoch 2
    assert mine.loc["bp", "time_to_target_s"] == pytest.approx((20 + 30) / 2)  # s0 at epoch 2, s1 at epoch 3
    image = numbers[numbers["task"] == "classification"]
    assert image["target_acc"].notna().all() and image["target_nll"].isna().all()
    assert verdict.table(data, target_nll=0.995).set_index("method").loc["fr", "time_to_target_s"] == 15.0
    shown = verdict.shown(numbers[numbers["task"] == KIND])
    assert {"best test NLL", "Δ NLL vs bp", "target NLL"} <= set(shown.columns)
    assert shown["best test NLL"].tolist() == ["1.0100 ± 0.0141", "0.9900"]


def test_compare_prints_it_in_its_own_words(root, monkeypatch, capsys):
    code, out, err = run_cli(["compare", str(root)], monkeypatch, capsys)
    assert code == 0, err
    assert "target: 1.0302 nats test NLL (1.02 × bp's mean best test NLL)" in out
    assert "Log-loss tasks: best test NLL: the lowest test NLL." in " ".join(out.split())
    assert "NLL = best test NLL" in " ".join(out.split()) and "error %" in out  # both tasks' blocks


def test_every_report_section_shows_it(root, tmp_path):
    report = build_report([root], tmp_path / "report")
    sections = {s.key: s for s in report.sections}
    tables = {Path(item.csv).name: item for s in report.sections for item in s.items if hasattr(item, "csv")}
    verdict_csv = pd.read_csv(tmp_path / "report" / "verdict" / "verdict-nll.csv")
    assert set(verdict_csv["task"]) == {KIND} and "best_test_nll_mean" in verdict_csv.columns
    assert "best_test_error_mean" not in verdict_csv.columns and "target_acc" not in verdict_csv.columns
    assert "best_test_nll_mean" not in pd.read_csv(tmp_path / "report" / "verdict" / "verdict.csv").columns
    assert "judged by its test NLL" in sections["verdict"].intro
    assert tables["generalization-nll.csv"].title == "Best test NLL (nats)"
    assert "Log-loss tasks: the best test NLL instead." in sections["generalization"].intro
    generalization = pd.read_csv(tmp_path / "report" / "generalization" / "generalization-nll.csv")
    assert generalization.set_index("method").loc["bp", "best_test_nll_mean"] == pytest.approx(1.01)
    assert "samples/min" in tables["speed.csv"].shown.columns
    convergence = [f for f in sections["convergence"].items if "gpt" in f.title]
    assert len(convergence) == 1 and "NLL: the mean cross-entropy in nats." in convergence[0].caption
    index = (tmp_path / "report" / "index.md").read_text()
    assert "Log-loss runs" in index and "Classification runs" in index and "best test NLL" in index
    for section in report.sections:  # every section has the task's runs in it
        runs = {r for item in section.items for r in getattr(item, "runs", [])}
        assert {"nll-bp-s0", "nll-fr-s0"} <= runs or not section.items, section.key


SUITE = """
[suite.nll]
epochs = 3
[[suite.nll.grid]]
methods = ["bp", "fr"]
models = ["gpt"]
datasets = ["text"]
gpus = [2]
seeds = [0]
"""


def test_check_uses_its_criterion_and_tolerance(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.toml").write_text(SUITE)
    suite = suites.load(tmp_path / "bench.toml", "nll")
    for planned, name in zip(suite.runs, ("nll-bp-s0", "nll-fr-s0")):
        write_run(planned.path(tmp_path / "results"), name, seed=0)
    path = checker.update(suite, tmp_path / "results", tmp_path / "golden")
    golden = json.loads(path.read_text())
    assert golden["tolerance"] == {"accuracy": 0.03, "memory": checker.MEMORY_TOLERANCE, "nll": 0.01}
    assert golden["runs"]["bp-gpt-text-k2-s0"] == {"task": KIND, "best_test_nll": 1.0, "memory_kind": "accounted",
                                                   "peak_bytes": [2**20, 2 * 2**20]}
    summary_path = suite.runs[1].path(tmp_path / "results") / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "best_test_nll": 0.99 + 0.02}))  # 0.02 nats worse: past 0.01
    code, out, err = run_cli(["check", "nll", "--golden", "golden"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 1 and "1 of 6 figures regressed" in err
    regressed = [line for line in out.splitlines() if "REGRESSED" in line]
    assert len(regressed) == 1 and "fr-gpt-text-k2-s0" in regressed[0] and "best test NLL" in regressed[0]
    summary_path.write_text(json.dumps({**summary, "best_test_nll": 0.99 + 0.005}))  # within 0.01
    code, out, err = run_cli(["check", "nll", "--golden", "golden"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0, err
