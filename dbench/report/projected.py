"""The report's projection section: runs recorded with --trace, replayed on their N devices over a link profile.

Every row, title and caption says PROJECTED: these seconds were not measured (dbench.projection states the
model and what it leaves out); the measured sections never mix them in.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dbench import projection
from dbench.report import tables
from dbench.report.section import ReportData, Section


def build(data: ReportData, out: Path, link: projection.Link, device_memory_gib: float | None = None) -> Section:
    traced = [run for run in data.runs if (run.path / "trace.json").is_file()]
    section = Section("projection", f"Projection (PROJECTED, not measured; link {link.name})",
                      f"Runs recorded with `--trace` on the local engine, replayed on a virtual clock per device "
                      f"(docs/ALGORITHMS.md, \"Projection\"). Link: {link.describe()}. Not a measurement: it leaves "
                      f"out contention between devices, transport overheads beyond the latency and the engine's "
                      f"per-step host work; benchmarks/RESULTS.md states its measured error.")
    if not traced:
        section.notes.append("No run of this report holds a trace: record one with `dbench run --engine local --trace`.")
        return section
    projected = [projection.load(run.path, link) for run in traced]
    labels = {run.path: run.label for run in traced}
    rows = []
    for p in projected:
        same = [q for q in projected if q.group == p.group and q.exact and projection.fits(q, device_memory_gib)]
        fastest = min(same, key=lambda q: q.projection.seconds) if same else None
        rows.append({"model": p.group[0], "data set": p.group[1], "N": p.group[2], "batch": p.group[3],
                     "method": labels[p.path], "projected s/epoch": p.projection.seconds,
                     "× fastest exact (projected)": (fastest.projection.seconds / p.projection.seconds
                                                     if fastest else None),
                     "fastest exact (projected)": labels[fastest.path] if fastest else None,
                     "peak MiB, largest device": max(p.peak_bytes) / 2**20 if p.peak_bytes else None,
                     "fits": None if device_memory_gib is None else projection.fits(p, device_memory_gib),
                     "link": link.name})
    numbers = pd.DataFrame(rows).sort_values(["model", "data set", "N", "batch", "projected s/epoch"])
    shown = numbers.assign(**{
        "projected s/epoch": numbers["projected s/epoch"].map(lambda v: tables.num(v, 3)),
        "× fastest exact (projected)": numbers["× fastest exact (projected)"].map(tables.num),
        "peak MiB, largest device": numbers["peak MiB, largest device"].map(tables.num),
        "fits": numbers["fits"].map(lambda v: tables.DASH if v is None else ("yes" if v else "NO")),
        "fastest exact (projected)": numbers["fastest exact (projected)"].fillna(tables.DASH),
    })
    memory = (f"fits: the largest device's peak within {device_memory_gib:g} GiB" if device_memory_gib is not None
              else "no --device-memory given")
    section.items.append(tables.write(
        out, "projection/projected", title=f"PROJECTED seconds per epoch on N devices (link {link.name})",
        shown=shown, numbers=numbers, runs=[run.name for run in traced],
        caption=f"PROJECTED, not measured: each run's trace replayed on {link.describe()}. × fastest exact: the "
                f"fastest exact-gradient layout's projected seconds over the row's, among the runs of the same "
                f"model, data set, N and batch that fit; {memory}."))
    return section
