"""Relaxed permutations with fixed probabilities on the CPU: the compiled mix_* chain.

`RelaxedPermutationPlan(probs, n, top_only)` computes what kernels.permutation.Permutation
computes for those probabilities (forward only, no autograd), for real or complex rows: the
two steps of each level (even/odd mix, then the half reversals) as index and coefficient
arrays (csource_mix.py). The coefficients are 1 - p and p in x's real dtype, as torch rounds
them, so results match the torch path to the last bit on real inputs.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu.compiled import forced_torch, library
from kernels.reference import log2_exact

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def relaxed_steps(
    probs: torch.Tensor, n: int, top_only: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, ca, cb), each (steps, n): step k maps x to ca[k] x + cb[k] x[q[k]]."""
    m = log2_exact(n)
    qs, cas, cbs = [], [], []
    for level in [0] if top_only else range(m - 1):
        k = n >> level
        h = k // 2
        p = probs[level if probs.shape[0] > 1 else 0].detach().to(dtype)
        idx = torch.arange(n).view(n // k, k)
        qs.append(torch.cat([idx[:, 0::2], idx[:, 1::2]], dim=1).reshape(n))
        cas.append((1 - p[0]).expand(n))
        cbs.append(p[0].expand(n))
        qs.append(torch.cat([idx[:, :h].flip(-1), idx[:, h:].flip(-1)], dim=1).reshape(n))
        halves = torch.stack([p[1], p[2]]).repeat_interleave(h).repeat(n // k)
        cas.append(1 - halves)
        cbs.append(halves)
    if not qs:
        empty = torch.zeros(0, n, dtype=dtype)
        return torch.zeros(0, n, dtype=torch.int64), empty, empty
    return torch.stack(qs), torch.stack(cas), torch.stack(cbs)


class RelaxedPermutationPlan:
    """P x for x (batch, n), P the relaxed permutation of `probs` (snapshot), via mix_* (row
    by row) up to ROWS_MAX_BATCH rows, via tl_mix_* (tiles of rows, vector gathers) above."""

    ROWS_MAX_BATCH = 4

    def __init__(self, probs: torch.Tensor, n: int, top_only: bool, dtype: torch.dtype):
        lib = library()
        if lib is None:
            raise RuntimeError("compiled CPU kernels unavailable")
        self.n, self.dtype = n, dtype
        self._real = _REAL.get(dtype, dtype)
        q, ca, cb = relaxed_steps(probs, n, top_only, self._real)
        self._steps = q.shape[0]
        # tiles: real and imaginary parts are separate planes, so the steps apply as they are
        self._tq = q.to(torch.int32).contiguous()
        self._tca, self._tcb = ca.contiguous(), cb.contiguous()
        if dtype.is_complex:  # rows: interleaved (re, im), element i is reals 2i and 2i + 1
            q = torch.stack([2 * q, 2 * q + 1], dim=-1).flatten(1)
            ca, cb = ca.repeat_interleave(2, dim=1), cb.repeat_interleave(2, dim=1)
        self._q = q.to(torch.int32).contiguous()  # int32: the compiler vectorises the gathers
        self._ca, self._cb = ca.contiguous(), cb.contiguous()
        self._width = n * (2 if dtype.is_complex else 1)
        self._rows, self._tiles = lib.mix[self._real], lib.tl_mix[self._real]
        self._tile = lib.tl_rows[self._real]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n or x.dtype != self.dtype or not x.is_cpu:
            raise ValueError(f"x must be a CPU {self.dtype} tensor (batch, {self.n})")
        x = x.resolve_conj().resolve_neg()
        if x.shape[0] > self.ROWS_MAX_BATCH:
            return self._tiled(x)
        x = x.contiguous()
        out = torch.empty_like(x)
        tmp = torch.empty(self._width, dtype=self._real)
        args = (ctypes.c_int64 * 9)(
            x.data_ptr(), out.data_ptr(), x.shape[0], self._width, self._steps,
            self._q.data_ptr(), self._ca.data_ptr(), self._cb.data_ptr(), tmp.data_ptr(),
        )  # fmt: skip
        self._rows(args)
        return out

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        from kernels.cpu.tiled import _parts

        out = torch.empty(x.shape, dtype=x.dtype)
        cplx = x.is_complex()
        work = torch.empty(2 * self.n * self._tile * (2 if cplx else 1), dtype=self._real)
        xr, xi, xs0, xs1 = _parts(x)
        yr, yi, ys0, ys1 = _parts(out)
        args = (ctypes.c_int64 * 16)(
            xr, xi, xs0, xs1, yr, yi, ys0, ys1, x.shape[0], self.n, self._steps,
            self._tq.data_ptr(), self._tca.data_ptr(), self._tcb.data_ptr(), cplx,
            work.data_ptr(),
        )  # fmt: skip
        self._tiles(args)
        return out


class PermutationPlanCache:
    """Inference plans of a layer's learned permutations, rebuilt when their logits change.

    Keyed per permutation on its logits' storage and version counter, its `hard` flag's
    version and x's dtype. Not copied with the layer (the plans hold ctypes pointers).
    """

    def __init__(self) -> None:
        self._plans: dict[int, tuple[tuple, RelaxedPermutationPlan]] = {}

    def lookup(self, perm: torch.nn.Module, dtype: torch.dtype) -> RelaxedPermutationPlan | None:
        """The plan for `perm` (a kernels.permutation.Permutation); None without a compiler."""
        if forced_torch() or library() is None:
            return None
        logits, hard = perm.logits, perm.hard
        key = (logits.data_ptr(), logits._version, hard._version, dtype)
        hit = self._plans.get(id(perm))
        if hit is None or hit[0] != key:
            hit = (key, RelaxedPermutationPlan(perm.probs(), perm.n, perm.top_only, dtype))
            self._plans[id(perm)] = hit
        return hit[1]

    def __getstate__(self) -> dict:
        return {"_plans": {}}


# --- training: the same chain with autograd (input and probability gradients) ---------------


@functools.lru_cache(maxsize=64)
def _chain_indices(n: int, top_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, q_inverse, first) for the steps of relaxed_steps: q and its inverse (steps, n) int32,
    first (steps, n) float: 1 where a reversal step reads the first-half probability."""
    levels = 1 if top_only else log2_exact(n) - 1
    q, _, _ = relaxed_steps(torch.zeros(levels, 3), n, top_only, torch.float64)
    first = torch.zeros(q.shape, dtype=torch.float64)
    for level in range(levels):
        k = n >> level
        first[2 * level + 1] = (torch.arange(n) % k < k // 2).to(torch.float64)
    qinv = torch.argsort(q, dim=1)
    return q.to(torch.int32).contiguous(), qinv.to(torch.int32).contiguous(), first


def _coefficients(probs: torch.Tensor, levels: int, first: torch.Tensor) -> torch.Tensor:
    """cb (steps, n) of relaxed_steps for probs (levels or 1, 3), vectorised: p0 on even/odd
    steps, p1 / p2 on the first / second halves of the reversal steps."""
    p = probs.expand(levels, 3)
    f = first.view(levels, 2, -1)[:, 1].to(p.dtype)
    even = p[:, :1].expand_as(f)
    rev = torch.where(f > 0, p[:, 1:2].expand_as(f), p[:, 2:3].expand_as(f))
    return torch.stack([even, rev], dim=1).reshape(2 * levels, -1).contiguous()


class _RelaxedPermute(torch.autograd.Function):
    """y = P x for the relaxed permutation of probs, with gradients for x and probs: the chain
    of steps through tl_mix_* forward, and tl_mix_grad_* (the chain again per tile of rows,
    then the transposed steps) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, probs: torch.Tensor, top_only: bool) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[1]
        real = _REAL.get(x.dtype, x.dtype)
        q, qinv, first = _chain_indices(n, top_only)
        levels = 1 if top_only else log2_exact(n) - 1
        cb = _coefficients(probs.detach().to(real), levels, first)
        ca = (1 - cb).contiguous()
        x = x.resolve_conj().resolve_neg()
        y = _mix_tiles(x, q, ca, cb)
        ctx.save_for_backward(x, ca, cb)
        ctx.chain = (q, qinv, first, levels, probs.shape[0], probs.dtype)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        from kernels.cpu.tiled import _parts

        lib = library()
        assert lib is not None
        x, ca, cb = ctx.saved_tensors
        q, qinv, first, levels, rows, pdtype = ctx.chain
        (batch, n), real, cplx = x.shape, ca.dtype, x.is_complex()
        gy = gy.to(x.dtype).resolve_conj().resolve_neg()
        gx = torch.empty(batch, n, dtype=x.dtype) if ctx.needs_input_grad[0] else None
        sums = torch.zeros(q.shape, dtype=torch.float64)
        lvl = n * lib.tl_rows[real] * (2 if cplx else 1)
        keep = torch.empty(q.shape[0] * lvl, dtype=real)
        work = torch.empty(2 * lvl, dtype=real)
        cbt = torch.gather(cb, 1, qinv.long()).contiguous()
        if batch:
            gr, gi, gs0, gs1 = _parts(gy)
            xr, xi, xs0, xs1 = _parts(x)
            dr, di, ds0, ds1 = _parts(gx)
            args = (ctypes.c_int64 * 24)(
                gr, gi, gs0, gs1, xr, xi, xs0, xs1, dr, di, ds0, ds1, batch, n, q.shape[0],
                q.data_ptr(), qinv.data_ptr(), ca.data_ptr(), cb.data_ptr(), cbt.data_ptr(),
                cplx, keep.data_ptr(), work.data_ptr(), sums.data_ptr(),
            )  # fmt: skip
            lib.tl_mix_grad[real](args)
        gprobs = None
        if ctx.needs_input_grad[1]:
            head = (sums * first).sum(-1).view(levels, 2)
            total = sums.sum(-1).view(levels, 2)
            gl = torch.stack([total[:, 0], head[:, 1], total[:, 1] - head[:, 1]], dim=-1)
            gprobs = (gl.sum(0, keepdim=True) if rows == 1 else gl).to(pdtype)
        return gx, gprobs, None


def _mix_tiles(
    x: torch.Tensor, q: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor
) -> torch.Tensor:
    """The chain of steps (q, ca, cb) on every row of x (batch, n) through tl_mix_*."""
    from kernels.cpu.tiled import _parts

    lib = library()
    assert lib is not None
    real, (batch, n), cplx = ca.dtype, x.shape, x.is_complex()
    out = torch.empty(x.shape, dtype=x.dtype)
    work = torch.empty(2 * n * lib.tl_rows[real] * (2 if cplx else 1), dtype=real)
    if batch:
        xr, xi, xs0, xs1 = _parts(x)
        yr, yi, ys0, ys1 = _parts(out)
        args = (ctypes.c_int64 * 16)(
            xr, xi, xs0, xs1, yr, yi, ys0, ys1, batch, n, q.shape[0], q.data_ptr(),
            ca.data_ptr(), cb.data_ptr(), cplx, work.data_ptr(),
        )  # fmt: skip
        lib.tl_mix[real](args)
    return out


def relaxed_permute(x: torch.Tensor, probs: torch.Tensor, top_only: bool) -> torch.Tensor:
    """P x with autograd through the compiled chain: Permutation.apply's values and gradients
    for CPU float32/64 and complex64/128 x (batch, n); needs the compiled library."""
    if x.dim() != 2 or not x.is_cpu or x.dtype not in (*_REAL, *_REAL.values()):
        raise ValueError("x must be a CPU (batch, n) float or complex tensor")
    if library() is None:
        raise RuntimeError("compiled CPU kernels unavailable")
    return _RelaxedPermute.apply(x, probs, top_only)
