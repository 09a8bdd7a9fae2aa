"""index.md and index.html: every figure and table of the report, and the runs each came from.

index.html is self-contained (figures embedded as base64 PNG, styles inline),
so the report folder opens from a file manager, a mail attachment or a
notebook without a web server. Both link the PDF, CSV, Markdown and LaTeX files.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from dbench import task as tasks
from dbench.report import tables
from dbench.report.figures import Figure
from dbench.report.section import ReportData, Section

INDEX_MD = "index.md"
INDEX_HTML = "index.html"
RUNS_CSV = "runs.csv"


def run_anchor(name: str) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in name)


def runs_table(data: ReportData, task: tasks.Task | None = None) -> pd.DataFrame:
    """The runs, one row each, as the index lists them: those of ``task`` with its quality columns (None: every
    run, with the default task's). A language model's quality is its best test loss in bits per byte, with the
    next-token accuracy at that epoch."""
    t = data.table
    if task is not None and "task" in t.columns:
        t = t[t["task"] == task.kind]
    frame = pd.DataFrame({
        "run": t["run"], "method": t["label"], "model": t["model"], "data set": t["dataset"], "K": t["k"],
        "seed": t["seed"], "status": t["status"],
        "epochs": [f"{d}/{e}" for d, e in zip(t["epochs_done"], t["epochs"])],
        "engine": t["engine"], "batch": t["batch_size"], "lr": t["lr"], "schedule": t["lr_schedule"],
        # the blocks of each module: for a decoupled method the cut is part of the algorithm
        "cut": t["partition"],
    })
    for m in (task or tasks.default()).runs_columns:
        frame[m.name] = (t[m.column].astype(float) * m.scale).map(lambda v, d=m.digits: tables.num(v, d))
    frame["git"] = [_git(r, d) for r, d in zip(t["git_revision"], t["git_dirty"])]
    return frame


def runs_tables(data: ReportData) -> list[tuple[str | None, pd.DataFrame]]:
    """The index's runs tables: one (without a title) where every run is of one task, else one per task with
    its title, so that no column is half empty."""
    present = [task for task, _ in tasks.split(data.table)] or [tasks.default()]
    if len(present) == 1:
        return [(None, runs_table(data, present[0]))]
    return [(t.runs_title, runs_table(data, t)) for t in present]


def _git(revision, dirty) -> str:
    if not isinstance(revision, str):
        return tables.DASH
    return revision[:10] + (" (dirty)" if dirty else "")


def environment_table(data: ReportData) -> pd.DataFrame:
    """What each run's environment.json says about the machine and software (keys vary between versions)."""
    rows = []
    for run in data.runs:
        env = run.environment
        devices = env.get("devices") or []
        names = sorted({f"{d.get('device', '?')}: {d.get('name', '?')}" for d in devices if isinstance(d, dict)})
        rows.append({"run": run.name, "host": env.get("host", tables.DASH), "time (UTC)": env.get("time_utc", tables.DASH),
                     "python": env.get("python", tables.DASH), "torch": env.get("torch", tables.DASH),
                     "CUDA": env.get("cuda_runtime", tables.DASH) if env.get("cuda_available") else "no",
                     "CPUs": env.get("cpu_count", tables.DASH), "devices": "; ".join(names) or tables.DASH})
    return pd.DataFrame(rows)


def write(out: Path, title: str, sources: str, sections: list[Section], data: ReportData,
          warnings: list[str]) -> tuple[Path, Path]:
    data.table.to_csv(out / RUNS_CSV, index=False)
    md = out / INDEX_MD
    md.write_text(_markdown(title, sources, sections, data, warnings))
    page = out / INDEX_HTML
    page.write_text(_html(out, title, sources, sections, data, warnings))
    return md, page


# --- Markdown -------------------------------------------------------------------------------------

def _md_runs(names: list[str]) -> str:
    return "Runs: " + ", ".join(f"[{n}](#{run_anchor(n)})" for n in names)


def _markdown(title, sources, sections, data, warnings) -> str:
    lines = [f"# {title}", "", sources, ""]
    if warnings:
        lines += ["Left out or worth knowing:", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["Contents: " + " · ".join(f"[{s.title}](#{s.key})" for s in sections) + " · [Runs](#runs)", ""]
    for s in sections:
        lines += [f'<a id="{s.key}"></a>', "", f"## {s.title}", "", s.intro, ""]
        lines += [f"> {n}" + "\n" for n in s.notes]
        for item in s.items:
            lines += [f"### {item.title}", ""]
            if isinstance(item, Figure):
                lines += [f"![{item.title}]({item.png})", "", f"{item.caption} ([PDF]({item.pdf}))", ""]
            else:
                lines += [tables.markdown(item.shown), "", item.caption, "",
                          f"Files: [Markdown]({item.md}) · [CSV]({item.csv}) · [LaTeX]({item.tex})", ""]
            lines += [_md_runs(item.runs), ""]
    lines += ['<a id="runs"></a>', "", "## Runs", "", f"All columns: [{RUNS_CSV}]({RUNS_CSV}).", ""]
    for title, shown in runs_tables(data):
        shown["run"] = [f'<a id="{run_anchor(n)}"></a>{n}' for n in shown["run"]]
        lines += ([f"### {title}", ""] if title else []) + [tables.markdown(shown), ""]
    lines += ["### Environment", "", tables.markdown(environment_table(data)), ""]
    return "\n".join(lines)


# --- HTML -----------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
img { max-width: 100%; border: 1px solid #eee; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 82%; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.caption, .runs, .files { color: #555; font-size: 90%; } .note { background: #fff8e0; padding: .5em 1em; }
.warn { background: #fdecea; padding: .5em 1em; } pre { background: #f7f7f7; padding: .5em; overflow-x: auto; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _html_cell(value) -> str:
    text = str(value)
    if text.startswith("**") and text.endswith("**") and len(text) > 4:  # Markdown bold from the tables
        return f"<b>{_e(text[2:-2])}</b>"
    return _e(text)


def _html_table(frame: pd.DataFrame) -> str:
    # pandas writes the table; the cells are escaped here rather than by to_html(escape=True) because a cell
    # the Markdown tables set in bold (the best of a row) must become <b>, not literal asterisks
    cells = frame.astype(str).map(_html_cell).rename(columns=_e)
    table = cells.to_html(index=False, escape=False, border=0)
    # a wide table (the verdict's) scrolls inside its own box rather than widening the whole page
    return f'<div class="scroll">{table}</div>'


def _html_runs(names: list[str]) -> str:
    return '<p class="runs">Runs: ' + ", ".join(f'<a href="#{run_anchor(n)}">{_e(n)}</a>' for n in names) + "</p>"


def _html(out, title, sources, sections, data, warnings) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
             f"</head><body><h1>{_e(title)}</h1><p>{_e(sources)}</p>"]
    if warnings:
        parts.append('<div class="warn"><p>Left out or worth knowing:</p><ul>'
                     + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>")
    parts.append("<p>Contents: " + " · ".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
                 + ' · <a href="#runs">Runs</a></p>')
    for s in sections:
        parts.append(f'<h2 id="{s.key}">{_e(s.title)}</h2><p>{_e(s.intro)}</p>')
        parts += [f'<p class="note">{_e(n)}</p>' for n in s.notes]
        for item in s.items:
            parts.append(f"<h3>{_e(item.title)}</h3>")
            if isinstance(item, Figure):
                encoded = base64.b64encode((out / item.png).read_bytes()).decode()
                parts.append(f'<img alt="{_e(item.title)}" src="data:image/png;base64,{encoded}">'
                             f'<p class="caption">{_e(item.caption)} <a href="{_e(item.pdf)}">PDF</a></p>')
            else:
                parts.append(_html_table(item.shown) + f'<p class="caption">{_e(item.caption)}</p>'
                             f'<p class="files">Files: <a href="{_e(item.md)}">Markdown</a> · '
                             f'<a href="{_e(item.csv)}">CSV</a> · <a href="{_e(item.tex)}">LaTeX</a></p>')
            parts.append(_html_runs(item.runs))
    parts.append(f'<h2 id="runs">Runs</h2><p>All columns: <a href="{RUNS_CSV}">{RUNS_CSV}</a>.</p>')
    for title, shown in runs_tables(data):
        parts.append((f"<h3>{_e(title)}</h3>" if title else "") + _html_table(shown))
    parts.append("<h3>Environment</h3>" + _html_table(environment_table(data)))
    for run in data.runs:  # every setting and every environment key, as the run recorded them
        parts.append(f'<details id="{run_anchor(run.name)}"><summary>{_e(run.name)}: {_e(run.path)}</summary>'
                     f"<p>config.json</p><pre>{_e(json.dumps(run.config, indent=2, sort_keys=True))}</pre>"
                     f"<p>environment.json</p><pre>{_e(json.dumps(run.environment, indent=2, sort_keys=True))}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
