"""Compiled CPU butterfly multiply with autograd: the tiled kernels of csource_tiled.py.

`butterfly_multiply_tiled(twiddle, x, increasing_stride)` has the semantics of
kernels.reference.butterfly_multiply_reference (tied or untied, real or complex, both stride
orders, any nblocks) and gradients for x and the twiddle, for float32/float64 and
complex64/complex128 on the CPU. `tiled_dtype` says whether a pair of tensors fits
(kernels.multiply checks for the compiler).

The backward needs every level's input. STORE_LEVELS picks where they come from: False (the
default, chosen by measurement: kernels/cpu/bench.py) recomputes them tile by tile inside the
backward, in a tile-local scratch that stays in cache; True has the forward save them for the
whole batch (nblocks log2 n copies of x).
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch.autograd.function import once_differentiable

from kernels.cpu.compiled import library

STORE_LEVELS = False
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_FAST = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def tiled_dtype(twiddle: torch.Tensor, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the kernels compute in, or None if the pair's device or dtypes do not fit
    (the compiler is not checked). Mirrors the reference: a complex side converts the other."""
    if x.device.type != "cpu" or twiddle.device.type != "cpu":
        return None
    if x.dtype not in _FAST or twiddle.dtype not in _FAST:
        return None
    dtype = twiddle.dtype if twiddle.is_complex() else x.dtype
    if _REAL.get(dtype, dtype) != _REAL.get(x.dtype, x.dtype):
        return None  # e.g. float64 x with a complex64 twiddle: the reference's promotion rules
    if _REAL.get(dtype, dtype) != _REAL.get(twiddle.dtype, twiddle.dtype):
        return None
    return dtype


def _geometry(twiddle: torch.Tensor) -> tuple[bool, int, int, int]:
    from kernels.cpu import twiddle_geometry  # the package imports this module

    return twiddle_geometry(twiddle)


