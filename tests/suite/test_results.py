"""Tests for suite.results: atomic writes and the tidy table schema."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from suite.results import (
    RECOVERY_COLUMNS,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_table,
    write_table,
)


def _row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "target": "dft",
        "n": 8,
        "method": "bp",
        "model": "butterfly",
        "rmse": 1e-5,
        "rmse_paper": 1e-5,
        "recovered": True,
        "trials": 4,
        "steps": 100,
        "seconds": 1.5,
        "budget_capped": False,
        "profile": "smoke",
        "run_id": "abc",
        "env_id": "0123456789ab",
        "commit": "deadbeef",
    }
    row.update(over)
    return row


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_save_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save(target, writer)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_table_failure_keeps_old_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "recovery.csv"
    write_table(pd.DataFrame([_row()]), target, RECOVERY_COLUMNS)
    before = target.read_bytes()

    def broken(self: pd.DataFrame, path: Path, **kw: object) -> None:
        Path(path).write_text("target,n\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        write_table(pd.DataFrame([_row(n=16)]), target, RECOVERY_COLUMNS)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_text_and_json(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "sub" / "b.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "sub" / "b.json").read_text()
    assert text.index('"a"') < text.index('"b"')
    assert text.startswith('{\n  "a"')


def test_atomic_json_rejects_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "c.json", {"x": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_round_trip(tmp_path: Path) -> None:
    df = pd.DataFrame([_row(), _row(target="hadamard", n=16, rmse=0.25, recovered=False)])
    path = tmp_path / "reports" / "recovery.csv"
    write_table(df, path, RECOVERY_COLUMNS)
    back = read_table(path, RECOVERY_COLUMNS)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert _leftovers(path.parent) == []


def test_missing_column_named(tmp_path: Path) -> None:
    df = pd.DataFrame([_row()]).drop(columns=["rmse", "env_id"])
    with pytest.raises(ValueError, match="rmse") as info:
        write_table(df, tmp_path / "r.csv", RECOVERY_COLUMNS)
    assert "env_id" in str(info.value)
    assert not (tmp_path / "r.csv").exists()


def test_null_key_rejected(tmp_path: Path) -> None:
    df = pd.DataFrame([_row(), _row(target=None)])
    with pytest.raises(ValueError, match="target"):
        write_table(df, tmp_path / "r.csv", RECOVERY_COLUMNS)
    write_table(pd.DataFrame([_row(rmse=None)]), tmp_path / "ok.csv", RECOVERY_COLUMNS)


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_table(tmp_path / "missing.csv", RECOVERY_COLUMNS)
    (tmp_path / "short.csv").write_text("target,n\ndft,8\n")
    with pytest.raises(ValueError, match="method"):
        read_table(tmp_path / "short.csv", RECOVERY_COLUMNS)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv"):
        read_table(tmp_path / "empty.csv", RECOVERY_COLUMNS)
