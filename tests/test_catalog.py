"""The stored catalog (methods/catalog.json, dbench/catalog.json): what `dbench list` and the CLI's name checks read without torch."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dbench import catalog
from dbench.errors import DbenchError
from dbench.method import Stage
from dbench.registry import METHODS


def test_the_stored_catalog_is_what_the_registries_describe():
    assert catalog.stored() == catalog.build(), "the stored catalog is stale: run `python -m dbench.catalog`"


def _cli_in_a_fresh_process(*args: str) -> tuple[int, str, list[str]]:
    """Exit code, stderr, and which heavy modules the command imported."""
    code = (
        "import sys\n"
        "from dbench.cli import entry\n"
        f"sys.argv = ['dbench', *{list(args)!r}]\n"
        "code = 0\n"
        "try:\n"
        "    entry()\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "print([m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules])\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.returncode, done.stderr, eval(done.stdout.strip().splitlines()[-1])


def test_list_imports_no_torch():
    code, err, heavy = _cli_in_a_fresh_process("list")
    assert code == 0 and heavy == [], err


@pytest.mark.parametrize("args, message", [
    (["run", "--method", "nope"], "unknown method 'nope'; known methods: 1f1b, 2bw, bdfa, bp,"),
    (["run", "--model", "nope"], "unknown model 'nope'; known models: cnn,"),
    (["run", "--dataset", "nope"], "unknown dataset 'nope'; known datasets: cifar10,"),
    (["report", "no/such/folder"], "no/such/folder does not exist: give run directories"),
    (["compare", "README.md"], "README.md is not a directory: give run directories"),
])
def test_bad_names_and_paths_fail_in_one_line_before_the_heavy_imports(args, message):
    code, err, heavy = _cli_in_a_fresh_process(*args)
    assert code == 2 and heavy == [], err
    assert err.strip().splitlines() == [f"error: {message}" + err.strip().split(message, 1)[1]]


def test_an_installed_plugin_is_described_from_the_live_registries(monkeypatch):
    class Plugin(Stage):
        summary = "a plug-in method"

    monkeypatch.setattr(catalog, "plugins", lambda: ["plugin"])
    with METHODS.temporarily("plugin", Plugin):
        described = catalog.current()
        assert described["methods"]["plugin"]["summary"] == "a plug-in method"
        assert [o["name"] for o in described["methods"]["plugin"]["options"]] == [
            f.name for f in dataclasses.fields(Plugin.Options)]
        catalog.check_names("plugin", "resnet20", "synthetic")
    with pytest.raises(DbenchError, match="unknown method 'plugin'"):
        catalog.check_names("plugin", "resnet20", "synthetic")
