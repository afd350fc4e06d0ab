"""What every report's figures and tables share: the Agg backend, the DPI, the atomic PNG
write, the column check, the short scientific number format and a label placer that keeps
labels apart.

suite/report.py (recovery), compression_report.py, speed_report.py and reproduction_report.py
import these; none of them reaches into another report module's private names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: no display, the same on every machine

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from suite.results import atomic_save  # noqa: E402

DPI = 150


def require(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    """A ValueError naming the missing columns, or the emptiness, of df."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; have {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{where}: the table has no rows")


def short_sci(x: float | None, digits: int = 1) -> str:
    """Short scientific form with `digits` significant digits: 3.2e-06 -> '3e-6' (digits=1),
    0.019 -> '1.9e-2' (digits=2), 1e-4 -> '1e-4'; NaN/None -> ''."""
    if x is None or not math.isfinite(x):
        return ""
    if x == 0:
        return "0"
    mant, exp = f"{x:.{max(digits, 1) - 1}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save fig as PNG atomically (temp file beside path, then rename) and close it."""
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)


# offsets (points) tried in turn for a label, nearest first: right, left, above, below, then
# the same further out (with a leader line)
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4, 5, 6) for dx, dy in
            ((5, 2), (5, -9), (-5, 2), (-5, -9), (0, 7), (0, -14), (9, 9), (-9, -16))]  # fmt: skip


def place_labels(
    ax: plt.Axes, labels: Sequence[tuple[str, float, float, dict]], fontsize: float = 7
) -> None:
    """Annotate points so that no two labels overlap each other or a marker: each label takes
    the first free spot around its point (nearest first, a leader line when pushed out).

    labels: (text, x, y, annotate kwargs such as color) in data coordinates. Call it after the
    axes' scales, limits and layout are final (it measures text in pixels).
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xy = ax.transData.transform([(x, y) for _, x, y, _ in labels]) if labels else []
    taken = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in xy]  # the markers
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    def clash(box: Bbox, own: int) -> float:
        """Pixels of box over other labels and markers (its own marker excluded)."""
        area = 0.0
        for j, t in enumerate(taken):
            if j != own and box.overlaps(t):
                w = min(box.x1, t.x1) - max(box.x0, t.x0)
                h = min(box.y1, t.y1) - max(box.y0, t.y0)
                area += max(w, 0) * max(h, 0) + 1.0
        return area

    for own, ((text, x, y, kw), _) in enumerate(zip(labels, xy, strict=True)):
        best: tuple[float, int, Bbox] | None = None
        for i, (dx, dy) in enumerate(_OFFSETS):
            ann = _annotate(ax, text, (x, y), (dx, dy), i >= 8, fontsize, kw)
            box = label_box(ann, renderer).expanded(1.04, 1.1)
            ann.remove()
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            score = clash(box, own) + (0.0 if inside else 1e6)
            if best is None or score < best[0]:
                best = (score, i, box)
            if score == 0:
                break
        assert best is not None
        _annotate(ax, text, (x, y), _OFFSETS[best[1]], best[1] >= 8, fontsize, kw)
        chosen = best[2]
        taken.append(chosen)


def label_box(ann: plt.Annotation, renderer: object) -> Bbox:
    """The pixels of an annotation's text (its leader line excluded)."""
    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _annotate(
    ax: plt.Axes, text: str, xy: tuple[float, float], offset: tuple[float, float],
    leader: bool, fontsize: float, kw: dict,
) -> plt.Annotation:  # fmt: skip
    ha = "left" if offset[0] > 0 else "right" if offset[0] < 0 else "center"
    arrow = {"arrowstyle": "-", "lw": 0.5, "color": "gray"} if leader else None
    return ax.annotate(text, xy, xytext=offset, textcoords="offset points", ha=ha,
                       fontsize=fontsize, arrowprops=arrow, **kw)  # fmt: skip
