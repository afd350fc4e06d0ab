"""Monarch matrices (Dao et al., ICML 2022): two block-diagonal factors and a transpose between.

For n = nb * b (b the block size, nb = n / b blocks), x (n,) -> y (n,):
    1. R:       u[k b + q] = sum_p R[k, q, p] x[k b + p]        (nb blocks of b x b, contiguous)
    2. permute: v[l b + r] = u[r nb + l]                        (view u as (b, nb), transpose)
    3. L:       w[l b + s] = sum_r L[l, s, r] v[l b + r]        (nb blocks of b x b)
    4. back:    y[s nb + l] = w[l b + s]
i.e. W = P^T L P R with P the reshape-transpose permutation; 2 n b parameters (L and R are
(nb, b, b) each). With b = nb = sqrt(n) this is Dao et al.'s Def. 3.1; with b < sqrt(n) the
same construction gives each output b^2 inputs (the class is sparser) at 2 n b parameters.
y[s nb + l] depends on x[k b + p] through the intermediates j = k b + q = r nb + l only.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.factorize import monarch_projection
from kernels.reference import log2_exact
from kernels.structured.base import StructuredLayer, check_size, random_orthogonal

BUDGET_BLOCK = 8
"""Block size of `monarch`: 2 n 8 = 16 n parameters, the budget of bpbp_complex (16(n-1))."""


def budget_block_size(n: int) -> int:
    """min(8, n): 16 n parameters for every power of two n >= 8 (nb = n / 8 blocks)."""
    return min(BUDGET_BLOCK, n)


def sqrt_block_size(n: int) -> int:
    """2^ceil(log2(n) / 2): sqrt(n) for even powers, sqrt(2n) for odd (then nb = b / 2)."""
    return 1 << -(-log2_exact(n) // 2)


class Monarch(StructuredLayer):
    """W = P^T L P R (module doc), block size b: 2 n b parameters, O(n b) per row.

    Init: every block of L and R Haar-orthogonal, so W is orthogonal (norm-preserving,
    ||W||_F^2 = n) like the butterfly layers' "ortho" init.
    """

    def __init__(self, n: int, block_size: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n, power_of_two=True))
        if block_size < 1 or n % block_size:
            raise ValueError(f"block size must divide n = {n}, got {block_size}")
        self.block_size = b = block_size
        self.nblocks = nb = n // b
        self.right = nn.Parameter(random_orthogonal(nb, b, generator))  # R[k, q, p]
        self.left = nn.Parameter(random_orthogonal(nb, b, generator))  # L[l, s, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        batch, nb, b = x.shape[0], self.nblocks, self.block_size
        u = torch.einsum("bkp,kqp->bkq", x.reshape(batch, nb, b), self.right)
        v = u.reshape(batch, b, nb)  # v[., r, l] = u[r nb + l]
        w = torch.einsum("brl,lsr->bsl", v, self.left)  # w[., s, l] lands at y[s nb + l]
        return w.reshape(batch, self.n)

    def permutation(self) -> torch.Tensor:
        """perm with (P u)[i] = u[perm[i]]: perm[l b + r] = r nb + l."""
        return torch.arange(self.n).view(self.block_size, self.nblocks).T.reshape(-1)

    def matrix(self) -> torch.Tensor:
        # P^T blockdiag(L) P has entries blockdiag(L)[inv[a], inv[c]]; blockdiag(R) then acts
        # on column blocks, O(n^2 b) instead of a dense n^3 product
        inv = torch.argsort(self.permutation())
        lp = torch.block_diag(*self.left)[inv][:, inv]
        nb, b = self.nblocks, self.block_size
        return torch.einsum("akq,kqp->akp", lp.view(self.n, nb, b), self.right).reshape(
            self.n, self.n
        )

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, block_size: int | None = None) -> Monarch:
        """The Frobenius-closest Monarch matrix to matrix (n, n) (kernels.factorize).

        block_size: default the `monarch` budget (8). The layer takes the matrix's dtype.
        """
        n = matrix.shape[0]
        b = block_size or budget_block_size(n)
        layer = cls(n, b).to(matrix.dtype)
        left, right = monarch_projection(matrix.detach(), b)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"
