"""Shared figure styling: one seaborn theme, one colour per method in every figure, PNG + PDF output.

Figures are drawn on ``matplotlib.figure.Figure`` objects directly, never
through pyplot, so no display is needed and no global plotting state (the
backend, rcParams) of a caller's session is changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import matplotlib
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

# A label missing from the table order given to order_labels goes last, as a method that leaves
# Stage.table_order at its default does.
UNKNOWN_ORDER = 100.0

# Memory categories bottom to top in stacked bars: what the framework accounts for every method,
# in this order; every other category is a method's own state (Stage.held_tensors), after them.
CATEGORY_ORDER = ("parameters", "gradients", "optimizer", "activations", "messages")

DPI = 150


def theme() -> matplotlib.rc_context:
    """A context that applies the report's style: ``with theme(): fig = new_figure(...)``."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15),
          "legend.frameon": False, "axes.titleweight": "bold"}
    return matplotlib.rc_context(rc)


def new_figure(width: float, height: float) -> MplFigure:
    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas that can draw and measure text (no pyplot, no GUI backend)
    return fig


def order_labels(labels, table_order: Mapping[str, float]) -> list[str]:
    """Method labels (method[options]) by their method's table order, then method name, then label.

    ``table_order`` maps each label to its method's ``table_order`` fact
    (ReportData.table_order, from the runs): the report learns the order from
    the methods, not from a list of names.
    """
    def key(label: str):
        # a label is the method, then its options in brackets and its distinguishing settings (results.Run.label)
        method = label.split("[", 1)[0].split(" (", 1)[0]
        return table_order.get(label, UNKNOWN_ORDER), method, label
    return sorted(set(labels), key=key)


COLORBLIND = sns.color_palette("colorblind")


def method_colors(labels, table_order: Mapping[str, float]) -> dict[str, tuple]:
    """The same colour for a method in every figure of a report (given the report's full label list)."""
    ordered = order_labels(labels, table_order)
    # seaborn's palettes cycle past their size: the colour-blind one has 10 colours, and every method with
    # its baselines is 12 labels (bp and bdfa came out the same blue). Past 10, tab20's 20 distinct colours.
    palette = "colorblind" if len(ordered) <= len(COLORBLIND) else "tab20"
    colors = sns.color_palette(palette, n_colors=max(len(ordered), 1))
    return dict(zip(ordered, colors))


def order_categories(categories) -> list[str]:
    """The framework's categories in CATEGORY_ORDER, then the methods' own, alphabetically."""
    categories = list(categories)
    known = [c for c in CATEGORY_ORDER if c in categories]
    return known + sorted(c for c in categories if c not in CATEGORY_ORDER)


def category_colors(categories) -> dict[str, tuple]:
    ordered = order_categories(categories)
    colors = sns.color_palette("tab10", n_colors=max(len(ordered), 1))
    return dict(zip(ordered, colors))


@dataclass
class Figure:
    """A figure written to the report folder, with what the index says about it."""

    title: str
    png: str  # path relative to the report folder
    pdf: str
    caption: str
    runs: list[str] = field(default_factory=list)


def save(fig: MplFigure, out: Path, stem: str, *, title: str, caption: str, runs) -> Figure:
    """Write ``out/stem.png`` and ``out/stem.pdf``; ``stem`` may hold a subfolder (``memory/mlp``)."""
    png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI)
    fig.savefig(pdf)
    return Figure(title=title, png=png.relative_to(out).as_posix(), pdf=pdf.relative_to(out).as_posix(),
                  caption=caption, runs=sorted(set(runs)))


def file_stem(*parts) -> str:
    """A file name from the parts of a group, e.g. ('mlp', 'synthetic', 'k2') -> mlp-synthetic-k2."""
    text = "-".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
