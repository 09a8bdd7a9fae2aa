"""Bad bench.toml and damaged run directories: `dbench suite` (and --dry-run) says what is wrong in one line,
exit 2, before any run trains, and writes nothing."""
from __future__ import annotations

import pytest

from conftest import run_cli
from dbench import suites
from dbench.errors import DbenchError

GRID = """
[[suite.bad.grid]]
methods = {methods}
models = {models}
datasets = {datasets}
gpus = {gpus}
seeds = [0]
"""


def bench(methods='["bp"]', models='["mlp"]', datasets='["synthetic"]', gpus="[1]", shared="", extra="") -> str:
    """A suite 'bad' of one-epoch runs: its first run (bp on mlp, K=1) is good and would train first."""
    grid = GRID.format(methods=methods, models=models, datasets=datasets, gpus=gpus)
    return f"[suite.bad]\nepochs = 1\nbatch_size = 256\n{shared}\n{grid}{extra}"


# --- every run is planned before the first one trains --------------------------------------------

PLANNING = [
    (bench(methods='["bp", "nope"]'), "suite.bad.grid[0], run nope-mlp-synthetic-k1-s0: unknown method 'nope'"),
    (bench(models='["mlp", "resnet7"]'), "suite.bad.grid[0], run bp-resnet7-synthetic-k1-s0: unknown model 'resnet7'"),
    (bench(datasets='["synthetic", "mnist"]'),
     "suite.bad.grid[0], run bp-mlp-mnist-k1-s0: unknown dataset 'mnist'"),
    (bench(gpus="[1, 4]"),
     "suite.bad.grid[0], run bp-mlp-synthetic-k4-s0: cannot cut mlp (3 blocks) into 4 modules: K must be at most 3"),
    # the method's own check_run: gpipe cannot split a batch of 256 into 512 micro-batches
    (bench(extra=GRID.format(methods='["gpipe"]', models='["mlp"]', datasets='["synthetic"]', gpus="[2]")
           + 'method_options = { microbatches = "512" }\n'),
     "suite.bad.grid[1], run gpipe-microbatches512-mlp-synthetic-k2-s0: bad microbatches 512"),
    (bench(extra=GRID.format(methods='["bp"]', models='["cnn"]', datasets='["synthetic"]', gpus="[2]")
           + 'split = "1,2"\n'),
     "suite.bad.grid[1], run bp-cnn-synthetic-k2-s0: bad --split 1,2: 2 cut points make 3 modules"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("text,message", PLANNING, ids=["method", "model", "dataset", "k", "check_run", "split"])
def test_every_run_is_planned_before_the_first_trains(text, message, dry_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.toml").write_text(text)
    code, out, err = run_cli(["suite", "bad", *(["--dry-run"] if dry_run else [])], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and err.startswith(f"error: bench.toml: {message}") and err.count("\n") == 1
    assert out == ""  # not even the good first run started (or was listed)
    assert not (tmp_path / "results").exists()


def test_a_data_dir_override_is_checked_before_any_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.toml").write_text(bench())
    code, _, err = run_cli(["suite", "bad", "--data-dir", "data"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "run bp-mlp-synthetic-k1-s0: --data-dir/--download do not apply" in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_a_device_override_is_checked_before_any_run(dry_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.toml").write_text(bench())
    args = ["suite", "bad", "--device", "tpu:0", *(["--dry-run"] if dry_run else [])]
    code, out, err = run_cli(args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and err == "error: bench.toml: suite.bad.grid[0], run bp-mlp-synthetic-k1-s0: bad device " \
                                "'tpu:0': expected cpu or cuda:N\n"
    assert out == "" and not (tmp_path / "results").exists()


def test_a_device_override_puts_every_module_of_a_new_run_there(tmp_path, monkeypatch, capsys):
    import json

    (tmp_path / "bench.toml").write_text(bench(gpus="[2]"))
    code, out, err = run_cli(["suite", "bad", "--device", "cpu"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0, err
    config = json.loads((tmp_path / "results/bad/bp-mlp-synthetic-k2-s0/config.json").read_text())
    assert config["run"]["devices"] == ["cpu", "cpu"] and config["devices"] == ["cpu", "cpu"]


# --- every key's type ----------------------------------------------------------------------------

WRONG = "{ bad = [1] }"  # a TOML value that fits no setting: not a number, string, list or table of strings


@pytest.mark.parametrize("level", ["suite", "grid"])
@pytest.mark.parametrize("key", sorted(suites.SETTINGS))
def test_every_setting_is_type_checked_at_both_levels(key, level, tmp_path):
    grid = GRID.format(methods='["bp"]', models='["mlp"]', datasets='["synthetic"]', gpus="[1]")
    text = f"[suite.bad]\n{key} = {WRONG}\n{grid}" if level == "suite" else f"[suite.bad]\n{grid}{key} = {WRONG}\n"
    path = tmp_path / "bench.toml"
    path.write_text(text)
    where = "suite.bad" if level == "suite" else "suite.bad.grid[0]"
    with pytest.raises(DbenchError) as caught:
        suites.load_all(path)
    assert str(caught.value).startswith(f"{path}: {where}: {key} = {{'bad': [1]}} should be ")


@pytest.mark.parametrize("setting,message", [
    ("sigma_every = 'often'", "suite.bad: sigma_every = 'often' should be an integer"),
    ("milestones = '2'", "suite.bad: milestones = '2' should be a list of integers"),
    ("milestones = [1.5]", "suite.bad: milestones = [1.5] should be a list of integers"),
    ("method_options = 'hidden=3'",
     "suite.bad: method_options = 'hidden=3' should be a table of strings (e.g. { name = \"value\" })"),
    ("method_options = { hidden = 3 }", "suite.bad: method_options = {'hidden': 3} should be a table of strings"),
    ("nesterov = 1", "suite.bad: nesterov = 1 should be true or false"),
    ("lr = true", "suite.bad: lr = True should be a number"),
    ("devices = 'cpu'", "suite.bad: devices = 'cpu' should be a list of strings"),
    ("data_dir = ['data']", "suite.bad: data_dir = ['data'] should be a string"),
])
def test_wrong_types_are_one_line_exit_2(setting, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.toml").write_text(bench(shared=setting))
    for args in (["suite", "bad"], ["suite", "bad", "--dry-run"], ["check", "bad"]):
        code, out, err = run_cli(args, monkeypatch, capsys, cwd=tmp_path)
        assert (code, out) == (2, "") and err.startswith(f"error: bench.toml: {message}") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden"])
def test_a_suite_name_must_be_a_plain_folder_name(name, tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text(bench().replace("suite.bad", f'suite."{name}"'))
    with pytest.raises(DbenchError, match=r"bad suite name .* it names the folder of its runs"):
        suites.load_all(path)


# --- damaged run directories ---------------------------------------------------------------------

DAMAGED = "results/bad/fr-mlp-synthetic-k2-s0"


@pytest.mark.parametrize("content,damage", [
    ("{", f"{DAMAGED}/summary.json is not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ("{}", f"{DAMAGED}/summary.json has no status"),
    ("[]", f"{DAMAGED}/summary.json is not a JSON object (it holds a list)"),
    ('{"status": "done"}', f"{DAMAGED}/summary.json has status 'done', not one of complete, diverged, running"),
    (None, f"{DAMAGED}/summary.json is missing"),  # the directory without its summary
], ids=["truncated", "empty-object", "list", "unknown-status", "no-summary"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_a_damaged_run_stops_the_suite_before_anything_trains(content, damage, dry_run, tmp_path, monkeypatch,
                                                              capsys):
    (tmp_path / "bench.toml").write_text(bench(methods='["bp", "fr"]', gpus="[2]"))
    run = tmp_path / DAMAGED
    run.mkdir(parents=True)
    if content is not None:
        (run / "summary.json").write_text(content)
    code, out, err = run_cli(["suite", "bad", *(["--dry-run"] if dry_run else [])], monkeypatch, capsys, cwd=tmp_path)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {damage}") and err.count("\n") == 1
    assert err.endswith(f": run fr-mlp-synthetic-k2-s0 of suite bad can be neither skipped nor resumed; "
                        f"restore the file, or remove {DAMAGED} to run it again\n")
    assert sorted(p.name for p in (tmp_path / "results" / "bad").iterdir()) == [run.name]  # bp did not start
    assert sorted(p.name for p in run.iterdir()) == ([] if content is None else ["summary.json"])  # left as it was


def test_every_damaged_run_is_counted_and_a_file_in_the_way_is_named(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text(bench(methods='["bp", "fr", "ddg"]', gpus="[2]"))
    suite = suites.load(path, "bad")
    root = tmp_path / "results"
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "bp-mlp-synthetic-k2-s0").write_text("not a run")
    for name in ("fr", "ddg"):
        (root / "bad" / f"{name}-mlp-synthetic-k2-s0").mkdir()
    with pytest.raises(DbenchError) as caught:
        suites.check(suite, root)
    message = str(caught.value)
    assert message.startswith(f"{root}/bad/bp-mlp-synthetic-k2-s0 is not a directory: it stands where run "
                              f"bp-mlp-synthetic-k2-s0 of suite bad goes; move it away")
    assert message.endswith("(2 more damaged run(s) in this suite)")
