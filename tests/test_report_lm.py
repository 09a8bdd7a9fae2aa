"""Language-model runs in the summary, the report, the verdict (`dbench compare`) and `dbench check`.

No training: each run directory is written here by hand, as `dbench run` writes
one (config.json with its "task", metrics.jsonl epoch rows, summary.json from
dbench.summary.compute), with known losses, accuracies, seconds and memory, so
every figure can be worked out from the specification: the best epoch of a
language model is the one with the lowest test loss, bits per byte (bpb) =
loss in nats / ln 2, the default target loss is 1.01 × the reference's mean
best bpb, and time to target is the training seconds until the test loss first
falls to it.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from dbench import check as checker
from dbench import results, run_tables, suites
from dbench import summary as summaries
from dbench.errors import DbenchError
from dbench.tasks.language_model import LANGUAGE_MODEL
from dbench.report import build_report, verdict
from dbench.report.section import ReportData

LN2 = math.log(2)
MIB = 2**20
BATCH = 32
CONTEXT = 64
LM_TASK = {"kind": "language model", "vocab": 256, "context": CONTEXT, "unit": "byte"}
IMAGE_TASK = {"kind": "classification"}
LM_MODEL, LM_DATA = "gpt", "text"

FACTS = {
    "bp": {"family": "exact gradient", "table_order": 0, "reference": True, "locking": "locked",
           "parallelism": "model", "ideal_speedup": 1.0},
    "fr": {"family": "delayed gradient", "table_order": 1, "reference": False, "locking": "unlocked",
           "parallelism": "model", "ideal_speedup": 1.5},
    "ddg": {"family": "delayed gradient", "table_order": 2, "reference": False, "locking": "unlocked",
            "parallelism": "model", "ideal_speedup": 2.0},
}

# Language-model runs at K=2: name -> (method, seed, test loss per epoch (nats per byte), next-token accuracy
# per epoch, train seconds per epoch, accounted peak MiB per module)
LM_RUNS = {
    # the lowest loss is epoch 2 while the highest accuracy is epoch 3: the best epoch is 2
    "bp-s0": ("bp", 0, [2.0, 1.5, 1.6], [0.30, 0.40, 0.45], [10, 10, 10], [100, 60]),
    "bp-s1": ("bp", 1, [2.1, 1.7, 1.45], [0.28, 0.38, 0.44], [11, 11, 11], [102, 60]),
    "fr-s0": ("fr", 0, [1.9, 1.6, 1.47], [0.31, 0.39, 0.41], [8, 8, 8], [150, 90]),
    "fr-s1": ("fr", 1, [1.95, 1.46, 1.55], [0.30, 0.42, 0.43], [9, 9, 9], [150, 90]),
    # never reaches the default target
    "ddg-s0": ("ddg", 0, [2.5, 2.2, 2.0], [0.20, 0.25, 0.30], [6, 6, 6], [200, 120]),
}
# Image runs at K=2 (mlp, synthetic): name -> (method, task as config.json holds it, test accuracy per epoch,
# train seconds per epoch, peak MiB per module). bp's config predates "task": a classification all the same.
IMAGE_RUNS = {
    "img-bp-s0": ("bp", None, [0.5, 0.8, 0.9], [10, 10, 10], [100, 60]),
    "img-fr-s0": ("fr", IMAGE_TASK, [0.6, 0.85, 0.88], [8, 8, 8], [150, 90]),
}


def settings(method: str, model: str, dataset: str, seed: int, epochs: int) -> dict:
    return {"method": method, "method_options": {}, "model": model, "dataset": dataset, "gpus": 2, "seed": seed,
            "epochs": epochs, "batch_size": BATCH, "lr": 0.05, "lr_schedule": "cosine", "engine": "distributed",
            "split": "blocks", "momentum": 0.9, "weight_decay": 0.0005, "nesterov": False, "milestones": [],
            "lr_gamma": 0.1, "data_dir": None, "download": False, "devices": None, "comm_timeout": 300.0,
            "sigma_every": 0, "sigma_batches": 2}


def modules_of(peaks: list[int]) -> list[dict]:
    return [{"module": m, "device": "cpu", "compute_s": 1.0, "accounted_peak_bytes": mib * MIB,
             "accounted_bytes": {"parameters": mib * MIB // 2, "activations": mib * MIB // 2}}
            for m, mib in enumerate(peaks)]


def epoch_rows(losses, accs, seconds, peaks) -> list[dict]:
    """metrics.jsonl epoch rows; the training loss is the test loss + 0.1 nats."""
    return [{"kind": "epoch", "epoch": e + 1, "lr": 0.05, "train_loss": loss + 0.1, "train_acc": acc,
             "test_loss": loss, "test_acc": acc, "train_seconds": s, "eval_seconds": 0.5, "epoch_seconds": s + 1,
             "samples_per_s": 1000 / s, "modules": modules_of(peaks)}
            for e, (loss, acc, s) in enumerate(zip(losses, accs, seconds))]


def write_run(folder: Path, method: str, model: str, dataset: str, seed: int, task: dict | None,
              rows: list[dict], k: int = 2) -> dict:
    """A complete run directory with these epoch rows; its summary.json is dbench.summary.compute's."""
    folder.mkdir(parents=True)
    config = {"run": settings(method, model, dataset, seed, len(rows)), "engine": "distributed",
              "devices": ["cpu"] * k, "method_facts": FACTS[method], "method_options": {},
              "partition": [[i, i + 1] for i in range(k)], "num_params": 1000, "warmup_steps": 5}
    if task is not None:
        config["task"] = task
    summary = summaries.compute(rows, "complete", len(rows), task=task)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "environment.json").write_text(json.dumps({"devices": [{"device": "cpu"}]}))
    return summary


