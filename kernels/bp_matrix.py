"""The learned matrix of B P (tied twiddles, relaxed permutation) in O(n^2), with few passes.

M_k = BF_k (I_2 (x) M_{k/2}) Q_k (docs/protocol.md section 7), M_2 = BF_2. One level is one autograd
Function: the column reversals of Q_k = R E act on the half-size M_{k/2} (row scaling commutes
with column ops), the scaling writes the k x k block once, and the even/odd mix E reads it
through a strided view. Every tensor may carry leading (trial) dims; probs are real.

On the CPU the relaxed levels run as compiled kernels where a C compiler is available
(kernels/cpu/columns.py; COMPILED); the torch Functions below are the fallback and reference.

Shapes: mat (..., s, s); twiddle rows of one level t (..., s, 2, 2) with t[r] =
[[D1[r], D2[r]], [D3[r], D4[r]]]; probs p (..., 3) = (even/odd, reverse first half, reverse
second half) as in kernels/permutation.py.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kernels.cpu import columns
from kernels.cpu.tiled import butterfly_multiply_tiled
from kernels.multiply import butterfly_multiply, route
from kernels.reference import log2_exact


def _rdot(x: torch.Tensor, y: torch.Tensor, dims: int) -> torch.Tensor:
    """sum of Re(conj(x) y) over the last `dims` dims (x, y broadcast), leading dims kept."""
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
        dims += 1
    if x.shape == y.shape and x.is_contiguous() and y.is_contiguous():  # no temporary
        return torch.einsum("...k,...k->...", x.flatten(-dims), y.flatten(-dims))
    return (x * y).sum(dim=tuple(range(-dims, 0)))


class _BPLevel(torch.autograd.Function):
    """(mat, t, p) -> BF_{2s} (I_2 (x) mat) Q_{2s} with Q = R E relaxed by p."""

    @staticmethod
    def forward(ctx, mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        lead, s = mat.shape[:-2], mat.shape[-1]
        pc = p.to(mat.dtype)
        flipped = mat.flip(-1)
        # a[r, h, j] = (mat R_h)[r, j]: column reversal mix of half h, on the half-size matrix
        a = torch.lerp(mat.unsqueeze(-2), flipped.unsqueeze(-2), pc[..., None, 1:3, None])
        ai = a.transpose(-1, -2).contiguous()  # (r, i, b): the same, columns interleaved
        tt = t.transpose(-3, -2)  # (a, r, h): D1..D4 as tt[0, :, 0], tt[0, :, 1], ...
        # z = (1 - p0) Y + p0 Y E' with Y = BF (I (x) mat) R: rows (a, r), columns (h, j);
        # column 2 i + b of Y E' is column b s + i of Y. Both terms are written in z's layout.
        z = torch.empty(*lead, 2, s, 2, s, dtype=torch.result_type(t, a))
        torch.mul(((1 - pc[..., 0, None, None, None]) * tt).unsqueeze(-1), a.unsqueeze(-4), out=z)
        z.view(*lead, 2, s, s, 2).addcmul_(
            (pc[..., 0, None, None, None] * tt).unsqueeze(-2), ai.unsqueeze(-4)
        )
        ctx.save_for_backward(flipped - mat, a, ai, t, p)
        return z.view(*lead, 2 * s, 2 * s)

    @staticmethod
    def backward(ctx, gz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dmat, a, ai, t, p = ctx.saved_tensors
        lead, s = dmat.shape[:-2], dmat.shape[-1]
        gz = gz.contiguous()
        pc = p.to(gz.dtype)
        p0 = pc[..., 0, None, None, None]
        g1 = gz.view(*lead, 2, s, 2, s)  # (a, r, h, j)
        g2 = gz.view(*lead, 2, s, s, 2)  # (a, r, i, b)
        tt = t.transpose(-3, -2)
        gt = gp = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            c1 = (g1 * a.conj().unsqueeze(-4)).sum(-1)  # (a, r, h): <Y's term, unweighted>
            c2 = (g2 * ai.conj().unsqueeze(-4)).sum(-2)
            gt = torch.lerp(c1, c2, p0).transpose(-3, -2)
            if ctx.needs_input_grad[2]:
                gp = [_rdot(c2 - c1, tt, 3)]
        w1, w2 = ((1 - p0) * tt).conj(), (p0 * tt).conj()
        ga = torch.addcmul(
            g1[..., 0, :, :, :] * w1[..., 0, :, :, None],
            g1[..., 1, :, :, :],
            w1[..., 1, :, :, None],
        )  # (r, h, j)
        gai = torch.addcmul(
            g2[..., 0, :, :, :] * w2[..., 0, :, None, :],
            g2[..., 1, :, :, :],
            w2[..., 1, :, None, :],
        )  # (r, i, b)
        ga += gai.transpose(-1, -2)
        u, v = ga[..., 0, :], ga[..., 1, :]
        p1, p2 = pc[..., 1, None, None], pc[..., 2, None, None]
        gmat = (1 - p1) * u + (1 - p2) * v + (p1 * u + p2 * v).flip(-1)
        if gp is not None:
            gp += [_rdot(u, dmat, 2), _rdot(v, dmat, 2)]
            gp = torch.stack(gp, dim=-1).to(p.dtype)
        return gmat, gt, gp


# Below this many output entries a level runs as plain autograd ops (fewer Python calls).
FUSED_MIN_ENTRIES = 1 << 18  # measured: below it the plain ops are cheaper


def _bp_level_composite(mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """_BPLevel's forward as autograd ops: cheaper for small blocks."""
    lead, s = mat.shape[:-2], mat.shape[-1]
    pc = p.to(mat.dtype)
    a = torch.lerp(mat.unsqueeze(-2), mat.flip(-1).unsqueeze(-2), pc[..., None, 1:3, None])
    y = t.transpose(-3, -2).unsqueeze(-1) * a.unsqueeze(-4)  # (a, r, h, j)
    y = y.reshape(*lead, 2 * s, 2 * s)
    ye = y.view(*lead, 2 * s, 2, s).transpose(-1, -2).reshape(*lead, 2 * s, 2 * s)
    return torch.lerp(y, ye, pc[..., 0, None, None])


