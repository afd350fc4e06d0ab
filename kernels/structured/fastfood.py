"""Fastfood (Le, Sarlos, Smola 2013) and a fast Walsh-Hadamard transform.

The Hadamard matrix here is Sylvester's: H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]], so
H_n[i, j] = (-1)^popcount(i & j), symmetric, and H_n / sqrt(n) is orthogonal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.reference import log2_exact
from kernels.structured.base import StructuredLayer, check_size

RADIX_BITS = 5
"""fwht mixes up to 2^5 = 32 index values per stage with one batched matmul by H_32."""


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H_n (n, n), unnormalised (entries +-1), built by Kronecker products (n a power of two)."""
    log2_exact(n)
    h = torch.ones(1, 1, dtype=dtype)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


_SMALL_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _small_hadamard(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_k, cached: building it costs more than a stage of fwht at n = 1024."""
    key = (k, dtype, device)
    h = _SMALL_HADAMARD.get(key)
    if h is None:
        # a tensor made under inference_mode could never enter autograd later: make a normal one
        with torch.inference_mode(False):
            h = hadamard_matrix(k, dtype).to(device)
        _SMALL_HADAMARD[key] = h
    return h


def fwht(x: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """x @ H_n (= H_n x per row, H symmetric) for x (..., n), n a power of two; O(n log n).

    normalized: divide by sqrt(n), making the transform orthogonal (and its own inverse).
    H_n is the Kronecker product of the Sylvester matrices of any split of the index bits
    (H_n[i, j] = (-1)^popcount(i & j)), so with n = k_1 ... k_S (each k <= 32) the index is a
    tensor axis per group and stage t multiplies axis t by H_{k_t}: one batched matmul, no
    transposes. n (k_1 + ... + k_S) <= 32 n ceil(log2(n) / 5) flops: O(n log n), and at
    n = 1024 (two stages of 32) several times faster on CPU than 10 radix-2 passes.
    """
    n = x.shape[-1]
    m = log2_exact(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows, outer, done = y.shape[0], 1, 0
    while done < m:
        bits = min(RADIX_BITS, m - done)
        k = 1 << bits
        inner = n // (outer * k)
        hk = _small_hadamard(k, y.dtype, y.device)
        if inner == 1:  # the last axis: a plain (rows, k) x (k, k) matmul
            y = y.reshape(-1, k) @ hk
        else:
            y = torch.matmul(hk, y.reshape(rows * outer, k, inner))
        outer *= k
        done += bits
    y = y.reshape(rows, n)
    if normalized:
        y = y / math.sqrt(n)
    return y.reshape(*lead, n)


class Fastfood(StructuredLayer):
    """W = S H G Pi H B: 3n parameters (the diagonals S, G, B), O(n log n).

    H is the normalised Walsh-Hadamard transform (orthogonal; Le et al. use the unnormalised
    one and fold 1/n into their scaling, the same class), Pi a fixed random permutation
    (buffer `perm`, (Pi z)[i] = z[perm[i]]). Init, non-adaptive Fastfood: B random +-1,
    G ~ N(0, 1), S_i = s_i / ||G|| with s_i ~ chi(n): row i of H G Pi H B has norm
    ||G|| / sqrt(n), so row i of W has norm s_i / sqrt(n) ~ 1, the row-norm law of a Gaussian
    matrix with N(0, 1/n) entries: output variance ~ input variance, E ||W||_F^2 = n.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n, power_of_two=True))
        b = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        g = torch.randn(n, generator=generator)
        chi = torch.randn(n, n, generator=generator).norm(dim=1)  # chi with n degrees of freedom
        self.s = nn.Parameter(chi / g.norm())
        self.g = nn.Parameter(g)
        self.b = nn.Parameter(b)
        self.register_buffer("perm", torch.randperm(n, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = fwht(x * self.b)
        y = fwht(y.index_select(1, self.perm) * self.g)  # index_select: ~5x faster than y[:, p]
        return y * self.s

    def matrix(self) -> torch.Tensor:
        h = hadamard_matrix(self.n, self.s.dtype) / math.sqrt(self.n)
        pi = torch.eye(self.n, dtype=self.s.dtype)[self.perm]
        return (self.s[:, None] * h * self.g) @ pi @ (h * self.b)