def write_lm(folder: Path, name: str) -> dict:
    method, seed, losses, accs, seconds, peaks = LM_RUNS[name]
    return write_run(folder, method, LM_MODEL, LM_DATA, seed, LM_TASK, epoch_rows(losses, accs, seconds, peaks))


def write_image(folder: Path, name: str) -> dict:
    method, task, accs, seconds, peaks = IMAGE_RUNS[name]
    return write_run(folder, method, "mlp", "synthetic", 0, task,
                     epoch_rows([1 - a for a in accs], accs, seconds, peaks))


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    for name in LM_RUNS:
        write_lm(root / name, name)
    return root


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    for name in LM_RUNS:
        write_lm(root / name, name)
    for name in IMAGE_RUNS:
        write_image(root / name, name)
    return root


@pytest.fixture(scope="module")
def lm_data(lm_root) -> ReportData:
    return ReportData.of(results.load_runs([lm_root]).runs)


# --- the numbers, by hand -------------------------------------------------------------------------

def best_loss(name: str) -> float:
    return min(LM_RUNS[name][2])


def bpb(name: str) -> float:
    return best_loss(name) / LN2


def first_time(name: str, target_bpb: float) -> float | None:
    """Training seconds up to the end of the first epoch whose test loss (bpb) is at or below the target."""
    losses, seconds = LM_RUNS[name][2], LM_RUNS[name][4]
    return next((sum(seconds[:e + 1]) for e, loss in enumerate(losses) if loss / LN2 <= target_bpb), None)


BP, FR, DDG = ("bp-s0", "bp-s1"), ("fr-s0", "fr-s1"), ("ddg-s0",)
BP_BPB = statistics.mean(bpb(n) for n in BP)  # (1.5 + 1.45) / 2 / ln 2 = 2.127976
TARGET = 1.01 * BP_BPB  # 2.149255 bpb, i.e. 1.4898 nats


def test_the_hand_numbers_are_what_the_brief_says():
    assert BP_BPB == pytest.approx(1.475 / LN2) == pytest.approx(2.1279755, abs=1e-6)
    assert TARGET == pytest.approx(2.1492553, abs=1e-6)
    assert first_time("bp-s0", TARGET) is None  # 1.5 nats = 2.164 bpb: never at or below 2.149
    assert first_time("bp-s1", TARGET) == 33 and first_time("fr-s0", TARGET) == 24
    assert first_time("fr-s1", TARGET) == 18 and first_time("ddg-s0", TARGET) is None


