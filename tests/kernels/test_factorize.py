"""Tests of the closed-form projections in kernels.factorize (fresh random inputs each run)."""

from __future__ import annotations

import math
import time

import pytest
import scipy.linalg
import torch

from kernels.factorize import (
    hierarchical_butterfly,
    lowrank_projection,
    relative_error,
    sparse_projection,
)
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_dense, butterfly_multiply_reference

DTYPES = [torch.float64, torch.complex128]


def butterfly_matrix(tw: torch.Tensor) -> torch.Tensor:
    """B of an untied twiddle, fast: the reference on the identity gives B^T (rows are x)."""
    n = 2 * tw.shape[2]
    return butterfly_multiply_reference(tw, torch.eye(n, dtype=tw.dtype)).T


# --- hierarchical butterfly ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
@pytest.mark.parametrize("n", [2, 4, 8, 16, 256])
def test_recovers_random_exact_butterfly(n: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    m = n.bit_length() - 1
    target = butterfly_matrix(torch.randn(1, m, n // 2, 2, 2, dtype=dtype, generator=gen))
    tw = hierarchical_butterfly(target)
    assert tw.shape == (1, m, n // 2, 2, 2) and tw.dtype == dtype
    assert relative_error(butterfly_matrix(tw), target) < 1e-10
    # the convention: butterfly_dense(tw) ~= M, and the reference on the identity gives M^T
    if n <= 16:
        assert relative_error(butterfly_dense(tw), target) < 1e-10
    x = torch.randn(3, n, dtype=dtype, generator=gen)
    assert relative_error(butterfly_multiply_reference(tw, x), x @ target.T) < 1e-10


def test_recovers_bit_reversed_dft() -> None:
    n = 256
    j = torch.arange(n, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * torch.outer(j, j) / n) / math.sqrt(n)
    perm = bit_reversal(n)
    tw = hierarchical_butterfly(dft[:, perm])  # F P^{-1}, with P x = x[perm]
    b = butterfly_matrix(tw)
    p = torch.eye(n, dtype=torch.complex128)[perm]
    assert relative_error(b @ p, dft) < 1e-10
    x = torch.randn(4, n, dtype=torch.complex128)
    fft = torch.fft.fft(x, norm="ortho")
    assert relative_error(butterfly_multiply_reference(tw, x[:, perm]), fft) < 1e-10


def test_recovers_hadamard() -> None:
    n = 256
    h = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / math.sqrt(n)
    tw = hierarchical_butterfly(h)
    assert tw.shape == (1, 8, 128, 2, 2) and tw.dtype == torch.float64
    assert relative_error(butterfly_matrix(tw), h) < 1e-10


def test_known_permutation_is_removed_by_indexing_columns(gen: torch.Generator) -> None:
    """M = B P with P x = x[perm] (not an involution here): factor M[:, perm] = M P^T."""
    n = 64
    b = butterfly_matrix(torch.randn(1, 6, n // 2, 2, 2, dtype=torch.complex128, generator=gen))
    perm = torch.randperm(n, generator=gen)
    target = b @ torch.eye(n, dtype=torch.complex128)[perm]
    tw = hierarchical_butterfly(target[:, perm])
    assert relative_error(butterfly_matrix(tw), b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
def test_keeps_dtype_and_leaves_input_alone(dtype: torch.dtype, gen: torch.Generator) -> None:
    target = torch.randn(32, 32, dtype=dtype, generator=gen).requires_grad_()
    before = target.detach().clone()
    tw = hierarchical_butterfly(target)
    assert tw.shape == (1, 5, 16, 2, 2) and tw.dtype == dtype and not tw.requires_grad
    assert torch.equal(target.detach(), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
def test_projection_is_idempotent(dtype: torch.dtype, gen: torch.Generator) -> None:
    """On a matrix that is no butterfly, the result is one, and projecting it again is exact."""
    target = torch.randn(64, 64, dtype=dtype, generator=gen)
    approx = butterfly_matrix(hierarchical_butterfly(target))
    assert 0.05 < relative_error(approx, target) < 1.0
    again = butterfly_matrix(hierarchical_butterfly(approx))
    assert relative_error(again, approx) < 1e-10


def test_exact_on_a_zero_matrix() -> None:
    tw = hierarchical_butterfly(torch.zeros(16, 16))
    assert torch.equal(butterfly_matrix(tw.double()), torch.zeros(16, 16, dtype=torch.float64))


def test_is_fast_at_256(gen: torch.Generator) -> None:
    target = torch.randn(256, 256, dtype=torch.complex128, generator=gen)
    # one thread, best of 3: on a loaded 2-core machine OpenMP threads that spin-wait for a
    # busy core make each small batched SVD many times slower, which is noise, not the algorithm
    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            start = time.perf_counter()
            hierarchical_butterfly(target)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.5, times


@pytest.mark.parametrize("shape", [(6, 6), (1, 1), (8, 4), (8,), (2, 8, 8)])
def test_bad_shapes_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"power of two|square|n >= 2"):
        hierarchical_butterfly(torch.zeros(shape))
    if shape == (6, 6):
        with pytest.raises(ValueError, match="6"):
            hierarchical_butterfly(torch.zeros(shape))


# --- sparse and low-rank baselines ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
@pytest.mark.parametrize("nnz", [0, 1, 37, 256, 1024])
def test_sparse_projection_keeps_largest(
    nnz: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    target = torch.randn(32, 32, dtype=dtype, generator=gen)
    out = sparse_projection(target, nnz)
    assert out.shape == target.shape and out.dtype == dtype
    kept = out != 0
    assert int(kept.sum()) == nnz
    assert torch.equal(out[kept], target[kept])
    if 0 < nnz < target.numel():
        assert target[kept].abs().min() >= target[~kept].abs().max()


def test_sparse_projection_rejects_bad_nnz() -> None:
    with pytest.raises(ValueError, match="17"):
        sparse_projection(torch.zeros(4, 4), 17)
    with pytest.raises(ValueError, match="-1"):
        sparse_projection(torch.zeros(4, 4), -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "c128"])
@pytest.mark.parametrize("rank", [0, 1, 5, 32])
def test_lowrank_projection_is_eckart_young(
    rank: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    target = torch.randn(32, 48, dtype=dtype, generator=gen)
    out = lowrank_projection(target, rank)
    assert out.shape == target.shape and out.dtype == dtype
    assert int(torch.linalg.matrix_rank(out)) == rank
    s = torch.linalg.svdvals(target)
    expected = float(s[rank:].square().sum().sqrt())
    assert math.isclose(
        float(torch.linalg.norm(out - target)), expected, rel_tol=1e-9, abs_tol=1e-9
    )


def test_lowrank_projection_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="5"):
        lowrank_projection(torch.zeros(4, 6), 5)


def test_relative_error() -> None:
    b = torch.tensor([3.0, 4.0])
    assert relative_error(b, b) == 0.0
    assert math.isclose(relative_error(torch.zeros(2), b), 1.0)
    assert math.isclose(relative_error(b + torch.tensor([0.0, 0.5]), b), 0.1)
