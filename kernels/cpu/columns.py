"""Relaxed permutation levels on a matrix's columns with autograd: the cl_* and bpl_* kernels.

`relaxed_columns(x, probs, ks)` is x (I (x) Q_{k_0}) ... (I (x) Q_{k_{L-1}}) for x (..., rows, n)
and probs (..., L, 3), what a chain of kernels.bp_matrix.column_level calls computes (see
csource_cols.py for the arithmetic), with gradients for x and probs (first derivatives only).
One kernel call runs the whole chain row by row: the matrix is read and written once, and the
backward saves only x. `columns_fit` says whether a pair of tensors can take this path.

`bp_level(mat, t, p)` is kernels.bp_matrix._BPLevel (BF_2s (I_2 (x) mat) Q_2s) the same way:
row r of mat, expanded by its twiddle row, goes through one column level of size 2s
(`bp_level_fit` checks the tensors).
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable

from kernels.cpu.compiled import forced_torch, library

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def available() -> bool:
    """Whether the library is loaded (building it if needed) and not forced off by
    $BUTTERFLY_CPU_BACKEND."""
    return not forced_torch() and library() is not None


def columns_fit(x: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether the compiled kernels apply: CPU, a supported dtype, the same leading dims, and
    the library available()."""
    return (
        x.device.type == "cpu"
        and probs.device.type == "cpu"
        and x.dtype in _DTYPES
        and not probs.is_complex()
        and x.shape[:-2] == probs.shape[:-2]
        and available()
    )


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(L, rows, n[, 2]) real view of x (..., rows, n), contiguous, conj/neg bits resolved."""
    x = x.resolve_conj().resolve_neg().contiguous().reshape(-1, *x.shape[-2:])
    return torch.view_as_real(x) if x.is_complex() else x


class _Columns(torch.autograd.Function):
    """(x (..., rows, n), p (..., L, 3), ks) -> x (I (x) Q_{k_0}) ... (I (x) Q_{k_{L-1}})."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
        real = _REAL.get(x.dtype, x.dtype)
        lib = library()
        assert lib is not None
        xf = _flat(x)
        lead, rows, n = xf.shape[:3]
        pc = p.detach().to(real).contiguous()
        karr = torch.tensor(ks, dtype=torch.int64)
        z = torch.empty(x.shape, dtype=x.dtype)
        work = torch.empty(4 * n + max(ks, default=2), dtype=real)
        args = (ctypes.c_int64 * 10)(
            xf.data_ptr(), z.data_ptr(), lead, rows, n, len(ks), karr.data_ptr(),
            pc.data_ptr(), x.is_complex(), work.data_ptr(),
        )  # fmt: skip
        lib.cl_forward[real](args)
        ctx.save_for_backward(x, p)
        ctx.ks = ks
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, p = ctx.saved_tensors
        ks = ctx.ks
        real = _REAL.get(x.dtype, x.dtype)
        lib = library()
        assert lib is not None
        xf, gf = _flat(x), _flat(gz.to(x.dtype))
        lead, rows, n = xf.shape[:3]
        pc = p.detach().to(real).contiguous()
        karr = torch.tensor(ks, dtype=torch.int64)
        gx = torch.empty(x.shape, dtype=x.dtype)
        gacc = torch.zeros(*p.shape, dtype=torch.float64) if ctx.needs_input_grad[1] else None
        work = torch.empty((len(ks) + 2) * 2 * n + 2 * max(ks, default=2), dtype=real)
        args = (ctypes.c_int64 * 12)(
            xf.data_ptr(), gf.data_ptr(), gx.data_ptr(), 0 if gacc is None else gacc.data_ptr(),
            lead, rows, n, len(ks), karr.data_ptr(), pc.data_ptr(), x.is_complex(),
            work.data_ptr(),
        )  # fmt: skip
        lib.cl_backward[real](args)
        gp = None if gacc is None else gacc.to(p.dtype)
        return gx, gp, None


def relaxed_columns(x: torch.Tensor, probs: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """x (I (x) Q_{k_0}) ... for x (..., rows, n), probs (..., len(ks), 3): levels in order.

    The caller checks `columns_fit(x, probs)` first; each k divides n and is at least 2.
    """
    n = x.shape[-1]
    if any(k < 2 or n % k for k in ks) or probs.shape[-2:] != (len(ks), 3):
        raise ValueError(f"levels {ks} and probs {tuple(probs.shape)} do not fit n = {n}")
    return _Columns.apply(x, probs, tuple(int(k) for k in ks))


def bp_level_fit(mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether bp_level applies: as columns_fit, with t of mat's dtype and the same lead dims."""
    lead = mat.shape[:-2]
    return (
        t.dtype == mat.dtype
        and t.shape[:-3] == lead
        and t.device.type == "cpu"
        and columns_fit(mat, p.unsqueeze(-2))
    )


class _BPLevel(torch.autograd.Function):
    """(mat (..., s, s), t (..., s, 2, 2), p (..., 3)) -> BF_2s (I_2 (x) mat) Q_2s."""

    @staticmethod
    def forward(ctx, mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        real = _REAL.get(mat.dtype, mat.dtype)
        lib = library()
        assert lib is not None
        mf, tf = _flat(mat), _flat(t.flatten(-2))
        lead, s = mf.shape[:2]
        pc = p.detach().to(real).contiguous()
        z = torch.empty(*mat.shape[:-2], 2 * s, 2 * s, dtype=mat.dtype)
        work = torch.empty(20 * s, dtype=real)
        args = (ctypes.c_int64 * 8)(
            mf.data_ptr(), tf.data_ptr(), z.data_ptr(), lead, s, pc.data_ptr(), mat.is_complex(),
            work.data_ptr(),
        )  # fmt: skip
        lib.bpl_forward[real](args)
        ctx.save_for_backward(mat, t, p)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mat, t, p = ctx.saved_tensors
        real = _REAL.get(mat.dtype, mat.dtype)
        lib = library()
        assert lib is not None
        mf, tf, gf = _flat(mat), _flat(t.flatten(-2)), _flat(gz.to(mat.dtype))
        lead, s = mf.shape[:2]
        pc = p.detach().to(real).contiguous()
        gmat = torch.empty(mat.shape, dtype=mat.dtype)
        gt = torch.empty(t.shape, dtype=t.dtype) if ctx.needs_input_grad[1] else None
        gacc = torch.zeros(p.shape, dtype=torch.float64) if ctx.needs_input_grad[2] else None
        work = torch.empty(20 * s, dtype=real)
        args = (ctypes.c_int64 * 11)(
            mf.data_ptr(), tf.data_ptr(), gf.data_ptr(), gmat.data_ptr(),
            0 if gt is None else gt.data_ptr(), 0 if gacc is None else gacc.data_ptr(), lead, s,
            pc.data_ptr(), mat.is_complex(), work.data_ptr(),
        )  # fmt: skip
        lib.bpl_backward[real](args)
        return gmat, gt, None if gacc is None else gacc.to(p.dtype)


def bp_level(mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """BF_2s (I_2 (x) mat) Q_2s for mat (..., s, s), t (..., s, 2, 2), p (..., 3) (relaxed).

    The caller checks `bp_level_fit(mat, t, p)` first.
    """
    s = mat.shape[-1]
    if mat.shape[-2] != s or t.shape[-3:] != (s, 2, 2) or p.shape[-1] != 3:
        raise ValueError(f"mat {tuple(mat.shape)}, t {tuple(t.shape)}, p {tuple(p.shape)}")
    return _BPLevel.apply(mat, t, p)
