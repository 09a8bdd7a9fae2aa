"""dbench report: run directories from real tiny runs in, figures and tables holding the runs' numbers out."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dbench import results
from dbench import run as runner
from dbench.config import RunConfig
from dbench.errors import DbenchError
from dbench.registry import METHODS as REGISTRY
from dbench.report import build_report, tables

DBENCH = str(Path(sys.executable).parent / "dbench")  # the console script of this environment
METHODS = ("bp", "fr", "ddg")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """bp, fr, ddg with two seeds at K=2 (σ probes on), and one dfa run without σ probes."""
    root = tmp_path_factory.mktemp("results")
    for method in METHODS:
        for seed in SEEDS:
            cfg = RunConfig(method=method, model="mlp", gpus=2, epochs=2, batch_size=256, sigma_every=3, seed=seed,
                            dataset="synthetic-small")
            runner.start(cfg, root / f"{method}-s{seed}", quiet=True)
    cfg = RunConfig(method="dfa", model="mlp", gpus=2, epochs=2, batch_size=256, sigma_every=0,
                    dataset="synthetic-small")
    runner.start(cfg, root / "nested" / "dfa-nosigma", quiet=True)  # found by the recursive search
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    return build_report([runs_root], tmp_path_factory.mktemp("report"))


def summaries(root: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        c = json.loads((path.parent / "config.json").read_text())
        rows.append({"method": c["run"]["method"], "seed": c["run"]["seed"], "best_pct": 100 * s["best_test_error"],
                     "s_per_epoch": s["train_seconds"] / s["epochs_done"], "rate": s["samples_per_s"]})
    return pd.DataFrame(rows)


def test_report_writes_every_section_with_its_files(report):
    out = report.out
    assert len(report.runs) == len(METHODS) * len(SEEDS) + 1
    assert report.warnings == []
    keys = [s.key for s in report.sections]
    assert keys == ["verdict", "convergence", "memory", "generalization", "sigma", "speed"]
    for section in report.sections:
        assert section.items, f"section {section.key} is empty"
        for item in section.items:
            files = [item.png, item.pdf] if hasattr(item, "png") else [item.md, item.csv, item.tex]
            for f in files:
                assert (out / f).stat().st_size > 0, f
            assert item.runs
    page = (out / "index.html").read_text()
    figures = [i for s in report.sections for i in s.items if hasattr(i, "png")]
    assert page.count("data:image/png;base64,") == len(figures)  # self-contained: no image to fetch
    assert "<img" in page and 'src="convergence' not in page
    index = (out / "index.md").read_text()
    for f in figures:
        assert f"]({f.png})" in index
    revision = report.runs[0].git_revision
    if revision:
        assert revision[:10] in index
    assert (out / "runs.csv").exists()
    latex = (out / "generalization" / "generalization.tex").read_text()
    assert r"\toprule" in latex and r"$\pm$" in latex and "±" not in latex


def test_generalization_tables_hold_mean_and_std_over_seeds(report, runs_root):
    expected = summaries(runs_root).groupby("method")["best_pct"].agg(["mean", "std", "count"])
    csv = pd.read_csv(report.out / "generalization" / "generalization.csv").set_index("method")
    for method in METHODS:
        assert csv.loc[method, "seeds"] == len(SEEDS)
        assert csv.loc[method, "best_test_error_mean"] == pytest.approx(expected.loc[method, "mean"], abs=1e-9)
        assert csv.loc[method, "best_test_error_std"] == pytest.approx(expected.loc[method, "std"], abs=1e-9)
    assert pd.isna(csv.loc["dfa", "best_test_error_std"])  # one seed: no spread
    md = (report.out / "generalization" / "generalization.md").read_text()
    for method in METHODS:
        cell = tables.mean_std(expected.loc[method, "mean"], expected.loc[method, "std"], len(SEEDS))
        assert cell in md
    assert tables.num(expected.loc["dfa", "mean"]) in md


def test_speed_table_speedup_is_the_ratio_of_the_runs(report, runs_root):
    runs = summaries(runs_root).groupby("method")[["s_per_epoch", "rate"]].mean()
    csv = pd.read_csv(report.out / "speed" / "speed.csv").set_index("method")
    # local engine at K=2: the modules ran in turn, so no speedup is reported (issue 14), only the seconds
    for method in ("bp", "fr", "ddg", "dfa"):
        assert csv.loc[method, "seconds_per_epoch"] == pytest.approx(runs.loc[method, "s_per_epoch"])
        assert pd.isna(csv.loc[method, "speedup_epoch_time"]) and pd.isna(csv.loc[method, "speedup_samples_per_s"])
        assert not csv.loc[method, "parallel"]
    shown = next(i for i in next(s for s in report.sections if s.key == "speed").items if hasattr(i, "shown")).shown
    assert set(shown["× bp"]) == {"not a parallel measurement"}
    assert csv.loc["fr", "ideal_speedup"] == pytest.approx(1.5)  # 3K/4 at K=2
    assert csv.loc["ddg", "ideal_speedup"] == pytest.approx(2.0)
    assert csv.loc["dfa", "ideal_speedup"] == pytest.approx(1.5)  # 3K/(K+2)
    assert set(csv["engine"]) == {"local"}
    notes = next(s for s in report.sections if s.key == "speed").notes
    assert any("not a parallel measurement" in n for n in notes)


def ideal(method: str, k: int) -> float | None:
    """The ideal is each method's own fact (Stage.ideal_speedup), which runs record and the report reads."""
    return REGISTRY.get(method).ideal_speedup(k)


