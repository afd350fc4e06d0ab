"""Complex butterfly inference at small batch: the compiled row loop of csource_crows.py.

`ComplexRowPlan(twiddle)` packs a complex twiddle once (a snapshot) and computes y = B x for
x (batch, n), real or complex, like kernels.reference (forward only). At batch 1 it avoids
the tiled kernels' idle lanes (a tile holds 64 bytes of rows) and their transposes.
"""

from __future__ import annotations

import ctypes

import torch

from kernels.cpu.compiled import library
from kernels.cpu.tiled import _parts

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def pack_complex(twiddle: torch.Tensor) -> torch.Tensor:
    """untied (nb, m, n/2, 2, 2) -> (nb, m, 8, n/2); tied (nb, n-1, 2, 2) -> (nb, 8, n) with
    level l at [2**l, 2**(l+1)); the 8 arrays are ar, ai, br, bi, cr, ci, dr, di."""
    t = torch.view_as_real(twiddle.detach().resolve_conj().contiguous())
    if twiddle.dim() == 5:
        nb, m, half = twiddle.shape[:3]
        return t.reshape(nb, m, half, 8).transpose(2, 3).contiguous()
    nb, rows = twiddle.shape[:2]
    packed = torch.zeros(nb, 8, rows + 1, dtype=t.dtype)
    packed[:, :, 1:] = t.reshape(nb, rows, 8).transpose(1, 2)
    return packed


class ComplexRowPlan:
    """y = B x with B complex (tied or untied, any nblocks), forward only, one row at a time."""

    def __init__(self, twiddle: torch.Tensor, increasing: bool = True):
        from kernels.cpu import twiddle_geometry

        lib = library()
        if lib is None or twiddle.dtype not in _REAL:
            raise ValueError("ComplexRowPlan needs the compiled kernels and a complex twiddle")
        self.tied, self.nblocks, self.n, _ = twiddle_geometry(twiddle)
        self.dtype, self.increasing = twiddle.dtype, increasing
        self._real = _REAL[twiddle.dtype]
        self._packed = pack_complex(twiddle)
        self._fn = lib.crow[self._real]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n or not x.is_cpu:
            raise ValueError(f"x must be a CPU tensor (batch, {self.n}), got {tuple(x.shape)}")
        if x.dtype not in (self.dtype, self._real):
            raise ValueError(f"x must be {self.dtype} or {self._real}, got {x.dtype}")
        x = x.resolve_conj().resolve_neg()
        y = torch.empty(x.shape[0], self.n, dtype=self.dtype)
        scratch = torch.empty(2 * self.n, dtype=self._real)
        xr, xi, xs0, xs1 = _parts(x)
        yr, yi, ys0, ys1 = _parts(y)
        args = (ctypes.c_int64 * 15)(
            xr, xi, xs0, xs1, yr, yi, ys0, ys1, x.shape[0], self.n, self._packed.data_ptr(),
            self.nblocks, self.tied, self.increasing, scratch.data_ptr(),
        )  # fmt: skip
        self._fn(args)
        return y