# --- the summary ----------------------------------------------------------------------------------

def test_the_summary_takes_the_lowest_test_loss_as_the_best_epoch():
    method, seed, losses, accs, seconds, peaks = LM_RUNS["bp-s0"]
    s = summaries.compute(epoch_rows(losses, accs, seconds, peaks), "complete", 3, task=LM_TASK)
    assert s["task"] == "language model"
    assert s["best_epoch"] == 2  # loss 1.5; the highest accuracy (0.45) is epoch 3's
    assert s["best_test_loss"] == 1.5
    assert s["best_test_bpb"] == pytest.approx(1.5 / LN2) == pytest.approx(2.164043, abs=1e-6)
    assert s["best_test_acc"] == 0.40 and s["best_test_error"] == pytest.approx(0.60)  # next-token, at epoch 2
    assert s["final_test_bpb"] == pytest.approx(1.6 / LN2) and s["final_test_loss"] == 1.6
    assert s["final_train_bpb"] == pytest.approx(1.7 / LN2)
    assert s["final_test_acc"] == 0.45 and s["train_seconds"] == 30
    assert s["tokens_per_s"] == pytest.approx(100 * CONTEXT)  # 100 sequences/s of 64 bytes


def test_a_non_finite_loss_is_never_the_best():
    rows = epoch_rows([float("nan"), 1.2, float("inf")], [0.9, 0.3, 0.2], [1, 1, 1], [10])
    s = summaries.compute(rows, "diverged", 3, task=LM_TASK)
    assert s["best_epoch"] == 2 and s["best_test_bpb"] == pytest.approx(1.2 / LN2)


def test_an_image_summary_is_as_it_was():
    method, task, accs, seconds, peaks = IMAGE_RUNS["img-bp-s0"]
    rows = epoch_rows([1 - a for a in accs], accs, seconds, peaks)
    plain = summaries.compute(rows, "complete", 3)
    assert summaries.compute(rows, "complete", 3, task=IMAGE_TASK) == plain
    assert "task" not in plain and "best_test_bpb" not in plain and plain["best_epoch"] == 3
    assert summaries.compute([], "running", 3, task=LM_TASK) == {
        "status": "running", "epochs_done": 0, "epochs": 3, "task": "language model"}


def test_summary_md_says_bits_per_byte(lm_root):
    config = json.loads((lm_root / "bp-s0" / "config.json").read_text())
    summary = json.loads((lm_root / "bp-s0" / "summary.json").read_text())
    text = run_tables.markdown(config, summary)
    assert ("Best test loss 2.164 bits per byte (1.5000 nats per byte; next-token accuracy 40.00%) (epoch 2); "
            "final test loss 2.308 bits per byte, final train loss 2.453 bits per byte") in text
    assert "100 sequences/s (6400 tokens/s)" in text and "Best test error" not in text


def test_the_runs_table_has_the_task_and_the_lm_figures(mixed_root):
    table = results.runs_frame(results.load_runs([mixed_root]).runs).set_index("run")
    assert table.loc["bp-s1", "task"] == "language model" and table.loc["bp-s1", "context"] == CONTEXT
    assert table.loc["bp-s1", "best_test_bpb"] == pytest.approx(1.45 / LN2)
    assert table.loc["bp-s1", "best_test_loss"] == 1.45
    assert table.loc["bp-s1", "final_test_bpb"] == pytest.approx(1.45 / LN2)
    assert table.loc["bp-s1", "tokens_per_s"] == pytest.approx(1000 / 11 * CONTEXT)
    for image in IMAGE_RUNS:  # no "task" in config.json, or "classification": both are classifications
        assert table.loc[image, "task"] == "classification" and pd.isna(table.loc[image, "best_test_bpb"])
    epochs = results.epochs_frame(results.load_runs([mixed_root]).runs)
    fr = epochs[epochs["run"] == "fr-s1"].set_index("epoch")
    assert fr.loc[2, "test_bpb"] == pytest.approx(1.46 / LN2) and fr.loc[2, "train_bpb"] == pytest.approx(1.56 / LN2)