def test_ideal_speedups_follow_algorithms_md():
    assert [ideal("fr", k) for k in (2, 4)] == [1.5, 3.0]
    assert [ideal("bdfa", k) for k in (2, 4)] == [1.5, 2.0]
    assert ideal("ddg", 4) == 4.0 and ideal("bp", 4) == 1.0
    assert ideal("dni", 4) is None and ideal("cdni", 2) is None
    assert ideal("fr", 1) == 1.0  # one module: every method is BP


def test_sigma_and_memory_show_only_runs_that_have_them(report):
    sigma = next(s for s in report.sections if s.key == "sigma")
    assert any("dfa-nosigma" in n for n in sigma.notes)
    table = pd.read_csv(report.out / "sigma" / "sigma.csv")
    assert set(table["method"]) == set(METHODS)
    assert set(table["part"]) == {"module 0", "module 1", "network"}
    memory = pd.read_csv(report.out / "memory" / "memory.csv").set_index(["method", "module"])
    # the algorithms' memory order below the top module: DDG > FR > BP (FR adds stored inputs)
    assert memory.loc[("ddg", 0), "peak_mib"] > memory.loc[("fr", 0), "peak_mib"] > memory.loc[("bp", 0), "peak_mib"]
    assert memory.loc[("fr", 0), "stored_inputs_mib"] > 0 and memory.loc[("bp", 0), "stored_inputs_mib"] == 0


def test_sigma_table_matches_the_run_summaries(report, runs_root):
    table = pd.read_csv(report.out / "sigma" / "sigma.csv").set_index(["method", "part"])
    for method in METHODS:
        per_seed = [json.loads((runs_root / f"{method}-s{s}" / "summary.json").read_text()) for s in SEEDS]
        for k in (0, 1):
            mean = sum(s["modules"][k]["mean_sigma"] for s in per_seed) / len(per_seed)
            assert table.loc[(method, f"module {k}"), "mean_sigma"] == pytest.approx(mean)
            corrected = [s["modules"][k]["sigma_corrected"] for s in per_seed]
            if None not in corrected:
                assert table.loc[(method, f"module {k}"), "sigma_corrected"] == pytest.approx(sum(corrected) / len(corrected))
        assert table.loc[(method, "network"), "mean_sigma"] == pytest.approx(sum(s["mean_sigma"] for s in per_seed) / 2)


def test_filters_select_runs(runs_root, tmp_path):
    loaded = results.load_runs([runs_root])
    assert {r.method for r in results.select(loaded.runs, methods=["bp", "fr"])} == {"bp", "fr"}
    assert results.select(loaded.runs, ks=[3]) == []
    assert len(results.select(loaded.runs, models=["mlp"], datasets=["synthetic-small"], ks=[2])) == len(loaded.runs)
    with pytest.raises(DbenchError, match=r"no run under .* matches --k 3; the 7 usable runs have methods bp, ddg, dfa, fr"):
        build_report([runs_root], tmp_path / "out", ks=[3])
    assert not (tmp_path / "out").exists()  # nothing written


