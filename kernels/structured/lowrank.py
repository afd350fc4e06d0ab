"""The two unstructured baselines: a dense n x n matrix and a rank-r product U V^T."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.structured.base import StructuredLayer, check_size, normal


class Dense(StructuredLayer):
    """W unconstrained (n, n): n^2 parameters.

    Init: nn.Linear's default (kaiming-uniform with a = sqrt(5)), i.e. U(-1/sqrt(n), 1/sqrt(n)),
    so the dense baseline is exactly the paper's "unconstrained" nn.Linear.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n))
        bound = 1.0 / math.sqrt(n)
        self.weight = nn.Parameter(torch.empty(n, n).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x @ self.weight.T

    def matrix(self) -> torch.Tensor:
        return self.weight

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> Dense:
        """A dense layer holding a copy of matrix (n, n), in its dtype."""
        layer = cls(matrix.shape[0]).to(matrix.dtype)
        with torch.no_grad():
            layer.weight.copy_(matrix)
        return layer


class LowRank(StructuredLayer):
    """W = U V^T with U, V (n, r): 2 r n parameters; forward costs O(r n) per row.

    Init: U, V i.i.d. N(0, s^2) with s = (n r)^(-1/4), so E ||W||_F^2 = n^2 r s^4 = n, the
    Frobenius energy of an orthogonal matrix (the scale rule of every structured layer here).
    """

    def __init__(self, n: int, rank: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n))
        if not 1 <= rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
        self.rank = rank
        std = (n * rank) ** -0.25
        self.u = nn.Parameter(normal((n, rank), std, generator))
        self.v = nn.Parameter(normal((n, rank), std, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return (x @ self.v) @ self.u.T

    def matrix(self) -> torch.Tensor:
        return self.u @ self.v.T
