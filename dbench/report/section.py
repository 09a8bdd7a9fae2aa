"""What every report section receives (the runs as tables) and what it returns (figures and tables)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from dbench import results
from dbench.report.figures import Figure, method_colors, order_labels
from dbench.report.tables import Table


@dataclass
class ReportData:
    """The runs of one report, read once and shared by every section."""

    runs: list[results.Run]
    table: pd.DataFrame  # results.runs_frame
    epochs: pd.DataFrame  # results.epochs_frame
    modules: pd.DataFrame  # results.modules_frame
    probes: pd.DataFrame  # results.probes_frame
    table_order: dict  # method label -> its method's table_order fact: where it goes in tables and legends
    colors: dict  # method label -> colour, the same in every figure

    @classmethod
    def of(cls, runs: list[results.Run]) -> "ReportData":
        results.distinguish(runs)  # runs that differ in more than the seed get labels that say how
        table = results.runs_frame(runs)
        table_order = dict(zip(table["label"], table["table_order"]))
        return cls(runs=runs, table=table, epochs=results.epochs_frame(runs), modules=results.modules_frame(runs),
                   probes=results.probes_frame(runs), table_order=table_order,
                   colors=method_colors(table["label"], table_order))

    def order_labels(self, labels) -> list[str]:
        """``labels`` (method labels of these runs) in the order of tables and legends."""
        return order_labels(labels, self.table_order)

    def label_rank(self, labels) -> dict[str, int]:
        """Each of ``labels`` -> its position in that order, to sort a table's rows by."""
        return {label: i for i, label in enumerate(self.order_labels(labels))}


@dataclass
class Section:
    """One part of the report: a heading, what it shows, its figures and tables, and notes for the reader."""

    key: str  # the subfolder of the report and the anchor in the index
    title: str
    intro: str
    items: list[Figure | Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
