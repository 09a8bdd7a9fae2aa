"""The README's Python example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its Python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


# The README's tables against the code: what a user reads must be what dbench does (issue 32).

def _table_after(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first Markdown table after the line starting with ``heading``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, inside = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            inside = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif inside:
            break
    return rows[1:]  # without the header


def test_the_options_table_names_every_run_option_and_no_other():
    from dbench.cli import run

    table = _table_after("Options of `dbench run`, every one")
    named = {flag for row in table for flag in re.findall(r"`(--[a-z-]+)", row[0])}
    options = {p.opts[0] for p in run.params}
    assert named == options, (sorted(options - named), sorted(named - options))


def test_the_options_table_states_the_defaults_the_code_has():
    from dbench.config import PROBES_PER_EPOCH, RunConfig

    defaults = RunConfig()
    text = " ".join(" ".join(row) for row in _table_after("Options of `dbench run`, every one"))
    assert f"default {defaults.comm_timeout:g} s" in text
    assert f"default: {PROBES_PER_EPOCH} probes an epoch" in text
    assert f"(default {defaults.sigma_batches})" in text
    assert "SGD (default" in text and defaults.optimizer == "sgd"
    assert "`auto` (the default" in text and defaults.split == "auto"


def test_the_suites_table_names_every_suite_of_bench_toml():
    from dbench.suites import load_all

    table = _table_after("### Suites and the regression check")
    named = {name for row in table for name in re.findall(r"`([a-z0-9-]+)`", row[0])}
    assert named == set(load_all(README.parent / "bench.toml")), named


def _catalog_default(value):
    return None if value in (None, "None") else value


def _same_default(table: str, catalog) -> bool:
    if catalog is None:
        return table in ("none", "4K")  # computed where the run starts (4K: four micro-batches per stage)
    if catalog in ("True", "False"):
        return table == catalog.lower()
    try:
        return float(table) == float(catalog)
    except ValueError:
        return table == catalog


def test_the_method_options_table_matches_every_method_option():
    from dbench import catalog

    methods = catalog.current()["methods"]
    rows, current = [], []
    for row in _table_after("The decoupled methods reduce to BP exactly at K=1"):
        current = re.findall(r"`([a-z0-9-]+)`", row[0]) or current  # an empty first cell: the row above's methods
        rows.append((current, row[1].strip("`"), row[2]))
    documented = {(m, option) for names, option, _ in rows for m in names}
    declared = {(m, o["name"]) for m, d in methods.items() for o in d["options"]}
    assert documented == declared, (sorted(declared - documented), sorted(documented - declared))
    for names, option, default in rows:
        for m in names:
            (found,) = [o for o in methods[m]["options"] if o["name"] == option]
            assert _same_default(default, _catalog_default(found["default"])), (m, option, default, found["default"])
