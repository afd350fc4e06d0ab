"""What every report's figures and tables share: the Agg backend, the DPI, the atomic PNG
write, the column check and the short scientific number format.

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
