"""Tests of the oracle (kernels.reference) and the permutations (kernels.permutation).

Fresh random inputs every run: the generator is seeded from os.urandom and the seed is
printed (pytest shows it with a failure), so a failing case can be replayed.
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from kernels.permutation import Permutation, bit_reversal, permute
from kernels.reference import (
    butterfly_dense,
    butterfly_factor_dense,
    butterfly_multiply_reference,
    log2_exact,
    untie,
)

DTYPES = [torch.float64, torch.complex128]


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=gen)


def twiddle_shape(nblocks: int, n: int, tied: bool) -> tuple[int, ...]:
    m = log2_exact(n)
    return (nblocks, n - 1, 2, 2) if tied else (nblocks, m, n // 2, 2, 2)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    """Relative Frobenius closeness (fp64 tolerances)."""
    return bool(torch.linalg.norm(a - b) <= tol * max(torch.linalg.norm(b).item(), 1.0))


def real_loss(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sum(y * r), its real part for complex y (autograd needs a real scalar)."""
    return (y * r).real.sum() if y.is_complex() else (y * r).sum()


# --- reference multiply against explicit dense matrices ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
@pytest.mark.parametrize("increasing", [True, False], ids=["inc", "dec"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("nblocks", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_reference_matches_dense_forward_and_grads(
    n: int, nblocks: int, tied: bool, increasing: bool, dtype: torch.dtype, gen: torch.Generator
) -> None:
    seed = gen.initial_seed()
    tw = randn(*twiddle_shape(nblocks, n, tied), dtype=dtype, gen=gen)
    x = randn(5, n, dtype=dtype, gen=gen)
    r = randn(5, n, dtype=dtype, gen=gen)

    tw_a, x_a = tw.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = butterfly_multiply_reference(tw_a, x_a, increasing_stride=increasing)
    real_loss(y_ref, r).backward()

    tw_b, x_b = tw.clone().requires_grad_(), x.clone().requires_grad_()
    dense = butterfly_dense(tw_b, increasing_stride=increasing)
    y_dense = x_b @ dense.T  # y = B x for every row x of the batch
    real_loss(y_dense, r).backward()

    assert y_ref.shape == (5, n) and y_ref.dtype == dtype
    assert close(y_ref, y_dense), f"forward, seed {seed}"
    assert close(x_a.grad, x_b.grad), f"grad x, seed {seed}"
    assert close(tw_a.grad, tw_b.grad), f"grad twiddle, seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
def test_reference_on_identity_is_transpose(dtype: torch.dtype, gen: torch.Generator) -> None:
    """Rows are vectors: reference(tw, I) = I B^T = B^T."""
    n = 16
    tw = randn(2, 4, n // 2, 2, 2, dtype=dtype, gen=gen)
    out = butterfly_multiply_reference(tw, torch.eye(n, dtype=dtype))
    assert close(out, butterfly_dense(tw).T)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
@pytest.mark.parametrize("n", [2, 8, 32])
def test_tied_factor_is_kronecker_of_paper_definition(
    n: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Level l of a tied twiddle is I_{n/2s} (x) [[D1, D2], [D3, D4]] (docs/protocol.md §1)."""
    tw = randn(1, n - 1, 2, 2, dtype=dtype, gen=gen)
    full = untie(tw)
    for level in range(log2_exact(n)):
        s = 1 << level
        d = tw[0, s - 1 : 2 * s - 1]  # (s, 2, 2)
        bf = torch.cat(
            [
                torch.cat([torch.diag(d[:, 0, 0]), torch.diag(d[:, 0, 1])], dim=1),
                torch.cat([torch.diag(d[:, 1, 0]), torch.diag(d[:, 1, 1])], dim=1),
            ]
        )
        expected = torch.kron(torch.eye(n // (2 * s), dtype=dtype), bf)
        assert torch.equal(butterfly_factor_dense(full[0, level], level), expected)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_decreasing_stride_with_transposed_twiddles_is_transpose(
    n: int, gen: torch.Generator
) -> None:
    """(B^(n) ... B^(2))^T = B^(2)^T ... B^(n)^T: decreasing stride, each 2x2 transposed."""
    tw = randn(1, log2_exact(n), n // 2, 2, 2, dtype=torch.complex128, gen=gen)
    transposed = butterfly_dense(tw.transpose(-1, -2), increasing_stride=False)
    assert close(transposed, butterfly_dense(tw).T)


def test_reference_mixes_real_and_complex(gen: torch.Generator) -> None:
    tw = randn(1, 3, 4, 2, 2, dtype=torch.complex128, gen=gen)
    x = randn(2, 8, dtype=torch.float64, gen=gen)
    y = butterfly_multiply_reference(tw, x)
    assert y.dtype == torch.complex128
    assert close(y, x.to(torch.complex128) @ butterfly_dense(tw).T)
    y2 = butterfly_multiply_reference(tw.real.contiguous(), x.to(torch.complex128))
    assert close(y2, x.to(torch.complex128) @ butterfly_dense(tw.real).T.to(torch.complex128))


# --- hand-set twiddles: DFT and Hadamard ---------------------------------------------------


def dft_twiddle(n: int) -> torch.Tensor:
    """Tied twiddle (1, n-1, 2, 2) of radix-2 decimation in time: level l pair (j, j+s) gets
    [[1, w^j], [1, -w^j]] / sqrt(2), w = exp(-2 pi i / 2s); then F = B P, P = bit reversal."""
    rows = []
    for level in range(log2_exact(n)):
        s = 1 << level
        wj = torch.exp(-2j * math.pi * torch.arange(s, dtype=torch.float64) / (2 * s))
        one = torch.ones(s, dtype=torch.complex128)
        rows.append(torch.stack([torch.stack([one, wj], -1), torch.stack([one, -wj], -1)], -2))
    return (torch.cat(rows) / math.sqrt(2)).unsqueeze(0)


def dft_matrix(n: int) -> torch.Tensor:
    j = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(j, j) / n) / math.sqrt(n)


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """P with P x = x[perm]."""
    n = perm.numel()
    return torch.eye(n, dtype=torch.float64)[perm]


@pytest.mark.parametrize("n", [2, 8, 64, 256])
def test_hand_set_twiddles_give_the_dft(n: int, gen: torch.Generator) -> None:
    tw = dft_twiddle(n)
    perm = bit_reversal(n)
    f = dft_matrix(n)
    b = butterfly_dense(tw) if n <= 64 else butterfly_multiply_reference(tw, torch.eye(n)).T
    assert close(b @ permutation_matrix(perm).to(torch.complex128), f)
    x = randn(3, n, dtype=torch.complex128, gen=gen)
    y = butterfly_multiply_reference(tw, x[:, perm])  # B P x for every row x
    assert close(y, torch.fft.fft(x, norm="ortho"))


@pytest.mark.parametrize("n", [2, 8, 64, 256])
def test_hand_set_twiddles_give_hadamard(n: int) -> None:
    h = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / math.sqrt(n)
    tw = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    tw = tw.expand(1, n - 1, 2, 2)
    assert close(butterfly_multiply_reference(tw, torch.eye(n, dtype=torch.float64)).T, h)


# --- permutations -------------------------------------------------------------------------


def bitreverse_by_string(n: int) -> list[int]:
    m = log2_exact(n)
    return [int(format(i, f"0{m}b")[::-1] or "0", 2) for i in range(n)]


def hard_permutation(logits: torch.Tensor, n: int) -> Permutation:
    perm = Permutation(n, share=logits.shape[0] == 1)
    with torch.no_grad():
        perm.logits.copy_(logits)
    return perm.round_()


@pytest.mark.parametrize("n", [2, 4, 8, 64, 256])
def test_bit_reversal_indices(n: int) -> None:
    assert bit_reversal(n).tolist() == bitreverse_by_string(n)


@pytest.mark.parametrize("n", [4, 8, 64, 256])
def test_bit_reversal_logits_round_to_bit_reversal(n: int, gen: torch.Generator) -> None:
    perm = hard_permutation(Permutation.bit_reversal_logits(n), n)
    assert torch.equal(perm.indices(), bit_reversal(n))
    x = randn(3, n, dtype=torch.float64, gen=gen)
    assert torch.equal(perm(x), x[:, bit_reversal(n)])
    # the relaxed (unrounded) permutation with |logit| = 10 is already close to it
    soft = permute(x, torch.sigmoid(Permutation.bit_reversal_logits(n)))
    assert close(soft, x[:, bit_reversal(n)], tol=1e-2)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-level"])
@pytest.mark.parametrize("n", [4, 16, 64])
def test_hard_permutation_is_a_permutation(n: int, share: bool, gen: torch.Generator) -> None:
    for _ in range(4):
        logits = randn(1 if share else log2_exact(n) - 1, 3, dtype=torch.float32, gen=gen)
        perm = hard_permutation(logits, n)
        mat = perm(torch.eye(n, dtype=torch.float64))
        assert set(mat.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mat.sum(0), torch.ones(n, dtype=torch.float64))
        assert torch.equal(mat.sum(1), torch.ones(n, dtype=torch.float64))
        idx = perm.indices()
        assert sorted(idx.tolist()) == list(range(n))
        x = randn(3, n, dtype=torch.float64, gen=gen)
        assert torch.equal(perm(x), x[:, idx])


@pytest.mark.parametrize("n", [4, 16, 64])
def test_shared_logits_equal_identical_per_level_rows(n: int, gen: torch.Generator) -> None:
    probs = torch.rand(1, 3, dtype=torch.float64, generator=gen)
    x = randn(3, n, dtype=torch.complex128, gen=gen)
    per_level = probs.expand(log2_exact(n) - 1, 3)
    assert torch.equal(permute(x, probs), permute(x, per_level))
    shared, untied = Permutation(n, share=True), Permutation(n, share=False)
    with torch.no_grad():
        shared.logits.copy_(torch.logit(probs))
        untied.logits.copy_(torch.logit(per_level))
    assert torch.allclose(shared(x), untied(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [4, 16, 64])
def test_relaxed_permutation_is_doubly_stochastic(n: int, gen: torch.Generator) -> None:
    eye = torch.eye(n, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    for probs in (
        torch.full((1, 3), 0.5, dtype=torch.float64),
        torch.rand(log2_exact(n) - 1, 3, dtype=torch.float64, generator=gen),
    ):
        mat = permute(eye, probs)
        assert (mat >= 0).all()
        assert torch.allclose(mat.sum(0), ones, atol=1e-12)
        assert torch.allclose(mat.sum(1), ones, atol=1e-12)


def test_permutation_gradients_reach_logits(gen: torch.Generator) -> None:
    perm = Permutation(8, share=False, generator=gen)
    perm(randn(2, 8, dtype=torch.float32, gen=gen)).square().sum().backward()
    assert perm.logits.grad is not None and perm.logits.grad.abs().sum() > 0


# --- bad sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 3, 6, 12, 100])
def test_non_power_of_two_sizes_raise(n: int) -> None:
    with pytest.raises(ValueError, match=str(n)):
        log2_exact(n)
    with pytest.raises(ValueError, match=str(n)):
        bit_reversal(n)
    with pytest.raises(ValueError, match=str(n)):
        Permutation(n)
    if n >= 2:
        with pytest.raises(ValueError, match=str(n)):
            untie(torch.zeros(1, n - 1, 2, 2))
        with pytest.raises(ValueError, match=str(n)):
            butterfly_multiply_reference(torch.zeros(1, n - 1, 2, 2), torch.zeros(1, n))
        with pytest.raises(ValueError, match=str(n)):
            permute(torch.zeros(1, n), torch.zeros(1, 3))


def test_untied_twiddle_with_wrong_levels_raises() -> None:
    with pytest.raises(ValueError, match="8"):
        butterfly_multiply_reference(torch.zeros(1, 2, 4, 2, 2), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="2"):
        Permutation(2)


def test_hard_permutation_moves_values_exactly() -> None:
    """Regression: x + p (y - x) with p = 1 rounded 0.3 to 0.29999923 next to 1e10."""
    perm = hard_permutation(Permutation.bit_reversal_logits(4), 4)
    x = torch.tensor([[1.0, 1e10, 0.3, 1.0]], dtype=torch.float64)
    assert perm(x).tolist() == [[1.0, 0.3, 1e10, 1.0]]