# Relaxed levels (bp_level, column_levels) through the compiled kernels of kernels/cpu/columns.py
# where they fit (CPU, a compiler): measured faster than either torch path at every size. False
# keeps the torch paths below, which are also the reference the tests compare against.
COMPILED = True


def compiled_levels(device: torch.device) -> bool:
    """Whether relaxed levels on `device` run compiled (COMPILED, the CPU, the library): the
    size thresholds here and in kernels/butterfly.py were measured for each case."""
    return COMPILED and device.type == "cpu" and columns.available()


def bp_level(mat: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """BF_{2s} (I_2 (x) mat) Q_{2s}: mat (..., s, s), t (..., s, 2, 2), p (..., 3) or None."""
    lead, s = mat.shape[:-2], mat.shape[-1]
    if p is None:
        y = t.transpose(-3, -2).unsqueeze(-1) * mat.unsqueeze(-2).unsqueeze(-4)
        return y.reshape(*lead, 2 * s, 2 * s)
    if COMPILED and columns.bp_level_fit(mat, t, p):
        return columns.bp_level(mat, t, p)
    if 4 * mat.numel() < FUSED_MIN_ENTRIES:
        return _bp_level_composite(mat, t, p)
    return _BPLevel.apply(mat, t, p)


def _level_probs(probs: torch.Tensor, level: int) -> torch.Tensor:
    """probs (..., levels or 1, 3) -> (..., 3) of `level` (0 is block size n)."""
    return probs[..., level if probs.shape[-2] > 1 else 0, :]


# Up to this n the matrix is built from dense pieces: B as a product of gathered twiddle
# entries and P as a chain of n x n level matrices (few large ops instead of many small ones).
# 32 with the compiled levels: measured faster than 64 for bp / bpp / bpbp at n = 32 .. 1024
# (bpbp n = 256: 5.0 vs 5.6 ms per step; batched x8 at n = 64: 4.6 vs 11.3 ms); 64 without.
SMALL_N = 32
SMALL_N_TORCH = 64


def small_n(device: torch.device) -> int:
    """SMALL_N, or SMALL_N_TORCH where the relaxed levels do not run compiled."""
    return SMALL_N if compiled_levels(device) else SMALL_N_TORCH


@lru_cache(maxsize=16)
def _twiddle_index(n: int, device: torch.device) -> torch.Tensor:
    """(m, n, n): B[i, j] = prod_l tw.flatten()[idx[l, i, j]] for a tied twiddle (n-1, 2, 2).

    Level l maps bit l of j to bit l of i, inside the block that i's lower l bits select.
    """
    m = log2_exact(n)
    i, j = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    return torch.stack(
        [
            4 * ((1 << lv) - 1 + i % (1 << lv)) + 2 * ((i >> lv) & 1) + ((j >> lv) & 1)
            for lv in range(m)
        ]
    )


def dense_butterfly(twiddle: torch.Tensor) -> torch.Tensor:
    """B (..., n, n) of a tied twiddle (..., n-1, 2, 2) as a product of gathered entries."""
    n = twiddle.shape[-3] + 1
    return twiddle.flatten(-3)[..., _twiddle_index(n, twiddle.device)].prod(dim=-3)


@lru_cache(maxsize=32)
def _level_basis(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(m-1, 8, n, n): level l's I (x) Q_k (k = n >> l) is sum_c w_c basis[l, c], with
    w = [1 - p1, p1, 1 - p2, p2] (x) [1 - p0, p0] (R's four parts times E's two)."""
    out = []
    for level in range(log2_exact(n) - 1):
        k = n >> level
        h = k // 2
        eye, rev = torch.eye(h), torch.eye(h).flip(-1)
        zero = torch.zeros(h, h)
        parts = [
            torch.block_diag(eye, zero),
            torch.block_diag(rev, zero),
            torch.block_diag(zero, eye),
            torch.block_diag(zero, rev),
        ]
        evenodd = torch.eye(k)[torch.cat([torch.arange(0, k, 2), torch.arange(1, k, 2)])]
        mats = [r @ e for r in parts for e in (torch.eye(k), evenodd)]
        out.append(torch.stack([torch.kron(torch.eye(n // k), q) for q in mats]))
    return torch.stack(out).to(dtype=dtype, device=device)


def dense_permutation(probs: torch.Tensor, n: int, top_only: bool = False) -> torch.Tensor:
    """The relaxed permutation's matrix P (..., n, n) (P x = permute(x, probs)), real."""
    levels = 1 if top_only else log2_exact(n) - 1
    p0, p1, p2 = probs.unbind(-1)
    r = torch.stack([1 - p1, p1, 1 - p2, p2], dim=-1)
    e = torch.stack([1 - p0, p0], dim=-1)
    w = (r.unsqueeze(-1) * e.unsqueeze(-2)).flatten(-2)  # (..., levels or 1, 8)
    mats = torch.einsum(
        "...lc,lcij->...lij", w, _level_basis(n, probs.dtype, probs.device)[:levels]
    )
    if mats.shape[-3] == 1 and levels > 1:
        mats = mats.expand(*mats.shape[:-3], levels, n, n)
    out = mats[..., levels - 1, :, :]  # P = L_{m-2} ... L_0: level 0 (size n) acts first
    for level in range(levels - 2, -1, -1):
        out = out @ mats[..., level, :, :]
    return out


def tied_bp_matrix(twiddle: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """The matrix of B P: twiddle (..., n-1, 2, 2) tied, probs (..., levels or 1, 3) or None.

    Returns (..., n, n). probs None means P = I; levels index block sizes n, n/2, ..., 4.
    """
    n = twiddle.shape[-3] + 1
    m = log2_exact(n)
    small = small_n(twiddle.device)
    if n <= small:
        mat = dense_butterfly(twiddle)
        if probs is None or n < 4:  # no permutation levels below size 4
            return mat
        return mat @ dense_permutation(probs, n).to(mat.dtype)
    mb = log2_exact(small) if small >= 2 else 1
    sub = None if probs is None else (probs[..., m - mb :, :] if probs.shape[-2] > 1 else probs)
    mat = tied_bp_matrix(twiddle[..., : (1 << mb) - 1, :, :], sub)  # M_b, b = small
    for level in range(mb, m):
        s = 1 << level  # the new factor has size 2s
        p = None if probs is None else _level_probs(probs, m - level - 1)
        mat = bp_level(mat, twiddle[..., s - 1 : 2 * s - 1, :, :], p)
    return mat


class _ColumnLevel(torch.autograd.Function):
    """(x (L, R, 2, h), p (L, 3)) -> x (I (x) Q_2h) in the layout (L, R, 2h); L = lead dims."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        pc = p.to(x.dtype)
        dx = x.flip(-1) - x
        a = torch.addcmul(x, dx, pc[..., None, 1:3, None])  # R: reverse each half
        ai = a.transpose(-1, -2).contiguous()  # E: column 2 i + b <- column b h + i
        z = torch.lerp(a.view(ai.shape), ai, pc[..., 0, None, None, None])
        ctx.save_for_backward(dx, a, ai, p)
        return z

    @staticmethod
    def backward(ctx, gz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dx, a, ai, p = ctx.saved_tensors
        gz = gz.contiguous()
        pc = p.to(gz.dtype)
        # ga[b, i] = (1 - p0) gz[b h + i] + p0 gz[2 i + b]
        ga = torch.lerp(gz.view(a.shape), gz.transpose(-1, -2), pc[..., 0, None, None, None])
        w = pc[..., None, 1:3, None]
        gx = torch.addcmul(ga, ga.flip(-1) - ga, w)
        gp = None
        if ctx.needs_input_grad[1]:
            gp0 = _rdot(gz, ai, 3) - _rdot(gz, a.view(ai.shape), 3)
            gr, dr = (
                (torch.view_as_real(ga), torch.view_as_real(dx)) if ga.is_complex() else (ga, dx)
            )
            gp12 = (gr * dr).sum(dim=(-3, -1) if not ga.is_complex() else (-4, -2, -1))
            gp = torch.cat([gp0.unsqueeze(-1), gp12], dim=-1).to(p.dtype)
        return gx, gp


def column_level(x: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """x (I (x) Q_k) for x (..., rows, n), Q_k one relaxed level, p (..., 3) (leading dims)."""
    lead, h = p.shape[:-1], k // 2
    xv = x.reshape(*lead, -1, 2, h)
    return _ColumnLevel.apply(xv, p).reshape(x.shape)


def column_levels(x: torch.Tensor, probs: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """x (I (x) Q_{k_0}) (I (x) Q_{k_1}) ... for x (..., rows, n), k_j = n >> levels[j], and
    probs (..., levels or 1, 3): one compiled pass (kernels/cpu/columns.py) where it fits, else
    column_level level by level (the reference)."""
    n = x.shape[-1]
    if probs.shape[-2] > 1:
        p = probs[..., levels, :]
    else:
        p = probs.expand(*probs.shape[:-2], len(levels), 3)
    if COMPILED and columns.columns_fit(x, p):
        return columns.relaxed_columns(x, p, tuple(n >> level for level in levels))
    for j, level in enumerate(levels):
        x = column_level(x, p[..., j, :], n >> level)
    return x


def permute_columns(x: torch.Tensor, probs: torch.Tensor, top_only: bool = False) -> torch.Tensor:
    """x P for x (..., rows, n) and a relaxed permutation's probs (..., levels or 1, 3)."""
    n = x.shape[-1]
    m = log2_exact(n)
    if n <= small_n(x.device):
        return x @ dense_permutation(probs, n, top_only).to(x.dtype)
    # A P applies Q_4 first, Q_n last
    return column_levels(x, probs, [0] if top_only else list(range(m - 2, -1, -1)))


def gather_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[..., :, cols] for x (..., rows, n) and cols (..., n) (leading dims broadcast)."""
    idx = cols.unsqueeze(-2).expand(*x.shape[:-2], x.shape[-2], x.shape[-1])
    return torch.gather(x, -1, idx)


def right_butterfly(x: torch.Tensor, twiddle: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """x B for x (..., rows, n) and a tied twiddle (..., n-1, 2, 2), leaving out B's `skip`
    lowest levels (strides 1 .. 2**(skip-1)). Rows go through butterfly_multiply as B^T x; on
    its compiled training path the kernel skips those levels, elsewhere their twiddles are I."""
    n = x.shape[-1]
    tw = twiddle.transpose(-1, -2)  # x B = (B^T x^T)^T; B^T applies the size-n factor first
    lead = twiddle.shape[:-3]
    tws, xs = tw.reshape(-1, 1, n - 1, 2, 2), x.reshape(-1, *x.shape[-2:])
    if skip and route(tws[0], xs[0]) == "cpu-tiled":  # the kernel leaves those levels out
        if not lead:
            return butterfly_multiply_tiled(tws[0], x, False, skip)
        rows = [butterfly_multiply_tiled(t, xt, False, skip) for t, xt in zip(tws, xs, strict=True)]
        return torch.stack(rows).reshape(x.shape)
    if skip:
        eye = torch.eye(2, dtype=tw.dtype, device=tw.device).expand(
            *tw.shape[:-3], (1 << skip) - 1, 2, 2
        )
        tw = torch.cat([eye, tw[..., (1 << skip) - 1 :, :, :]], dim=-3)
    if not lead:
        return butterfly_multiply(tw.unsqueeze(0), x, False)
    rows = [
        butterfly_multiply(t.unsqueeze(0), xt, False)
        for t, xt in zip(tw.reshape(-1, n - 1, 2, 2), x.reshape(-1, *x.shape[-2:]), strict=True)
    ]
    return torch.stack(rows).reshape(x.shape)


def real_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Re(a @ b) for a (..., r, k), b (..., k, c), as one real matmul when a is complex:
    Re(a b) = [Re a, Im a] [Re b; -Im b], a's (re, im) pairs read in place (half the flops)."""
    if not a.is_complex():
        return a @ (b.real if b.is_complex() else b)
    if not b.is_complex():
        return a.real @ b
    ar = torch.view_as_real(a.resolve_conj().resolve_neg().contiguous()).flatten(-2)
    return ar @ torch.stack([b.real, -b.imag], dim=-2).flatten(-3, -2)


def times_bp(
    k: torch.Tensor, twiddle: torch.Tensor, probs: torch.Tensor, block: int, real: bool = False
) -> torch.Tensor:
    """K B P for K (..., rows, n), B P of tied twiddle (..., n-1, 2, 2) and relaxed probs.

    B P = B_top (I (x) B_b P_b) Q_2b ... Q_n (b = block): the top butterfly levels through
    butterfly_multiply, the b x b matrix B_b P_b (tied_bp_matrix) as one matmul on column
    blocks, then the permutation's levels of size 2b .. n as column ops: O(rows n (log(n/b) + b)).
    real: return Re(K B P) only; P's levels have real weights, so the real part is taken at the
    matmul (real_matmul) and the column levels run on a real matrix.
    """
    n = k.shape[-1]
    m, mb = log2_exact(n), log2_exact(block)
    x = right_butterfly(k, twiddle, skip=mb)
    sub = probs[..., m - mb :, :] if probs.shape[-2] > 1 else probs
    nb = tied_bp_matrix(twiddle[..., : block - 1, :, :], sub)  # (..., b, b)
    lead = twiddle.shape[:-3]
    x = x.reshape(*lead, -1, block)
    x = (real_matmul(x, nb) if real else x @ nb).reshape(k.shape)
    return column_levels(x, probs, list(range(m - mb - 1, -1, -1)))
