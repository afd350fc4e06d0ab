"""Low displacement rank layers of Thomas et al. 2018: Toeplitz-like and LDR-TD.

Toeplitz-like (Sindhwani et al. 2015), displacement rank r:
    W = sum_{i<r} Z_1(g_i) Z_{-1}(h_i)           (f-circulants: see kernels.structured.circulant)
Each term satisfies Z_1 T - T Z_{-1} = Z_1(g)(Z_1 - Z_{-1})Z_{-1}(h) = 2 Z_1(g) e_0 e_{n-1}^T
Z_{-1}(h) (circulants commute with Z_1, skew-circulants with Z_{-1}), so the Sylvester
displacement Z_1 W - W Z_{-1} has rank <= r. Sindhwani et al. write Z_{-1}(J h_i) with J the
reversal; J is a fixed relabelling of h, so the class is the same.

LDR-TD, rank r (Thomas et al. 2018): learned tridiagonal A and B' (sub-, main and
super-diagonal each: 3n - 2 parameters), generators g_i, h_i, and the Krylov reconstruction
    W = sum_{i<r} K(A, g_i) K(B', h_i)^T,   K(A, v) = [v, A v, ..., A^{n-1} v].
This is the Stein reconstruction: W - A W B'^T = sum_i g_i h_i^T holds exactly while A or B'
is nilpotent (as at init); in general the formula is the parametrisation. The paper writes
K(B^T, h_i) for its operator B; like the authors' code (HazyResearch/structured-nets) we learn
B' = B^T directly (tridiagonal matrices are closed under transpose: same class and count).
Both start as the down-shift Z_0 (subdiagonal 1, rest 0; the paper's B = Z_0^T, as in that
code): then W = sum_i L(g_i) L(h_i)^T (L = lower-triangular Toeplitz) and
W - Z_0 W Z_0^T = sum g_i h_i^T, Toeplitz-like. Parameters: 2 r n + 6 n - 4.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.structured.base import StructuredLayer, check_size, normal
from kernels.structured.circulant import f_circulant_matrix, skew_circulant_multiply
from kernels.structured.krylov import krylov_tridiagonal


class ToeplitzLike(StructuredLayer):
    """W = sum_i Z_1(g_i) Z_{-1}(h_i): 2 r n parameters, forward by FFT in O(r n log n).

    Init: g, h i.i.d. N(0, s^2), s = (r n^2)^(-1/4): every entry of a term is a sum of n
    products, so E ||W||_F^2 = r n^3 s^4 = n.
    """

    def __init__(self, n: int, rank: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n))
        self.rank = rank
        std = (rank * n * n) ** -0.25
        self.g = nn.Parameter(normal((rank, n), std, generator))
        self.h = nn.Parameter(normal((rank, n), std, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        t = skew_circulant_multiply(self.h, x)  # (batch, r, n): Z_{-1}(h_i) x
        # circulant products summed over i in the frequency domain: one inverse FFT in all
        y = (torch.fft.rfft(t) * torch.fft.rfft(self.g)).sum(dim=1)
        return torch.fft.irfft(y, n=self.n)

    def matrix(self) -> torch.Tensor:
        return (f_circulant_matrix(self.g, 1.0) @ f_circulant_matrix(self.h, -1.0)).sum(dim=0)


class LDRTridiagonal(StructuredLayer):
    """LDR-TD: W = sum_i K(A, g_i) K(B', h_i)^T (module doc): 2 r n + 6 n - 4 parameters.

    forward builds both Krylov matrices (kernels.structured.krylov: blocked, with a hand-written
    backward) and applies (x K_B') K_A^T, two (batch, r n) x (r n, n) matmuls: 4 B r n^2 flops
    against 2 r n^3 + 2 B n^2 to materialise W first, so W is built only when the batch B is
    large (B (2r - 1) > r n, e.g. evaluation batches). `matrix` materialises W.
    Init: A = B' = Z_0; g, h i.i.d. N(0, sigma^2) with sigma = (3 / (r n^2))^(1/4): entry (k, l)
    is then a sum of min(k, l) + 1 products, so E ||W||_F^2 ~ r sigma^4 n^3 / 3 = n.
    """

    def __init__(self, n: int, rank: int = 1, generator: torch.Generator | None = None):
        super().__init__(check_size(n))
        self.rank = rank
        for op in ("a", "b"):
            self.register_parameter(f"sub_{op}", nn.Parameter(torch.ones(n - 1)))
            self.register_parameter(f"diag_{op}", nn.Parameter(torch.zeros(n)))
            self.register_parameter(f"sup_{op}", nn.Parameter(torch.zeros(n - 1)))
        std = (3.0 / (rank * n * n)) ** 0.25
        self.g = nn.Parameter(normal((rank, n), std, generator))
        self.h = nn.Parameter(normal((rank, n), std, generator))

    def operator(self, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sub, diag, sup) of A (op "a") or B' (op "b")."""
        return getattr(self, f"sub_{op}"), getattr(self, f"diag_{op}"), getattr(self, f"sup_{op}")

    def krylov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K_A, K_B' flattened to (n r, n): row (j, i) is A^j g_i (resp. B'^j h_i)."""
        n, r = self.n, self.rank
        ka = krylov_tridiagonal(*self.operator("a"), self.g).reshape(n * r, n)
        kb = krylov_tridiagonal(*self.operator("b"), self.h).reshape(n * r, n)
        return ka, kb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if not self.training and not torch.is_grad_enabled():
            return x @ self._inference_matrix().T
        ka, kb = self.krylov()
        if x.shape[0] * (2 * self.rank - 1) > self.rank * self.n:
            return x @ (ka.T @ kb).T
        return (x @ kb.T) @ ka

    def matrix(self) -> torch.Tensor:
        ka, kb = self.krylov()
        return ka.T @ kb

    def _inference_matrix(self) -> torch.Tensor:
        """W, built once per weight version for inference: the Krylov build (n sequential
        steps) would otherwise dominate every call; applying W is then a dense product."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = self.__dict__.get("_cached")
        if cached is None or cached[0] != key:
            cached = (key, self.matrix().detach())
            self.__dict__["_cached"] = cached
        return cached[1]

    def train(self, mode: bool = True) -> LDRTridiagonal:
        self.__dict__.pop("_cached", None)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
