"""Complex butterfly inference at small batch: the compiled row loop of csource_crows.py.

`ComplexRowPlan(twiddle)` packs a complex twiddle once (a snapshot) and computes y = B x for
x (batch, n), real or complex, like kernels.reference (forward only). At batch 1 it avoids
the tiled kernels' idle lanes (a tile holds 64 bytes of rows) and their transposes.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from kernels.cpu.compiled import library

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
    """y = B x with B complex (tied or untied, any nblocks), forward only, one row at a time.

    Kept lean like CPUButterfly.run: the argument array and the scratch rows are made once and
    a call fills in only x's and y's pointers, strides and the batch (under a lock: ctypes
    releases the GIL during the call and two threads must not share the scratch)."""

    def __init__(self, twiddle: torch.Tensor, increasing: bool = True):
        from kernels.cpu import twiddle_geometry

        lib = library()
        if lib is None or twiddle.dtype not in _REAL:
            raise ValueError("ComplexRowPlan needs the compiled kernels and a complex twiddle")
        self.tied, self.nblocks, self.n, _ = twiddle_geometry(twiddle)
        self.dtype, self.increasing = twiddle.dtype, increasing
        self._real = _REAL[twiddle.dtype]
        self._packed = pack_complex(twiddle)
        self._scratch = torch.empty(2 * self.n, dtype=self._real)
        self._fn = lib.crow[self._real]
        self._args = (ctypes.c_int64 * 15)(
            0, 0, 0, 0, 0, 0, 0, 0, 0, self.n, self._packed.data_ptr(),
            self.nblocks, self.tied, self.increasing, self._scratch.data_ptr(),
        )  # fmt: skip
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if len(shape) != 2 or shape[1] != self.n or not x.is_cpu:
            raise ValueError(f"x must be a CPU tensor (batch, {self.n}), got {tuple(shape)}")
        if dtype is not self.dtype and dtype is not self._real:
            raise ValueError(f"x must be {self.dtype} or {self._real}, got {dtype}")
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        batch, n, size = shape[0], self.n, self._real.itemsize
        y = x.new_empty(batch, n, dtype=self.dtype)
        xp, (s0, s1), yp = x.data_ptr(), x.stride(), y.data_ptr()
        # in real units: a complex x's imaginary parts sit one real after its real parts, and
        # its strides double (as in its view_as_real, which costs more than this call's setup)
        k, xi = (2, xp + size) if dtype is self.dtype else (1, 0)
        args, lock = self._args, self._lock
        lock.acquire()
        try:
            args[0], args[1], args[2], args[3] = xp, xi, k * s0, k * s1
            args[4], args[5], args[6], args[7], args[8] = yp, yp + size, 2 * n, 2, batch
            self._fn(args)
        finally:
            lock.release()
        return y