# --- the verdict ----------------------------------------------------------------------------------

def f3(value: float) -> str:
    return f"{value:.3f}"


def mean_std3(values: list[float]) -> str:
    return f"{f3(statistics.mean(values))} ± {f3(statistics.stdev(values))}" if len(values) > 1 else f3(values[0])


def time_cell(names: tuple[str, ...], target: float) -> str:
    times = [t for t in (first_time(n, target) for n in names) if t is not None]
    if not times:
        return "not reached"
    text = f"{statistics.mean(times):.2f}"
    return text if len(times) == len(names) else f"{text} ({len(times)} of {len(names)} seeds)"


def expected_quality(names: tuple[str, ...], target: float) -> dict:
    mean = statistics.mean(bpb(n) for n in names)
    delta = mean - BP_BPB
    return {"best test bpb": mean_std3([bpb(n) for n in names]),
            "Δ bpb vs bp": "0.000" if f3(abs(delta)) == "0.000" else f"{delta:+.3f}",
            "target bpb": f3(target), "time to target (s)": time_cell(names, target)}


QUALITY = ["best test bpb", "Δ bpb vs bp", "target bpb", "time to target (s)"]


def test_the_lm_verdict_rows_with_the_default_target(lm_data):
    numbers = verdict.table(lm_data)
    shown = verdict.shown(numbers)
    assert list(shown["method"]) == ["bp", "fr", "ddg"]
    assert "best test error %" not in shown.columns and "target acc %" not in shown.columns
    assert shown[QUALITY].to_dict("records") == [expected_quality(n, TARGET) for n in (BP, FR, DDG)]
    cells = shown.set_index("method")
    # spelled out once more
    assert cells.loc["bp", "best test bpb"] == "2.128 ± 0.051"  # 2.164 and 2.092
    assert cells.loc["fr", "Δ bpb vs bp"] == "-0.014"  # 1.465 / ln 2 - 1.475 / ln 2
    assert cells.loc["bp", "target bpb"] == "2.149"
    assert cells.loc["bp", "time to target (s)"] == "33.00 (1 of 2 seeds)"
    assert cells.loc["fr", "time to target (s)"] == "21.00"  # 24 and 18 s
    assert cells.loc["ddg", "time to target (s)"] == "not reached"
    assert cells.loc["fr", "× bp (ideal)"] == "1.24 (1.50)"  # 10.5 / 8.5 s per epoch, as for images
    by = numbers.set_index("method")
    assert by.loc["fr", "best_test_bpb_mean"] == pytest.approx(1.465 / LN2)
    assert by.loc["fr", "bpb_vs_reference"] == pytest.approx(-0.01 / LN2)
    assert by.loc["fr", "target_bpb"] == pytest.approx(TARGET)
    assert by.loc["fr", "best_test_acc_mean"] == pytest.approx(100 * (0.41 + 0.42) / 2)  # next-token, best epochs
    assert by.loc["fr", "target_from"] == "1.01 × bp's mean best test bits per byte"
    assert set(by["task"]) == {"language model"} and by["target_acc"].isna().all()


