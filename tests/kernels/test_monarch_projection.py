"""kernels.factorize.monarch_projection: exact on Monarch matrices, Frobenius-optimal otherwise.

Monarch matrices are rebuilt here from their definition with explicit dense factors
(W = P^T blockdiag(L) P blockdiag(R)), independently of the layer's own `matrix`.
"""

from __future__ import annotations

import pytest
import torch

from kernels.factorize import monarch_projection, relative_error
from kernels.structured import Monarch

F64 = torch.float64
SHAPES = [(8, 8), (8, 4), (16, 4), (32, 8), (64, 8), (64, 16), (128, 8), (256, 16)]
"""(n, block size): square Monarch (b = n / b), b < n / b (sparser), b > n / b (rank-t blocks)."""


def monarch_dense(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """P^T blockdiag(L) P blockdiag(R) with P u = u viewed (b, n/b) and transposed."""
    nb, b, _ = right.shape
    n = nb * b
    perm = torch.arange(n).view(b, nb).T.reshape(-1)
    p = torch.eye(n, dtype=left.dtype)[perm]
    return p.T @ torch.block_diag(*left) @ p @ torch.block_diag(*right)


def _random_factors(
    n: int, b: int, gen: torch.Generator, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, ...]:
    shape = (n // b, b, b)
    if dtype.is_complex:
        return tuple(
            torch.complex(
                torch.randn(shape, generator=gen, dtype=F64),
                torch.randn(shape, generator=gen, dtype=F64),
            )
            for _ in range(2)
        )
    return tuple(torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [F64, torch.complex128], ids=["f64", "c128"])
@pytest.mark.parametrize(("n", "b"), SHAPES)
def test_recovers_a_monarch_matrix(
    n: int, b: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    left, right = _random_factors(n, b, gen, dtype)
    target = monarch_dense(left, right)
    got_left, got_right = monarch_projection(target, b)
    assert got_left.shape == got_right.shape == (n // b, b, b) and got_left.dtype == dtype
    assert relative_error(monarch_dense(got_left, got_right), target) < 1e-10


@pytest.mark.parametrize(("n", "b"), SHAPES)
def test_layer_matches_the_definition_and_from_matrix(n: int, b: int, gen: torch.Generator) -> None:
    layer = Monarch(n, b, gen).double().requires_grad_(False)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    target = monarch_dense(layer.left, layer.right)
    assert relative_error(layer.matrix(), target) < 1e-12
    rebuilt = Monarch.from_matrix(target, b).requires_grad_(False)
    assert rebuilt.left.dtype == F64
    assert relative_error(rebuilt.matrix(), target) < 1e-10


@pytest.mark.parametrize(("n", "b"), [(64, 8), (32, 8), (128, 8), (16, 16)])
def test_projection_of_a_dense_matrix_is_optimal(n: int, b: int, gen: torch.Generator) -> None:
    """No perturbation of the projected factors fits better, nor does a random Monarch."""
    w = torch.randn(n, n, dtype=F64, generator=gen)
    left, right = monarch_projection(w, b)
    best = float(torch.linalg.norm(w - monarch_dense(left, right)))
    for scale in (1e-2, 1e-4):
        for _ in range(10):
            dl = scale * torch.randn(left.shape, dtype=F64, generator=gen)
            dr = scale * torch.randn(right.shape, dtype=F64, generator=gen)
            err = float(torch.linalg.norm(w - monarch_dense(left + dl, right + dr)))
            assert err >= best - 1e-12 * best
    init = Monarch(n, b, gen).double().requires_grad_(False).matrix()
    assert best <= float(torch.linalg.norm(w - init))
    if b == n:  # one block of rank n: every matrix is Monarch
        assert best < 1e-10 * float(torch.linalg.norm(w))


def test_the_projection_is_the_best_fit_of_each_block(gen: torch.Generator) -> None:
    """At n = 64, b = 8 (square), block (l, k) of W is rank 1; the residual's squared norm
    is the sum over blocks of every singular value but the first."""
    n, b = 64, 8
    w = torch.randn(n, n, dtype=F64, generator=gen)
    left, right = monarch_projection(w, b)
    residual = torch.linalg.norm(w - monarch_dense(left, right)) ** 2
    blocks = w.view(b, b, b, b).permute(1, 2, 0, 3)  # [l, k, s, p] = w[s b + l, k b + p]
    s = torch.linalg.svdvals(blocks)
    torch.testing.assert_close(residual, (s[..., 1:] ** 2).sum(), rtol=1e-10, atol=0)


def test_keeps_dtype_and_rejects_bad_block_sizes(gen: torch.Generator) -> None:
    w = torch.randn(16, 16, generator=gen)
    left, right = monarch_projection(w, 4)
    assert left.dtype == right.dtype == torch.float32
    with pytest.raises(ValueError, match="divide"):
        monarch_projection(w, 3)
    with pytest.raises(ValueError, match="square"):
        monarch_projection(torch.randn(4, 8), 2)
