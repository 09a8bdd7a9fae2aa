"""No figure of a report prints text over other text: every label, title, tick and legend entry of every
figure is checked by its extent as drawn (issue 32: the verdict's Pareto figure printed five labels in one blot)."""
from __future__ import annotations

import itertools

import matplotlib.figure
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from dbench.report import build_report
from test_verdict import RUNS, write_run

# A crowd: every method close to the others in time and error, several never reaching the target (all drawn at
# the same x), as the smoke suite's small CNN gives.
CROWD = {
    "bp-s0": ("bp", "mlp", 2, 0, "distributed", [0.50, 0.80, 0.90], [10, 10, 10], [100, 60], None),
    "fr-s0": ("fr", "mlp", 2, 0, "distributed", [0.50, 0.70, 0.80], [9.9, 9.9, 9.9], [101, 61], None),
    "ddg-s0": ("ddg", "mlp", 2, 0, "distributed", [0.50, 0.70, 0.801], [9.8, 9.8, 9.8], [102, 60], None),
    "dfa-s0": ("dfa", "mlp", 2, 0, "distributed", [0.50, 0.70, 0.802], [10.1, 10.1, 10.1], [100, 62], None),
    "dni-s0": ("dni", "mlp", 2, 0, "distributed", [0.50, 0.80, 0.899], [10.05, 10.05, 10.05], [99, 60], None),
    "ddp-s0": ("ddp", "mlp", 2, 0, "distributed", [0.50, 0.80, 0.898], [10.02, 10.02, 10.02], [100, 100], None),
}


def overlapping_texts(fig: matplotlib.figure.Figure) -> list[tuple[str, str]]:
    """Pairs of non-empty texts drawn on ``fig`` whose extents intersect (by more than half a pixel).

    The texts are those the renderer draws (an axis keeps tick labels outside its view that it does not draw)."""
    drawn: list[tuple[str, object]] = []
    draw = Text.draw

    def record(text, renderer):
        draw(text, renderer)
        if text.get_visible() and text.get_text().strip():
            # Text's own extent: an annotation's would include its arrow, which may cross other labels' lines
            drawn.append((text.get_text(), Text.get_window_extent(text, renderer)))

    Text.draw = record
    try:
        FigureCanvasAgg(fig).draw()  # report figures are made without pyplot: give this one a drawing canvas
    finally:
        Text.draw = draw
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(drawn, 2)
            if box_a.x0 < box_b.x1 - 0.5 and box_b.x0 < box_a.x1 - 0.5 and box_a.y0 < box_b.y1 - 0.5
            and box_b.y0 < box_a.y1 - 0.5]


def test_the_checker_sees_two_texts_on_top_of_each_other():
    fig = matplotlib.figure.Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.annotate("fr (not reached)\n1.0 MiB", (0.5, 0.5))
    ax.annotate("bdfa (not reached)\n1.0 MiB", (0.5, 0.5))
    assert overlapping_texts(fig)


@pytest.mark.parametrize("runs", [RUNS, CROWD], ids=["verdict-runs", "crowd"])
def test_no_figure_of_a_report_overlaps_text(runs, tmp_path, monkeypatch):
    for name, spec in runs.items():
        write_run(tmp_path / "runs" / name, *spec)
    drawn: list[matplotlib.figure.Figure] = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        if fig not in drawn:
            drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    build_report([tmp_path / "runs"], tmp_path / "report")
    assert drawn
    found = {fig.get_suptitle() or str(i): overlapping_texts(fig) for i, fig in enumerate(drawn)}
    assert not {k: v for k, v in found.items() if v}
