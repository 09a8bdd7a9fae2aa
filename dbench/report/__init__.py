"""``dbench report``: run directories in, figures and tables a reader can paste into a paper out.

    from dbench.report import build_report
    report = build_report(["results/"], "reports/", methods=["bp", "mymethod"])

Sections, one module each: convergence, memory, generalization, sigma, speed;
index writes index.md and a self-contained index.html over all of them.
"""
from __future__ import annotations

from dbench.report.build import Report, build_report

__all__ = ["Report", "build_report"]
