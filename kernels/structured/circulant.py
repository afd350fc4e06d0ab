"""Circulant layers and the f-circulant matrices that Toeplitz-like layers are built from.

Z_f is the n x n down-shift with f in the top-right corner: (Z_f v)[k] = v[k-1] for k >= 1 and
f v[n-1] for k = 0. The f-circulant Krylov matrix of v is
    Z_f(v) = K(Z_f, v) = [v, Z_f v, ..., Z_f^{n-1} v],  Z_f(v)[k, j] = v[k-j] (k >= j),
                                                                   f v[k-j+n] (k < j).
Z_1(v) is the circulant circ(v) (first column v) and Z_{-1}(v) the skew-circulant. Products
are by FFT: circ(v) x is the cyclic convolution v * x; the skew-circulant product is a cyclic
convolution after scaling index k by w^k with w = exp(i pi / n) (so w^n = -1 carries the sign).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.structured.base import StructuredLayer, check_size, normal


def f_circulant_matrix(v: torch.Tensor, f: float) -> torch.Tensor:
    """Z_f(v) (..., n, n) for v (..., n), entry by entry (the explicit ground truth)."""
    n = v.shape[-1]
    k = torch.arange(n)
    diff = k[:, None] - k[None, :]
    mat = v[..., diff % n]
    if f != 1:
        mat = torch.where(diff < 0, f * mat, mat)
    return mat


def circulant_multiply(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """circ(c) x for every row: c (n,) real, x (batch, n) real -> (batch, n), by rfft."""
    n = x.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(x) * torch.fft.rfft(c), n=n)


def skew_roots(n: int, dtype: torch.dtype) -> torch.Tensor:
    """w^k for k < n, w = exp(i pi / n) (complex of the precision of real `dtype`)."""
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    k = torch.arange(n, dtype=torch.float64)
    return torch.polar(torch.ones(n, dtype=torch.float64), math.pi * k / n).to(cdtype)


def skew_circulant_multiply(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Z_{-1}(h_i) x for every generator and row: h (r, n), x (batch, n) -> (batch, r, n)."""
    n = x.shape[-1]
    w = skew_roots(n, x.dtype)
    xf = torch.fft.fft(w * x)  # (batch, n)
    hf = torch.fft.fft(w * h)  # (r, n)
    # the product is real in exact arithmetic; .real drops only rounding
    return (torch.fft.ifft(xf[:, None, :] * hf[None]) * w.conj()).real


class Circulant(StructuredLayer):
    """W = circ(c) (first column c, W[k, j] = c[(k - j) mod n]): n parameters, O(n log n).

    Init: c i.i.d. N(0, 1/n) (as Thomas et al.'s code), E ||W||_F^2 = n.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n))
        self.c = nn.Parameter(normal((n,), 1.0 / math.sqrt(n), generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return circulant_multiply(self.c, x)

    def matrix(self) -> torch.Tensor:
        return f_circulant_matrix(self.c, 1.0)
