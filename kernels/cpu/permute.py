"""Relaxed permutations with fixed probabilities on the CPU: the compiled mix_* chain.

`RelaxedPermutationPlan(probs, n, top_only)` computes what kernels.permutation.Permutation
computes for those probabilities (forward only, no autograd), for real or complex rows: the
two steps of each level (even/odd mix, then the half reversals) as index and coefficient
arrays (csource_mix.py). The coefficients are 1 - p and p in x's real dtype, as torch rounds
them, so results match the torch path to the last bit on real inputs.
"""

from __future__ import annotations

import ctypes

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