def test_the_lm_verdict_with_a_given_target_loss(lm_data):
    shown = verdict.shown(verdict.table(lm_data, target_loss=2.5))
    assert shown[QUALITY].to_dict("records") == [expected_quality(n, 2.5) for n in (BP, FR, DDG)]
    cells = shown.set_index("method")
    assert cells.loc["bp", "time to target (s)"] == "21.00"  # epoch 2 of both: 20 and 22 s
    assert cells.loc["fr", "time to target (s)"] == "17.00"  # 16 and 18 s
    assert cells.loc["ddg", "time to target (s)"] == "not reached"  # 2.0 nats is 2.885 bpb
    # --target-acc is for classifications: it leaves a language model's target alone
    assert verdict.table(lm_data, target_acc=0.5)["target_bpb"].tolist() == pytest.approx([TARGET] * 3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_target_loss_is_an_error(lm_data, bad):
    with pytest.raises(DbenchError, match=f"--target-loss {bad} is not a test loss in bits per byte"):
        verdict.table(lm_data, target_loss=bad)


def test_the_lm_caption_defines_every_column(lm_data):
    numbers = verdict.table(lm_data)
    caption = verdict.caption(numbers, None)
    for column in verdict.shown(numbers).columns:
        assert column in caption, column
    assert "1.01 × bp's mean best test bits per byte" in caption
    assert "the test loss given (--target-loss 2.5)" in verdict.caption(verdict.table(lm_data, target_loss=2.5),
                                                                      target_loss=2.5)


def test_an_lm_comparison_without_a_reference(lm_root):
    data = ReportData.of(results.select(results.load_runs([lm_root]).runs, methods=["fr"]))
    numbers = verdict.table(data)
    cells = verdict.shown(numbers).iloc[0]
    assert cells["best test bpb"] == "2.114 ± 0.010" and cells["Δ bpb vs the reference"] == "–"
    assert cells["target bpb"] == "–" and cells["time to target (s)"] == "–"
    assert verdict.notes(numbers, None) == [f"{LM_MODEL} · {LM_DATA} · N=2 devices has no run of a reference method "
                                            "(model-parallel bp): its Δ bpb and time to target are – (give "
                                            "--target-loss for a time)."]
    given = verdict.shown(verdict.table(data, target_loss=2.2)).iloc[0]
    assert given["time to target (s)"] == "21.00"  # fr-s0 at 24 s (1.47 nats = 2.121 bpb), fr-s1 at 18 s


# --- a report of both kinds -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_report(mixed_root, tmp_path_factory):
    return build_report([mixed_root], tmp_path_factory.mktemp("report"))


def test_a_mixed_report_shows_each_comparison_with_its_own_metric(mixed_report):
    out = mixed_report.out
    image = (out / "verdict" / "verdict.md").read_text()
    lm = (out / "verdict" / "verdict-lm.md").read_text()
    assert "best test error %" in image and "| mlp | synthetic |" in image and LM_MODEL not in image.split("\n\n")[1]
    assert "best test bpb" in lm and f"| {LM_MODEL} | {LM_DATA} |" in lm and "| mlp |" not in lm
    assert "best test error" not in lm.split("\n\n")[1]  # the table itself: no error column
    csv = pd.read_csv(out / "verdict" / "verdict-lm.csv").set_index("method")
    assert csv.loc["fr", "best_test_bpb_mean"] == pytest.approx(1.465 / LN2)
    assert "best_test_error_mean" not in csv.columns
    image_csv = pd.read_csv(out / "verdict" / "verdict.csv")
    assert "best_test_bpb_mean" not in image_csv.columns and "task" not in image_csv.columns
    # the image comparison's numbers: bp best 0.9 (target 0.891), fr best 0.88
    image_rows = {line.split("|")[4].strip(): line for line in image.splitlines() if line.startswith("| mlp")}
    assert "| 10.00 |" in image_rows["bp"] and "| 12.00 | +2.00 | 89.10 |" in image_rows["fr"]

    generalization = (out / "generalization" / "generalization.md").read_text()
    generalization_lm = (out / "generalization" / "generalization-lm.md").read_text()
    assert "Best test error (%)" in generalization and LM_MODEL not in generalization
    assert "Best test loss (bits per byte)" in generalization_lm and "| mlp |" not in generalization_lm
    assert f"| {LM_MODEL} | {LM_DATA} | 2 | 2.128 ± 0.051 | **2.114 ± 0.010** | 2.885 |" in generalization_lm

    index = (out / "index.md").read_text()
    assert "### Classification runs" in index and "### Language-model runs" in index
    lm_runs = index.split("### Language-model runs")[1].split("### Environment")[0]
    assert "best test bpb" in lm_runs and "next-token acc %" in lm_runs and "best test error %" not in lm_runs
    assert "| 2.164 | 40.00 |" in lm_runs  # bp-s0: epoch 2's loss and next-token accuracy
    image_runs = index.split("### Classification runs")[1].split("### Language-model runs")[0]
    assert "best test error %" in image_runs and "bpb" not in image_runs
    assert "<h3>Language-model runs</h3>" in (out / "index.html").read_text()


def test_the_lm_figures_say_bits_per_byte(mixed_report):
    items = {i.title: i for s in mixed_report.sections for i in s.items}
    pareto = items[f"Verdict: {LM_MODEL}, {LM_DATA}, N=2 devices"]
    assert "time to 2.149 bits per byte test loss" in pareto.caption
    assert "y: its best test loss in bits per byte" in pareto.caption
    assert "Hollow, right of the dotted line: never reached the target (ddg)." in pareto.caption
    assert "time to 89.10% test accuracy" in items["Verdict: mlp, synthetic, N=2 devices"].caption
    convergence = items[f"Convergence: {LM_MODEL}, {LM_DATA}, K=2"]
    assert "bits per byte" in convergence.caption
    assert "bits per byte" not in items["Convergence: mlp, synthetic, K=2"].caption
    for item in (pareto, convergence):
        assert (mixed_report.out / item.png).stat().st_size > 0


def test_compare_prints_each_comparison_with_its_metric(mixed_root, monkeypatch, capsys):
    code, out, err = run_cli(["compare", str(mixed_root)], monkeypatch, capsys)
    assert code == 0, err
    assert "target: 2.149 bits per byte test loss (1.01 × bp's mean best test bits per byte)" in out
    assert "target: 89.10% test accuracy (0.99 × bp's mean best test accuracy)" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{LM_MODEL} · {LM_DATA} · N=2 devices"))
    head = lines[start + 2]
    assert "bpb" in head and "Δ bpb vs bp" in head and "error %" not in head
    fr = next(line for line in lines[start:] if line.startswith("fr "))
    assert fr.split()[-5:] == ["2.114", "±", "0.010", "-0.014", "21.00"]  # bpb, Δ bpb vs bp, to target (s)
    image = next(i for i, line in enumerate(lines) if line.startswith("mlp · synthetic · N=2 devices"))
    assert "error %" in lines[image + 2] and "bpb" not in lines[image + 2]


def test_compare_takes_the_target_loss(lm_root, monkeypatch, capsys):
    code, out, err = run_cli(["compare", str(lm_root), "--target-loss", "2.5"], monkeypatch, capsys)
    assert code == 0, err
    assert "target: 2.500 bits per byte test loss (--target-loss 2.5)" in out
    fr = next(line for line in out.splitlines() if line.startswith("fr "))
    assert fr.endswith("17.00")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
@pytest.mark.parametrize("command", ["compare", "report"])
def test_a_bad_target_loss_exits_2_with_one_line(lm_root, tmp_path, monkeypatch, capsys, value, command):
    extra = ["--out", str(tmp_path / "out")] if command == "report" else []
    code, out, err = run_cli([command, str(lm_root), *extra, "--target-loss", value], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and "--target-loss" in err and value in err
    assert not (tmp_path / "out").exists()


def test_report_takes_the_target_loss(lm_root, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["report", str(lm_root), "--out", str(tmp_path / "out"), "--target-loss", "2.5"],
                             monkeypatch, capsys)
    assert code == 0, err
    table = (tmp_path / "out" / "verdict" / "verdict-lm.md").read_text()
    assert "target bpb: the test loss given (--target-loss 2.5)." in table
    assert not (tmp_path / "out" / "verdict" / "verdict.md").exists()  # no image comparison


# --- dbench check ---------------------------------------------------------------------------------

SUITE = f"""
[suite.lm]
epochs = 3
[[suite.lm.grid]]
methods = ["bp", "fr"]
models = ["{LM_MODEL}"]
datasets = ["{LM_DATA}"]
gpus = [2]
seeds = [0]
"""


@pytest.fixture
def lm_suite(tmp_path) -> Path:
    """Suite lm's two runs written by hand under tmp_path/results, and their golden figures recorded."""
    (tmp_path / "bench.toml").write_text(SUITE)
    suite = suites.load(tmp_path / "bench.toml", "lm")
    for planned, name in zip(suite.runs, ("bp-s0", "fr-s0")):
        write_lm(planned.path(tmp_path / "results"), name)
    checker.update(suite, tmp_path / "results", tmp_path / "golden")
    return tmp_path


def set_bpb(base: Path, run: str, value: float) -> None:
    path = base / "results" / "lm" / run / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "best_test_bpb": value}))