def test_unfinished_and_corrupt_runs_are_skipped_with_warnings(runs_root, tmp_path):
    root = tmp_path / "results"
    for name in ("bp-s0", "fr-s0", "ddg-s0"):
        shutil.copytree(runs_root / name, root / name)
    summary = json.loads((root / "fr-s0" / "summary.json").read_text())
    (root / "fr-s0" / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    config = (root / "ddg-s0" / "config.json").read_text()
    (root / "ddg-s0" / "config.json").write_text(config[: len(config) // 2])
    loaded = results.load_runs([root])
    assert [r.method for r in loaded.runs] == ["bp"]
    assert len(loaded.warnings) == 2
    running = next(w for w in loaded.warnings if "fr-s0" in w)
    corrupt = next(w for w in loaded.warnings if "ddg-s0" in w)
    assert "status is 'running'" in running
    assert "config.json is not valid JSON" in corrupt
    with_unfinished = results.load_runs([root], include_unfinished=True)
    assert sorted(r.method for r in with_unfinished.runs) == ["bp", "fr"]
    assert len(with_unfinished.warnings) == 1


def test_runs_differing_in_more_than_the_seed_are_separate_rows_labelled_by_what_differs(runs_root, tmp_path):
    """Issue 15: runs that differ in more than the seed are different experiments, never averaged."""
    for seed in SEEDS:
        shutil.copytree(runs_root / f"bp-s{seed}", tmp_path / "runs" / f"bp-s{seed}")
    config = json.loads((tmp_path / "runs" / "bp-s1" / "config.json").read_text())
    config["run"]["lr"] = 0.1
    (tmp_path / "runs" / "bp-s1" / "config.json").write_text(json.dumps(config))
    report = build_report([tmp_path / "runs"], tmp_path / "out")
    assert not [w for w in report.warnings if "averaged" in w]
    table = pd.read_csv(tmp_path / "out" / "generalization" / "generalization.csv")
    assert sorted(table["method"]) == ["bp (lr=0.05)", "bp (lr=0.1)"]
    assert set(table["seeds"]) == {1}


def test_engine_and_epochs_filters(runs_root):
    runs = results.load_runs([runs_root]).runs
    assert results.select(runs, engines=["distributed"]) == []
    assert len(results.select(runs, engines=["local"], epochs=[2])) == len(runs)
    assert results.select(runs, epochs=[1]) == []


def test_no_runs_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DbenchError, match=r"no run directories under .*empty"):
        build_report([empty], tmp_path / "out")
    with pytest.raises(DbenchError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    bad = tmp_path / "bad" / "run"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text("{}")
    seen = []
    with pytest.raises(DbenchError, match="all 1 run directories were left out"):
        build_report([tmp_path / "bad"], tmp_path / "out", warn=seen.append)
    assert seen == [f"skipped {bad}: config.json is missing"]


def test_old_run_without_modules_or_probes_is_reported_without_them(runs_root, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs_root / "bp-s0", old)
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "modules"} for r in rows if r["kind"] == "epoch"]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((old / "summary.json").read_text())
    for key in ("modules", "mean_sigma", "sigma_corrected", "samples_per_s"):
        summary.pop(key)
    (old / "summary.json").write_text(json.dumps(summary))
    (old / "environment.json").unlink()
    report = build_report([old], tmp_path / "out")
    by_key = {s.key: s for s in report.sections}
    assert by_key["memory"].items == [] and by_key["memory"].notes
    assert by_key["sigma"].items == [] and by_key["sigma"].notes
    assert by_key["convergence"].items and by_key["generalization"].items
    assert (tmp_path / "out" / "index.html").exists()


def test_runs_without_recorded_facts_ask_the_installed_method(runs_root, tmp_path):
    def copy_without_facts(name: str, **run_settings) -> results.Run:
        shutil.copytree(runs_root / name, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        del config["method_facts"]
        config["run"].update(run_settings)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return results.load_run(tmp_path / name)

    recorded = results.load_run(runs_root / "fr-s0")
    assert recorded.facts == REGISTRY.get("fr").facts(2) and recorded.facts["ideal_speedup"] == 1.5
    assert copy_without_facts("fr-s0").facts == recorded.facts
    # the installed method's facts assume its default options: a run with others gets no ideal
    labelled = copy_without_facts("nested/dfa-nosigma", method_options={"scale": "0.5"})
    assert labelled.label == "dfa[scale=0.5]"
    assert labelled.facts == {**REGISTRY.get("dfa").facts(2), "ideal_speedup": None}
    assert copy_without_facts("bp-s0", method="notinstalled").facts == results.UNKNOWN_FACTS


def test_module_peaks_are_the_summaries_peaks(runs_root):
    loaded = results.load_runs([runs_root])
    peaks = results.module_peaks(loaded.runs).set_index(["run", "module"])
    for run in loaded.runs:
        for m in run.summary["modules"]:
            row = peaks.loc[(run.name, m["module"])]
            assert row["accounted_peak_bytes"] == m["accounted_peak_bytes"]
            for category, value in m["accounted_bytes"].items():
                assert row[results.BYTES_PREFIX + category] == value


def test_frames_are_tidy(runs_root):
    loaded = results.load_runs([runs_root / "fr-s0"])
    epochs = results.epochs_frame(loaded.runs)
    assert list(epochs["epoch"]) == [1, 2]
    assert epochs["wall_seconds"].iloc[-1] == pytest.approx(epochs["train_seconds"].sum())
    modules = results.modules_frame(loaded.runs)
    assert len(modules) == 2 * 2 and "bytes_stored_inputs" in modules
    probes = results.probes_frame(loaded.runs)
    assert set(probes["part"]) == {"module 0", "module 1", "network"}
    assert loaded.runs[0].name == "fr-s0"


def test_cli_end_to_end(runs_root, tmp_path):
    root = tmp_path / "results"
    for name in ("bp-s0", "fr-s0"):
        shutil.copytree(runs_root / name, root / name)
    shutil.copytree(runs_root / "ddg-s0", root / "ddg-broken")
    (root / "ddg-broken" / "summary.json").write_text('{"status": ')
    out = tmp_path / "report"
    done = subprocess.run([DBENCH, "report", str(root), "--out", str(out), "--method", "bp", "--method", "fr"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"written to {out}" in done.stdout
    assert done.stderr.strip() == f"warning: skipped {root / 'ddg-broken'}: summary.json is not valid JSON " \
                                  "(Expecting value at line 1)"
    assert (out / "index.html").exists() and (out / "generalization" / "generalization.csv").exists()
    failed = subprocess.run([DBENCH, "report", str(tmp_path / "nothing-here")], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


def test_an_undefined_corrected_sigma_is_marked_not_left_as_a_gap(runs_root, tmp_path):
    """Probes whose cross terms sum to <= 0 cannot define the corrected σ: the figure says so."""
    from dbench.report import sigma
    from dbench.report.section import ReportData

    data = ReportData.of(results.select(results.load_runs([runs_root]).runs, methods=["bp"]))
    data.probes["cross"] = -1.0  # as if the probe set's noise swamped the gradient at every probe
    section = sigma.build(data, tmp_path)
    figure = next(i for i in section.items if hasattr(i, "png"))
    assert "×: an epoch whose probes could not estimate" in figure.caption
    table = pd.read_csv(tmp_path / "sigma" / "sigma.csv")
    assert table["sigma_corrected"].isna().all() and table["too_noisy"].all()


def test_a_method_variant_is_named_in_the_report_and_the_run_summary(tmp_path):
    """Options that differ from the method's defaults label a run, compared as values (not as typed): in
    summary.md's title and in every table of the report; an option at its default is the method itself."""
    cfg = RunConfig(method="dni", model="mlp", gpus=2, epochs=1, batch_size=512, sigma_every=0,
                    method_options={"normalize": "0"})
    variant = runner.start(cfg, tmp_path / "runs" / "variant", quiet=True)
    assert (variant / "summary.md").read_text().startswith("# dni[normalize=false] · mlp · synthetic · K=2")
    # the same run as `--opt normalize=true` would record it: dni as it comes
    default = tmp_path / "runs" / "default"
    shutil.copytree(variant, default)
    config = json.loads((default / "config.json").read_text())
    config["run"]["method_options"] = {"normalize": "true"}
    config["method_options"]["normalize"] = True
    (default / "config.json").write_text(json.dumps(config))
    loaded = results.load_runs([tmp_path / "runs"])
    labels = {run.name: run.label for run in loaded.runs}
    assert labels == {"variant": "dni[normalize=false]", "default": "dni"}
    frame = results.runs_frame(loaded.runs).set_index("run")
    assert frame.loc["variant", "label"] == "dni[normalize=false]" and frame.loc["default", "label"] == "dni"
    assert results.select(loaded.runs, methods=["dni[normalize=false]"]) == [r for r in loaded.runs if r.name == "variant"]


@pytest.mark.parametrize("count", [3, 10, 12, 20])
def test_every_method_label_of_a_report_gets_its_own_colour(count):
    """Every method and baseline is 12 labels: the colour-blind palette's 10 colours must not repeat."""
    from dbench.report.figures import method_colors

    labels = [f"m{i}" for i in range(count)]
    colors = method_colors(labels, {label: i for i, label in enumerate(labels)})
    assert len(set(colors.values())) == count
