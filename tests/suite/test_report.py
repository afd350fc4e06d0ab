"""Recovery report: figure file and paper-vs-measured verdicts, on synthetic test data."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest

from suite import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _df(cells: list[tuple[str, int, str, float]], profile: str = "test") -> pd.DataFrame:
    """TEST DATA, not measurements: rows (target, n, method, rmse) in the recovery schema."""
    rows = [
        dict(
            target=t,
            n=n,
            method=m,
            model=m,
            rmse=r,
            recovered=r <= 1e-4,
            trials=1,
            steps=10,
            seconds=0.1,
            budget_capped=False,
            profile=profile,
            run_id="r0",
            env_id="e0",
            commit="c0",
        )
        for t, n, m, r in cells
    ]
    return pd.DataFrame(rows)


def _synthetic() -> pd.DataFrame:
    cells = []
    for n in (8, 16):
        cells += [
            ("dft", n, "bp", 3e-6),
            ("dct", n, "bpp", 2e-5),
            ("randn", n, "bp", 0.1),
            ("dft", n, "sparse", 0.3),
            ("dft", n, "lowrank", 0.05),
            ("dft", n, "sparse_lowrank", 0.05),
            ("dft", n, "hierarchical", 0.0),
            ("convolution", n, "bpbp", 0.02),
        ]
    return _df(cells, profile="smoke")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figure_is_png_written_atomically(tmp_path: Path, monkeypatch) -> None:
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "recovery.png"
    report.recovery_figure(_synthetic(), out)
    w, h = _png_size(out)
    assert w > 1500 and h > 600  # ~150 dpi on a wide figure
    assert renames and renames[-1][1] == out and renames[-1][0].parent == out.parent
    assert [p.name for p in tmp_path.iterdir()] == ["recovery.png"]


def test_figure_failure_leaves_old_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "recovery.png"
    out.write_bytes(b"old")

    def broken(self, fname, **kw) -> None:
        Path(fname).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.recovery_figure(_df([("dft", 8, "bp", 1e-6)]), out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["recovery.png"]


def test_missing_columns_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rmse"):
        report.recovery_figure(
            pd.DataFrame({"target": ["dft"], "n": [8], "method": ["bp"]}), tmp_path / "x.png"
        )
    assert not list(tmp_path.iterdir())


def _verdicts(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(*[report.recovery_verdicts(df)[c] for c in ("target", "verdict")], strict=True))


def test_verdicts() -> None:
    df = _df(
        [
            ("dft", 8, "bp", 1e-6),
            ("dft", 64, "bp", 3e-3),  # paper recovered 64
            ("convolution", 512, "bpbp", 5e-5),
            ("convolution", 1024, "bpbp", 8e-5),
            ("hadamard", 8, "bp", 1e-6),
            ("hadamard", 1024, "bp", 2e-5),
            ("legendre", 8, "bp", 2e-2),
            ("randn", 8, "bp", 1e-6),  # beyond the paper
            ("dst", 8, "sparse", 0.1),  # baseline only
            ("mine", 8, "bp", 1e-6),  # not a paper target
        ]
    )
    v = _verdicts(df)
    assert v["dft"] == "not reproduced"
    assert v["convolution"] == "exceeded"
    assert v["hadamard"] == "reproduced"
    assert v["legendre"] == "reproduced"
    assert v["randn"] == "exceeded"
    assert v["dst"] == "not run" and v["dct"] == "not run"
    assert v["mine"] == "not in paper"


def test_learned_cell_is_min_over_learned_methods() -> None:
    df = _df(
        [
            ("convolution", 1024, "bpbp", 0.02),
            ("convolution", 1024, "bp", 5e-5),
            ("convolution", 1024, "sparse", 1e-9),
        ]
    )  # baselines never count as learned
    assert _verdicts(df)["convolution"] == "exceeded"
    df = _df([("dft", 64, "sparse", 1e-9), ("dft", 64, "bp", 0.5)])
    assert _verdicts(df)["dft"] == "not reproduced"


def test_markdown_table() -> None:
    md = report.recovery_markdown(_synthetic())
    assert "profile: smoke" in md
    head = next(line for line in md.splitlines() if line.startswith("| target"))
    assert "N=8" in head and "N=16" in head and "N=1024" not in head
    dft = next(line for line in md.splitlines() if line.startswith("| dft "))
    assert "3e-6 ✓" in dft and "**reproduced**" in dft
    conv = next(line for line in md.splitlines() if line.startswith("| convolution "))
    assert "2e-2 |" in conv and "✓" not in conv and "**not reproduced**" in conv
    hartley = next(line for line in md.splitlines() if line.startswith("| hartley "))
    assert "**not run**" in hartley
    assert "4 of 6 measured (paper: 47 of 48)" in md


@pytest.mark.parametrize(
    ("x", "digits", "s"),
    [
        (3.2e-6, 1, "3e-6"),
        (0.019, 2, "1.9e-2"),
        (1e-4, 2, "1e-4"),
        (0.0, 1, "0"),
        (float("nan"), 1, ""),
    ],
)
def test_short_sci(x: float, digits: int, s: str) -> None:
    assert report.short_sci(x, digits) == s


def test_the_discrete_row_has_its_panel_and_table(tmp_path: Path) -> None:
    """TEST DATA: a discrete row beside the learned one: its own panel, RMSE and seconds."""
    df = pd.concat(
        [_synthetic(), _df([("dft", 8, "discrete", 1e-16), ("dct", 16, "discrete", 0.3)])]
    )
    assert "discrete (beyond the paper)" in [t for t, _ in report.RECOVERY_PANELS]
    md = report.recovery_markdown(df)
    assert "the discrete row" in md
    assert "| dft | discrete | 1e-16 ✓ (0.1s) | — |" in md
    assert "Structured cells recovered by the discrete row: 1 of 2" in md
    assert "the discrete row" not in report.recovery_markdown(_synthetic())
    out = tmp_path / "fig.png"
    report.recovery_figure(df, out)
    assert out.read_bytes().startswith(b"\x89PNG")