def test_the_golden_file_of_a_language_model(lm_suite):
    golden = json.loads((lm_suite / "golden" / "lm" / "cpu.json").read_text())
    assert LANGUAGE_MODEL.criterion.tolerance == 0.05
    assert golden["tolerance"] == {"accuracy": 0.03, "memory": checker.MEMORY_TOLERANCE, "bits_per_byte": 0.05}
    bp = golden["runs"][f"bp-{LM_MODEL}-{LM_DATA}-k2-s0"]
    assert bp == {"task": "language model", "best_test_bpb": pytest.approx(1.5 / LN2), "memory_kind": "accounted",
                  "peak_bytes": [100 * MIB, 60 * MIB]}


def test_check_passes_within_the_bpb_tolerance(lm_suite, monkeypatch, capsys):
    run = f"fr-{LM_MODEL}-{LM_DATA}-k2-s0"
    set_bpb(lm_suite, run, 1.47 / LN2 + 0.04)  # 0.04 bpb worse: within 0.05
    code, out, err = run_cli(["check", "lm", "--golden", "golden"], monkeypatch, capsys, cwd=lm_suite)
    assert code == 0, out + err
    assert "all 6 figures within tolerance" in out and "best test bits per byte" in out


def test_check_flags_a_bpb_regression(lm_suite, monkeypatch, capsys):
    run = f"fr-{LM_MODEL}-{LM_DATA}-k2-s0"
    set_bpb(lm_suite, run, 1.47 / LN2 + 0.06)  # 0.06 bpb worse: past 0.05
    set_bpb(lm_suite, f"bp-{LM_MODEL}-{LM_DATA}-k2-s0", 1.5 / LN2 - 0.5)  # better is never a regression
    code, out, err = run_cli(["check", "lm", "--golden", "golden"], monkeypatch, capsys, cwd=lm_suite)
    assert code == 1 and "1 of 6 figures regressed" in err
    regressed = [line for line in out.splitlines() if "REGRESSED" in line]
    assert len(regressed) == 1 and run in regressed[0] and "best test bits per byte" in regressed[0]
    cells = [c.strip() for c in regressed[0].split("|")]
    assert cells[3:6] == [f"{1.47 / LN2:.4g}", f"{1.47 / LN2 + 0.06:.4g}", f"{1.47 / LN2 + 0.05:.4g}"]


