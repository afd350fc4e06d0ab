"""The step-time script: its 'before' matrix is the old code's, and it writes its table."""

from __future__ import annotations

import csv

import pytest
import torch

from kernels.butterfly import ButterflyStack
from tasks import recovery_step_times as rst


@pytest.mark.parametrize("model", ["bp", "bpp", "bpbp"])
def test_old_matrix_is_the_new_one(model: str) -> None:
    """The matrix read from commit 60984eb and today's fast one agree (float64)."""
    stack = ButterflyStack(32, model, share_logits=False, generator=torch.Generator()).double()
    torch.testing.assert_close(rst.old_matrix_fn()(stack), stack.matrix())


def test_script_writes_its_table(tmp_path) -> None:
    out = tmp_path / "times"
    rst.main(
        ["--models", "bp", "--sizes", "8", "--trials", "2", "--min-seconds", "0", "--out", str(out)]
    )
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["trials"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == set(rst.COLUMNS)
    assert all(float(r["ms_per_step"]) > 0 and float(r["speedup"]) > 0 for r in rows)
    assert "| bp | 8 | 2 |" in out.with_suffix(".md").read_text()
