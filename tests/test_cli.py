"""The command line: bad input is one line, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DBENCH = str(Path(sys.executable).parent / "dbench")  # the console script of this environment

from conftest import run_cli

HUGE = "10000000000000000000000"  # 10**22: past torch's 64-bit integers ("ValueError: Overflow" unless checked)
BAD = [
    (["run", "--method", "nope"], "unknown method 'nope'; known methods: "),
    (["run", "--model", "resnet7"], "unknown model 'resnet7'; known models:"),
    (["run", "--dataset", "mnist"], "unknown dataset 'mnist'; known datasets: cifar10, cifar100, synthetic"),
    (["run", "--model", "mlp", "--gpus", "4"], "cannot cut mlp (3 blocks) into 4 modules: K must be at most 3"),
    (["run", "--gpus", "0"], "bad --gpus 0: must be an integer >= 1"),
    (["run", "--lr", "-0.1"], "bad learning rate -0.1: must be a finite number > 0"),
    (["run", "--lr", "abc"], "'abc' is not a valid float"),
    (["run", "--batch-size", "0"], "bad --batch-size 0: must be an integer >= 1"),
    (["run", "--epochs", "0"], "bad --epochs 0: must be an integer >= 1"),
    (["run", "--momentum", "1.5"], "bad momentum 1.5: must be in [0, 1)"),
    (["run", "--weight-decay", "-1"], "bad weight decay -1.0"),
    (["run", "--seed", "-3"], "bad --seed -3"),
    (["run", "--lr-schedule", "linear"], "'linear' is not one of 'step', 'cosine', 'constant'"),
    (["run", "--lr-schedule", "step", "--milestones", "5,2", "--epochs", "6"], "bad milestones 5,2"),
    (["run", "--milestones", "x"], "not a comma-separated list of integers"),
    (["run", "--split", "fast"], "bad --split 'fast'"),
    (["run", "--gpus", "2", "--split", "3,5"], "2 cut points make 3 modules, but --gpus is 2"),
    (["run", "--devices", "tpu:0"], "bad device 'tpu:0': expected cpu or cuda:N"),
    (["run", "--gpus", "2", "--devices", "cpu"], "--devices names 1 devices but --gpus is 2"),
    (["run", "--opt", "width=3"], "option 'width' does not apply to method 'bp'"),
    (["run", "--method", "dfa", "--opt", "scale=-1"], "bad feedback scale -1.0: must be a finite number > 0"),
    (["run", "--method", "dni", "--opt", "hidden=wide"], "bad value 'wide' for option 'hidden' of 'dni': expected int"),
    (["run", "--method", "dni", "--opt", "hidden"], "'hidden' is not KEY=VALUE"),
    (["run", "--dataset", "cifar10"], "--data-dir"),
    (["run", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["run", "--data-dir", "/tmp"], "do not apply to data set 'synthetic'"),
    (["run", "--bogus"], "No such option '--bogus'"),
    (["run", "--engine", "threads"], "'threads' is not one of 'auto', 'local', 'distributed'"),
    (["run", "--engine", "distributed", "--comm-timeout", "0"], "bad --comm-timeout 0.0"),
    (["run", "--sigma-every", "-1"], "bad --sigma-every -1: must be >= 0"),
    (["run", "--sigma-batches", "0"], "bad --sigma-batches 0: must be an integer >= 1"),
    (["run", "--method", "dni", "--opt", "synth_seed=-1"], "bad synth_seed -1: must be >= 0"),
    # Numbers past what torch takes (64-bit integers, finite floats) or past what the run can use: one line too.
    (["run", "--batch-size", HUGE], f"bad --batch-size {HUGE}: a batch holds at most the 10000 training samples "
                                    "of synthetic (1 <= batch size <= 10000)"),
    (["run", "--batch-size", "10001"], "bad --batch-size 10001: a batch holds at most the 10000 training samples"),
    (["run", "--method", "1f1b", "--gpus", "2", "--batch-size", HUGE], f"bad --batch-size {HUGE}"),
    (["run", "--epochs", HUGE], f"bad --epochs {HUGE}: must be an integer >= 1 and at most 9223372036854775807"),
    (["run", "--gpus", HUGE], f"bad --gpus {HUGE}: must be an integer >= 1 and at most 9223372036854775807"),
    (["run", "--method", "ddp", "--gpus", HUGE], f"bad --gpus {HUGE}: must be an integer >= 1 and at most"),
    (["run", "--method", "ddp", "--gpus", "1000000000"],
     "bad --batch-size 128 for 1000000000 replicas (1000000000 replicas of 1 module(s) on 1000000000 devices): every "
     "replica needs a shard of at least one sample"),
    (["run", "--seed", HUGE], f"bad --seed {HUGE}: must be an integer >= 0 and at most 4294967295"),
    (["run", "--seed", "4294967296"], "bad --seed 4294967296: must be an integer >= 0 and at most 4294967295"),
    (["run", "--sigma-every", HUGE], f"bad --sigma-every {HUGE}: must be >= 0 and at most 9223372036854775807"),
    (["run", "--sigma-batches", HUGE], f"bad --sigma-batches {HUGE}: must be an integer >= 1 and at most"),
    (["run", "--sigma-batches", "80"],
     "bad --sigma-batches 80: the σ probe's set is drawn from the 79 batches of the training set"),
    (["run", "--milestones", HUGE, "--lr-schedule", "step"], f"bad milestones {HUGE}"),
    (["run", "--lr", "inf"], "bad learning rate inf: must be a finite number > 0"),
    (["run", "--lr", "nan"], "bad learning rate nan: must be a finite number > 0"),
    (["run", "--lr", "1e400"], "bad learning rate inf: must be a finite number > 0"),
    (["run", "--momentum", "nan"], "bad momentum nan: must be in [0, 1)"),
    (["run", "--weight-decay", "inf"], "bad weight decay inf: must be a finite number >= 0"),
    (["run", "--lr-gamma", "nan"], "bad lr gamma nan: must be in (0, 1)"),  # also with the cosine schedule
    (["run", "--lr-schedule", "step", "--lr-gamma", "inf"], "bad lr gamma inf: must be in (0, 1)"),
    (["run", "--comm-timeout", "inf"], "bad --comm-timeout inf: must be a number of seconds > 0 and at most 1e+09"),
    (["run", "--comm-timeout", "nan"], "bad --comm-timeout nan"),
    (["run", "--method", "dni", "--opt", f"synth_seed={HUGE}"], f"bad synth_seed {HUGE}: must be >= 0 and at most 4294967295"),
    (["run", "--method", "bdfa", "--opt", "feedback_seed=4294967296"], "bad feedback_seed 4294967296: must be >= 0 and at most"),
    (["run", "--method", "dfa", "--opt", "scale=inf"], "bad feedback scale inf: must be a finite number > 0"),
    (["run", "--method", "cdni", "--opt", "synth_lr=nan"], "bad synth_lr nan: must be a finite number > 0"),
    (["run", "--method", "gpipe", "--opt", f"microbatches={HUGE}"],
     f"bad microbatches {HUGE}: a batch of 128 splits into at most 128 micro-batches"),
    (["run", "--method", "2bw", "--model", "mlp", "--gpus", "3", "--opt", "microbatches=2"],
     "bad microbatches 2: 2bw needs at least K = 3 micro-batches per batch (K <= M <= batch size"),
    (["run", "--method", "2bw", "--model", "mlp", "--gpus", "2", "--batch-size", "4"],
     "bad microbatches 8: a batch of 4 splits into at most 4 micro-batches (K <= M <= batch size)"),
    # 10000 samples in batches of 9999: the epoch's last holds 1, which cannot make K = 2 micro-batches
    (["run", "--method", "2bw", "--model", "mlp", "--gpus", "2", "--batch-size", "9999", "--opt", "microbatches=2"],
     "bad --batch-size for 2bw: a batch (or replica shard) of 1 samples splits into 1 micro-batches, fewer than "
     "K = 2"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []  # no run directory, no results/


def test_existing_out_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(["run", "--out", str(tmp_path / "taken")], monkeypatch, capsys)
    assert code == 2 and "already exists" in err


def test_resume_refuses_new_settings(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["run", "--resume", str(tmp_path), "--lr", "0.1"], monkeypatch, capsys)
    assert code == 2 and "drop --lr" in err


def _run_options():
    from dbench.cli import run

    return {p.name: p for p in run.params if p.name not in ("resume", "quiet", "out")}


def test_every_run_setting_is_an_option_and_resume_refuses_each(tmp_path, monkeypatch, capsys):
    """The run options are RunConfig's fields, each once; none can be changed on --resume (each a setting
    the run recorded)."""
    import dataclasses

    from dbench.config import RunConfig

    options = _run_options()
    assert sorted(options) == sorted(f.name for f in dataclasses.fields(RunConfig))
    for name, option in options.items():
        value = [] if option.is_flag else ["cpu" if name == "devices" else "k=v" if name == "method_options" else
                                           option.type.choices[0] if option.type.name == "choice" else "3"]
        code, _, err = run_cli(["run", "--resume", str(tmp_path), option.opts[0], *value], monkeypatch, capsys)
        assert code == 2 and f"drop {option.opts[0]}" in err, (name, err)


def test_every_option_of_every_command_has_help():
    import click

    from dbench.cli import main

    commands = [(name, main.commands[name]) for name in main.commands]
    missing = [f"{name} {p.opts[0]}" for name, command in commands for p in command.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing


def test_version(monkeypatch, capsys):
    from importlib.metadata import version

    code, out, _ = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0 and out.strip() == f"dbench {version('dbench')}"


def test_resume_of_a_non_run_directory(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["run", "--resume", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "not a dbench run directory" in err


def test_list_shows_methods_models_and_datasets(monkeypatch, capsys):
    code, out, _ = run_cli(["list"], monkeypatch, capsys)
    assert code == 0
    assert "bp" in out and "resnet110" in out and "synthetic" in out and "cifar100" in out
    resnet20 = next(line for line in out.splitlines() if line.split()[:1] == ["resnet20"])
    assert resnet20.split()[1:] == ["272,474", "11", "image"]
    nano = next(line for line in out.splitlines() if line.split()[:1] == ["gpt-nano"])
    assert nano.split()[1:] == ["875,264", "6", "text,", "context", "128"]
    assert "synthetic-text" in out


def test_console_script_end_to_end(tmp_path):
    """The installed `dbench` command: a short real run, its files, and a bad flag."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    done = subprocess.run(
        [DBENCH, "run", "--model", "mlp", "--gpus", "2", "--epochs", "1", "--dataset", "synthetic-small", "--quiet",
         "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "running the 2 module(s) on the CPU" in done.stdout
    assert "epoch 1/1" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.json", "environment.json", "metrics.jsonl", "summary.json", "summary.md"
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs_done"] == 1
    config = json.loads((out / "config.json").read_text())
    # the default cut, counted: the MLP's first block (its widest layer) outweighs the other two
    assert config["partition"] == [[0, 1], [1, 3]] and config["run"]["split"] == "auto"
    assert config["devices"] == ["cpu", "cpu"]
    env_record = json.loads((out / "environment.json").read_text())
    assert env_record["torch"] and "revision" in env_record["git"]

    bad = subprocess.run([DBENCH, "run", "--method", "nope"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["suite", "--help"], ["run", "--lr", "-1"],
                                  ["run", "--epochs", "0", "--model", "mlp"]])
def test_help_and_bad_numbers_do_not_load_torch(args):
    """Start-up: help and settings errors answer at once (loading torch alone takes seconds on a busy machine)."""
    code = ("import sys\nfrom dbench import cli\nsys.argv = ['dbench', *sys.argv[1:]]\ntry:\n    cli.entry()\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert "torch was imported" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_fork_server_started_early_is_the_one_the_launcher_uses(monkeypatch):
    """`dbench run --engine distributed` starts the fork server before it imports torch: with the module the
    launcher's workers run (a server that runs is never restarted, so another module would go unimported)."""
    from dbench import cli, run
    from dbench.engine import forkserver

    started = []
    monkeypatch.setattr(forkserver, "start", started.append)
    cli._start_fork_server("distributed")
    cli._start_fork_server("local")
    cli._start_fork_server("auto")
    assert started == [run.train_rank.__module__]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a torchrun worker starts no processes
    monkeypatch.setenv("RANK", "0")
    cli._start_fork_server("distributed")
    assert len(started) == 1
