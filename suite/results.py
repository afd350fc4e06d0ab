"""Tidy result tables and atomic file writes: never a partial file on disk.

atomic_save and replace_dir are kernels.atomic's (the one implementation, at the bottom of the
arrows so that kernels and tasks use it too), re-exported here for the stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kernels.atomic import atomic_save, replace_dir

__all__ = ["atomic_save", "replace_dir"]  # and the table helpers below

RECOVERY_COLUMNS: tuple[str, ...] = (
    "target",
    "n",
    "method",
    "model",
    "rmse",
    "rmse_paper",
    "recovered",
    "trials",
    "steps",
    "seconds",
    "budget_capped",
    "profile",
    "run_id",
    "env_id",
    "commit",
)
"""Required columns of reports/recovery.csv; one row per (target, n, method, model)."""

COMPRESSION_COLUMNS: tuple[str, ...] = (
    "method",
    "seed",
    "hidden_params",
    "total_params",
    "compression_factor",
    "val_accuracy",
    "test_accuracy",
    "projected_val_accuracy",
    "lr",
    "epochs",
    "best_epoch",
    "diverged",
    "budget_capped",
    "seconds",
    "latency_hidden_b1_ms",
    "latency_hidden_b256_ms",
    "latency_net_b1_ms",
    "latency_net_b256_ms",
    "latency_threads",
    "n_train",
    "n_val",
    "n_test",
    "data_source",
    "data_sha256",
    "device",
    "profile",
    "run_id",
    "env_id",
    "commit",
)
"""Required columns of reports/compression.csv; one row per (method, seed)."""

KEY_COLUMNS: tuple[str, ...] = (
    "stage",
    "target",
    "n",
    "method",
    "model",
    "device",
    "provider",
    "case",
    "dtype",
    "batch",
    "seed",
)
"""Columns that identify a cell; when required, write_table refuses nulls in them."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to path atomically."""
    atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text to path atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write obj as JSON (sorted keys, indent 2) atomically; NaN/inf raise ValueError."""
    text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _check_columns(df: pd.DataFrame, required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing required column(s) {missing}; have {list(df.columns)}")


def _check_keys(df: pd.DataFrame, keys: Sequence[str], where: str) -> None:
    for col in keys:
        if col in df.columns and df[col].isna().any():
            rows = df.index[df[col].isna()].tolist()[:5]
            raise ValueError(f"{where}: key column {col!r} has null values (rows {rows})")


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    required: Sequence[str],
    keys: Sequence[str] | None = None,
) -> None:
    """Write df as CSV atomically after checking the schema.

    required: columns that must be present (extra columns are kept).
    keys: columns that must not be null; default: the KEY_COLUMNS named in required.
    """
    where = str(path)
    _check_columns(df, required, where)
    if keys is None:
        keys = [c for c in required if c in KEY_COLUMNS]
    _check_keys(df, keys, where)
    atomic_save(path, lambda tmp: df.to_csv(tmp, index=False))


def read_table(path: str | os.PathLike[str], required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV table written by write_table and check its required columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result table not found: {path} (run the stage that writes it)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV table ({exc})") from None
    _check_columns(df, required, str(path))
    return df