def _parts(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(real pointer, imaginary pointer or 0, stride 0, stride 1) in real-element units."""
    if t is None:
        return 0, 0, 0, 0
    if t.is_complex():
        r = torch.view_as_real(t)
        return r.data_ptr(), r.data_ptr() + r.element_size(), r.stride(0), r.stride(1)
    return t.data_ptr(), 0, t.stride(0), t.stride(1)


def _prepare(twiddle: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twiddle contiguous and in the compute dtype; conj/neg bits of x resolved."""
    if x.is_complex() and not twiddle.is_complex():
        twiddle = twiddle.to(x.dtype)
    return twiddle.resolve_conj().resolve_neg().contiguous(), x.resolve_conj().resolve_neg()


def _check(twiddle: torch.Tensor, x: torch.Tensor) -> tuple[bool, int, int, int]:
    tied, nblocks, n, m = _geometry(twiddle)
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(
            f"x must be (batch, {n}) for a twiddle of {m} levels, got {tuple(x.shape)}"
        )
    return tied, nblocks, n, m


def _forward(
    twiddle: torch.Tensor, x: torch.Tensor, increasing: bool, store: bool, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = B x through tl_forward_*; also the saved level inputs when store. skip: each block's
    levels of stride < 2**skip left out (their twiddles are not read)."""
    tied, nblocks, n, m = _check(twiddle, x)
    cplx = twiddle.is_complex()
    rdt = _REAL.get(twiddle.dtype, twiddle.dtype)
    lib = library()
    assert lib is not None
    rows = lib.tl_rows[rdt]
    batch = x.shape[0]
    lvl = n * rows * (2 if cplx else 1)
    y = torch.empty(batch, n, dtype=twiddle.dtype)
    work = torch.empty(lvl, dtype=rdt)
    save = None
    if store:
        save = torch.empty(math.ceil(batch / rows) * nblocks * m * lvl, dtype=rdt)
    if batch:
        xr, xi, xs0, xs1 = _parts(x)
        yr, yi, ys0, ys1 = _parts(y)
        args = (ctypes.c_int64 * 18)(
            xr, xi, xs0, xs1, yr, yi, ys0, ys1, batch, n, twiddle.data_ptr(), nblocks,
            tied, increasing, cplx, 0 if save is None else save.data_ptr(), work.data_ptr(),
            skip,
        )  # fmt: skip
        lib.tl_forward[rdt](args)
    return y, save


def _backward(
    twiddle: torch.Tensor,
    x: torch.Tensor,
    gy: torch.Tensor,
    increasing: bool,
    save: torch.Tensor | None,
    need_tw: bool,
    need_x: bool,
    skip: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad twiddle, grad x) through tl_backward_*; None for the ones not needed. The left-out
    levels (skip, as in _forward) get a zero twiddle gradient."""
    tied, nblocks, n, m = _check(twiddle, x)
    cplx = twiddle.is_complex()
    rdt = _REAL.get(twiddle.dtype, twiddle.dtype)
    lib = library()
    assert lib is not None
    rows = lib.tl_rows[rdt]
    lvl = n * rows * (2 if cplx else 1)
    batch = x.shape[0]
    gy = gy.to(twiddle.dtype).resolve_conj().resolve_neg()
    gx = torch.empty(batch, n, dtype=x.dtype) if need_x else None  # real x: its real part
    shape = (*twiddle.shape, 2) if cplx else tuple(twiddle.shape)
    gacc = torch.zeros(shape, dtype=torch.float64) if need_tw else None
    scratch = torch.empty(0 if save is not None else nblocks * m * lvl, dtype=rdt)
    gwork = torch.empty(lvl, dtype=rdt)
    if batch:
        xr, xi, xs0, xs1 = _parts(x)
        gr, gi, gs0, gs1 = _parts(gy)
        gxr, gxi, gxs0, gxs1 = _parts(gx)
        args = (ctypes.c_int64 * 24)(
            xr, xi, xs0, xs1, gr, gi, gs0, gs1, gxr, gxi, gxs0, gxs1,
            0 if gacc is None else gacc.data_ptr(), batch, n, twiddle.data_ptr(), nblocks,
            tied, increasing, cplx, 0 if save is None else save.data_ptr(),
            scratch.data_ptr(), gwork.data_ptr(), skip,
        )  # fmt: skip
        lib.tl_backward[rdt](args)
    gtw = None
    if gacc is not None:
        gtw = gacc.to(rdt)
        gtw = torch.view_as_complex(gtw) if cplx else gtw
    return gtw, gx


class TiledButterfly(torch.autograd.Function):
    """y = B x with the compiled forward and backward (first derivatives only)."""

    @staticmethod
    def forward(
        ctx, twiddle: torch.Tensor, x: torch.Tensor, increasing: bool, skip: int = 0
    ) -> torch.Tensor:
        y, save = _forward(twiddle, x, increasing, STORE_LEVELS, skip)
        ctx.save_for_backward(twiddle, x)
        ctx.increasing, ctx.levels, ctx.skip = increasing, save, skip
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        twiddle, x = ctx.saved_tensors
        need_tw, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gtw, gx = _backward(twiddle, x, gy, ctx.increasing, ctx.levels, need_tw, need_x, ctx.skip)
        ctx.levels = None
        return (gtw, gx) + (None,) * (len(ctx.needs_input_grad) - 2)  # increasing[, skip]


def butterfly_multiply_tiled(
    twiddle: torch.Tensor, x: torch.Tensor, increasing_stride: bool = True, skip: int = 0
) -> torch.Tensor:
    """y = B x (reference semantics) with the compiled kernels; autograd when needed.

    skip > 0 leaves out each block's levels of stride < 2**skip (as if their twiddles were the
    identity). The caller checks `tiled_dtype(twiddle, x)` first.
    """
    tw, x = _prepare(twiddle, x)
    if torch.is_grad_enabled() and (tw.requires_grad or x.requires_grad):
        return TiledButterfly.apply(tw, x, increasing_stride, skip)
    return _forward(tw, x, increasing_stride, False, skip)[0]
