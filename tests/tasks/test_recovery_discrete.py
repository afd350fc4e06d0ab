"""The discrete row: exact BP / BPP members with per-level permutations, targets, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import load_factors
from kernels.butterfly import ButterflyStack
from kernels.constructions import exact_stack
from suite.cli import main
from tasks.recovery.discrete import (
    _column_order,
    bp_stack,
    fit_bp,
    fit_discrete,
    fit_hard,
    identify_levels,
)
from tasks.recovery.params import DiscreteParams
from tasks.targets import rmse, target_matrix

FAST = DiscreteParams(steps=60, rounds=3, polish_steps=10, restarts=1)


def member(n: int, model: str, complex_: bool, seed: int) -> torch.Tensor:
    """A random exact member: Haar-unitary (real: orthogonal) tied twiddles, a random hard
    choice at every level of every permutation (P' of bpp: one level)."""
    g = torch.Generator().manual_seed(seed)
    stack = ButterflyStack(
        n, model, complex=complex_, tied=True, share_logits=False, init="ortho", generator=g
    ).double()
    with torch.no_grad():
        for p in stack.permutations():
            on = torch.rand(p.logits.shape, generator=g, dtype=torch.float64) < 0.5
            p.logits.copy_(torch.where(on, 10.0, -10.0))
    stack.round_permutations_()
    with torch.no_grad():
        return stack.matrix().detach()


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("model", ["bp", "bpp"])
@pytest.mark.parametrize("n", [16, 64])
def test_members_are_recovered_exactly(n: int, model: str, complex_: bool) -> None:
    for seed in range(3):
        m = member(n, model, complex_, seed)
        assert m.is_complex() == complex_
        res = fit_bp(m, model)
        assert res.rmse < 1e-12, (seed, res.permutation)
        assert res.stack.config["tied"] is False and res.permutation["twiddles"] == "untied"
        x = torch.randn(3, n, dtype=m.dtype)
        torch.testing.assert_close(res.stack(x), x @ m.T, rtol=0, atol=1e-12)


def test_the_permutation_must_be_identified() -> None:
    """Under the identity (or the first level's choice alone) the same member is far off."""
    n = 64
    m = member(n, "bp", True, 7)
    choices, worst, _ = identify_levels(m)
    assert worst < 1e-12
    assert rmse(bp_stack(m, choices).matrix().detach(), m) < 1e-12
    wrong = [(False, False, False)] * len(choices)
    if choices != wrong:
        assert rmse(bp_stack(m, wrong).matrix().detach(), m) > 1e-3
    idx = _column_order(n, choices)
    assert sorted(idx.tolist()) == list(range(n))


def test_a_matrix_outside_the_class_is_not_claimed() -> None:
    m = torch.from_numpy(np.random.RandomState(0).randn(32, 32) / np.sqrt(32))
    _, worst, _ = identify_levels(m)
    assert worst > 1e-3
    assert fit_bp(m, "bp").rmse > 1e-2


@pytest.mark.parametrize("name", ["dft", "idft", "hadamard"])
def test_constructions_are_found_in_closed_form(name: str) -> None:
    """The exact stacks of kernels/constructions.py as targets: exact, and the same P where it
    is unique (the DFT: bit reversal, every level even/odd separation)."""
    n = 64
    m = exact_stack(name, n).matrix().detach()
    res = fit_bp(m, "bp")
    assert res.rmse < 1e-12
    if name != "hadamard":
        assert all(level.startswith("e") for level in res.permutation["P"])


def test_hard_fit_recovers_a_real_part_target() -> None:
    """The DCT is Re(B P P') with complex twiddles: the closed form misses, the hard fit hits."""
    m = target_matrix("dct", 8)
    assert fit_bp(m, "bpp").rmse > 1e-3
    res = fit_discrete(m, "bpp", FAST)
    assert res.rmse < 1e-4, res.permutation
    assert res.permutation["twiddles"] == "tied"


def test_hard_fit_of_bpbp_halves_the_combos() -> None:
    """Convolution at n = 8: 64 pairs x 2 starts, one survivor, recovered."""
    res = fit_hard(target_matrix("convolution", 8), "bpbp", replace(FAST, restarts=2))
    assert res.candidates == 128 and set(res.permutation) == {"P1", "P2", "twiddles"}
    assert res.rmse < 1e-4


def test_cli_recovers_a_member_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No params.yaml in the cwd: the suite's own defaults; discrete bpp found, factors work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SUITE_DEBUG", raising=False)
    m = member(32, "bpp", True, 4)
    assert fit_bp(m, "bp").rmse > 1e-2  # this member needs its P' (many are also BP members)
    np.save(tmp_path / "m.npy", m.numpy())
    assert not (tmp_path / "params.yaml").exists()
    code = main(["recover", "--matrix", "m.npy", "--out", "OUT", "--method", "discrete"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "method discrete model bpp" in out.out
    res = json.loads((tmp_path / "OUT" / "result.json").read_text())
    assert res["method"] == "discrete" and res["model"] == "bpp" and res["recovered"]
    assert res["rmse"] < 1e-10 and res["seconds"] > 0 and "P'" in res["permutation"]
    fast = load_factors(tmp_path / "OUT" / "factors.pt")
    x = torch.randn(4, 32, dtype=torch.complex64)
    torch.testing.assert_close(fast(x), x @ m.to(torch.complex64).T, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x93NUMPY garbage", ["m.npy", "cannot read"]),
        (None, ["m.npy", "cannot read"]),  # a valid header, the data cut short
    ],
)
def test_cli_corrupted_npy_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
    words: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SUITE_DEBUG", raising=False)
    if content is None:
        np.save(tmp_path / "full.npy", np.random.randn(16, 16))
        content = (tmp_path / "full.npy").read_bytes()[:300]
        (tmp_path / "full.npy").unlink()
    (tmp_path / "m.npy").write_bytes(content)
    assert main(["recover", "--matrix", "m.npy", "--out", "OUT"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("suite recover: error:"), lines
    for word in words:
        assert word in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy"]


def test_a_grid_cell_gets_a_discrete_row(tmp_path: Path) -> None:
    """recover_cell with params.yaml's smoke profile (recover.discrete set): the Hadamard's cell
    ends with a discrete row, exact, its seconds and permutation recorded, its factors usable."""
    from suite.params import load_stage
    from tasks.recovery import RecoverParams, recover_cell

    params_yaml = Path(__file__).resolve().parents[2] / "params.yaml"
    p = load_stage(params_yaml, "recover", RecoverParams, "smoke")[1]
    assert p.discrete is not None
    threads = torch.get_num_threads()
    try:
        rows = recover_cell("hadamard", 8, "bp", p, tmp_path, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    last = rows[-1]
    assert [r.method for r in rows][-1] == "discrete" and last.model == "bp"
    assert last.rmse_paper < 1e-12 and last.recovered and last.seconds > 0
    assert last.best_params["permutation"]["twiddles"] == "untied"
    assert last.fitted is not None
    torch.testing.assert_close(
        last.fitted.matrix().detach(), target_matrix("hadamard", 8), rtol=0, atol=1e-12
    )