def test_check_says_when_a_run_changed_its_task(lm_suite):
    golden = lm_suite / "golden" / "lm" / "cpu.json"
    data = json.loads(golden.read_text())
    name = f"bp-{LM_MODEL}-{LM_DATA}-k2-s0"
    data["runs"][name] = {"best_test_acc": 0.5, "memory_kind": "accounted", "peak_bytes": [100 * MIB, 60 * MIB]}
    golden.write_text(json.dumps(data))
    findings, _ = checker.check(suites.load(lm_suite / "bench.toml", "lm"), lm_suite / "results",
                                lm_suite / "golden")
    bad = [f for f in findings if not f.ok]
    assert [(f.run, f.metric) for f in bad] == [(name, "task")]
    assert "golden has a classification run, the run is a language model" in bad[0].note


def test_the_repository_golden_files_read():
    root = Path(__file__).resolve().parents[1] / "results" / "golden"
    for path in root.glob("*/*.json"):
        golden = checker.read_golden(path, path.parent.name)
        kinds = {checker.task_of(run).kind for run in golden["runs"].values()}
        # a bits-per-byte tolerance exactly where the file holds a language model (smoke's gpt-nano runs)
        assert ("bits_per_byte" in golden["tolerance"]) == ("language model" in kinds)
        for run in golden["runs"].values():
            figure = "best_test_bpb" if checker.task_of(run).kind == "language model" else "best_test_acc"
            assert figure in run
