"""The @triton.jit kernels: a fused sub-butterfly forward and its fused backward.

A program owns a tile (BLOCK_B, LOB, C) of x: rows row0.., columns
x[row, hi * C * ST + i * ST + lo0 + t] for t < LOB, i < C, with ST = 2**L0. It applies the
c = C_LOG consecutive levels L0 .. L0 + c - 1 (local level l of the tile is global level
L0 + l) without leaving the chip. With L0 = 0 the tile is a contiguous chunk (the whole row
when C = n); with L0 > 0 it holds LOB neighbouring residue classes mod ST, so that loads stay
coalesced in runs of LOB.

Levels are applied in a loop, not unrolled: every level pairs the *lowest* bit of the tile's
position (increasing stride) or the highest (decreasing), split with tl.reshape/tl.split and
joined back rotated by one bit, so that the next level's bit comes to the same place (a
perfect shuffle). Shapes are therefore the same at every level, the level index only enters
twiddle addresses, and code size (hence compile time) does not grow with c; after c
rotations of c bits the tile is back in natural order.

Complex data: x, y and the gradients are read and written interleaved (torch's own layout,
passed as torch.view_as_real pointers) and split into re / im planes on chip, so a complex
call makes no extra pass over memory. COMPLEX: the data is complex; X_CPLX: the launch's
input is (a real input of a complex problem has im = 0); TW_CPLX: the twiddles are (a real
twiddle on complex data applies to re and im alike). Twiddles arrive as planes (nblocks, 4,
TW) of D1..D4 (laid out once per twiddle version by the launcher): tied, TW = n - 1 with
level L's rows at 2**L - 1 + j; untied, TW = m * n/2 with level L at L * n/2 + slot,
permuted into the order the programs read them (pair_order) so that every twiddle load and
twiddle-grad store is contiguous. Twiddles and accumulation use the twiddle planes' dtype
(fp32 or fp64); x and y may be fp16 / bf16 / fp32 / fp64 and are converted on load / store.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads the same variable when these kernels are decorated (import time).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_offsets(n, row0, row_end, L0, q, C_LOG: tl.constexpr, LOB: tl.constexpr,
                  BLOCK_B: tl.constexpr):
    """Offsets (BLOCK_B, LOB, C) int64 and row mask of program column q's tile; the
    program's first slot q * W/2 in a level's kernel pair order, and its lo0."""
    C: tl.constexpr = 1 << C_LOG
    ST = 1 << L0
    nlo = ST // LOB
    hi = q // nlo
    lo0 = (q % nlo) * LOB
    cols = hi * (C * ST) + tl.arange(0, C)[None, :] * ST + lo0 + tl.arange(0, LOB)[:, None]
    rows = row0 + tl.arange(0, BLOCK_B)
    offs = rows.to(tl.int64)[:, None, None] * n + cols[None, :, :]
    mask = (rows < row_end)[:, None, None]  # broadcast by tl.load / tl.store to the tile
    return offs, mask, q * (C * LOB // 2), lo0


@triton.jit
def _twiddles(twr, twi, TW, n, L0, qb, lo0, lev, C_LOG: tl.constexpr, LOB: tl.constexpr,
              TIED: tl.constexpr, TW_CPLX: tl.constexpr):
    """D1..D4 (re, then im; im = re when not TW_CPLX) of local level lev, each (1, LOB, C/2)
    matching the split halves, and each half element's slot (LOB, C/2) in kernel pair order.

    Untied twiddles are stored in kernel order (see pair_order), so these loads are
    contiguous. Tied ones are gathered: after the split, element h of the halves is the
    pair (local group gl, local offset jl) with h = jl * G + gl, G = 2**(C_LOG-1-lev),
    whichever way the tile was rotated.
    """
    HALF: tl.constexpr = (1 << C_LOG) // 2
    h = tl.arange(0, HALF)[None, :]
    t = tl.arange(0, LOB)[:, None]
    slot = qb + t * HALF + h
    level = L0 + lev
    if TIED:
        off = (1 << level) - 1 + (h >> (C_LOG - 1 - lev)) * (1 << L0) + lo0 + t
    else:
        off = level * (n // 2) + slot
    d1r = tl.expand_dims(tl.load(twr + off), 0)
    d2r = tl.expand_dims(tl.load(twr + TW + off), 0)
    d3r = tl.expand_dims(tl.load(twr + 2 * TW + off), 0)
    d4r = tl.expand_dims(tl.load(twr + 3 * TW + off), 0)
    d1i, d2i, d3i, d4i = d1r, d2r, d3r, d4r
    if TW_CPLX:
        d1i = tl.expand_dims(tl.load(twi + off), 0)
        d2i = tl.expand_dims(tl.load(twi + TW + off), 0)
        d3i = tl.expand_dims(tl.load(twi + 2 * TW + off), 0)
        d4i = tl.expand_dims(tl.load(twi + 3 * TW + off), 0)
    return d1r, d2r, d3r, d4r, d1i, d2i, d3i, d4i, slot


def pair_order(n: int, passes: tuple) -> torch.Tensor:
    """Kernel pair order: entry L * n/2 + slot is the untied index L * n/2 + p of the pair
    that the program q, residue t, half element h at slot = q * W/2 + t * C/2 + h handles
    at level L (each level belongs to one pass; within it, this is a bijection of the n/2
    pairs). passes: objects with level0, c_log, lob. Returns (m * n/2,) int64 on CPU."""
    m = n.bit_length() - 1
    order = torch.empty(m, n // 2, dtype=torch.int64)
    for ps in passes:
        c, st, lob = 1 << ps.c_log, 1 << ps.level0, ps.lob
        q = torch.arange(n // (c * lob))[:, None, None]
        t = torch.arange(lob)[None, :, None]
        h = torch.arange(c // 2)[None, None, :]
        hi, lo = q // (st // lob), (q % (st // lob)) * lob + t
        for lev in range(ps.c_log):
            glog = ps.c_log - 1 - lev
            # global group g = hi * G + gl, j = jl * ST + lo, p = g * 2**level + j
            g = (hi << glog) + (h & ((1 << glog) - 1))
            p = g * (1 << (ps.level0 + lev)) + (h >> glog) * st + lo
            order[ps.level0 + lev] = p.reshape(-1)
    return (order + torch.arange(m)[:, None] * (n // 2)).reshape(-1)


def fold_tied(d: torch.Tensor) -> torch.Tensor:
    """Grad w.r.t. a tied twiddle from the grad (nblocks, m, n/2, 2, 2) of its untied form:
    level l's n/2s groups share rows [2**l - 1, 2**(l+1) - 1) (the adjoint of untie)."""
    nb, m, half = d.shape[:3]
    return torch.cat([d[:, lv].reshape(nb, half >> lv, 1 << lv, 2, 2).sum(1) for lv in range(m)],
                     dim=1)


@triton.jit
def _split(vr, vi, FROM_MSB: tl.constexpr, COMPLEX: tl.constexpr, BLOCK_B: tl.constexpr,
           LOB: tl.constexpr, C_LOG: tl.constexpr):
    """Planes (BLOCK_B, LOB, C) -> halves (BLOCK_B, LOB, C/2) on the lowest / highest
    position bit: top re, bottom re, top im, bottom im (im = re when not COMPLEX).

    tl.split only splits a trailing axis of 2, hence the permute for the highest bit.
    """
    HALF: tl.constexpr = (1 << C_LOG) // 2
    if FROM_MSB:
        tr, br = tl.split(tl.permute(tl.reshape(vr, (BLOCK_B, LOB, 2, HALF)), (0, 1, 3, 2)))
    else:
        tr, br = tl.split(tl.reshape(vr, (BLOCK_B, LOB, HALF, 2)))
    ti, bi = tr, br
    if COMPLEX:
        if FROM_MSB:
            ti, bi = tl.split(tl.permute(tl.reshape(vi, (BLOCK_B, LOB, 2, HALF)), (0, 1, 3, 2)))
        else:
            ti, bi = tl.split(tl.reshape(vi, (BLOCK_B, LOB, HALF, 2)))
    return tr, br, ti, bi


@triton.jit
def _join(tr, br, ti, bi, vi, TO_MSB: tl.constexpr, COMPLEX: tl.constexpr,
          BLOCK_B: tl.constexpr, LOB: tl.constexpr, C_LOG: tl.constexpr):
    """Halves -> planes (BLOCK_B, LOB, C), the pair bit becoming the highest / lowest
    position bit; returns vi unchanged when not COMPLEX."""
    vr = tl.join(tr, br)
    if TO_MSB:
        vr = tl.permute(vr, (0, 1, 3, 2))
    vr = tl.reshape(vr, (BLOCK_B, LOB, 1 << C_LOG))
    if COMPLEX:
        vi = tl.join(ti, bi)
        if TO_MSB:
            vi = tl.permute(vi, (0, 1, 3, 2))
        vi = tl.reshape(vi, (BLOCK_B, LOB, 1 << C_LOG))
    return vr, vi


@triton.jit
def _fwd_step(xr, xi, twr, twi, TW, n, L0, qb, lo0, step, C_LOG: tl.constexpr,
              LOB: tl.constexpr, TIED: tl.constexpr, INCREASING: tl.constexpr,
              COMPLEX: tl.constexpr, TW_CPLX: tl.constexpr, BLOCK_B: tl.constexpr):
    """Apply the step-th level (application order) to tile planes in rotated layout step."""
    lev = step if INCREASING else C_LOG - 1 - step
    d1r, d2r, d3r, d4r, d1i, d2i, d3i, d4i, _ = _twiddles(twr, twi, TW, n, L0, qb, lo0, lev,
                                                          C_LOG, LOB, TIED, TW_CPLX)
    tr, br, ti, bi = _split(xr, xi, not INCREASING, COMPLEX, BLOCK_B, LOB, C_LOG)
    if TW_CPLX:
        ytr = d1r * tr - d1i * ti + d2r * br - d2i * bi
        yti = d1r * ti + d1i * tr + d2r * bi + d2i * br
        ybr = d3r * tr - d3i * ti + d4r * br - d4i * bi
        ybi = d3r * ti + d3i * tr + d4r * bi + d4i * br
    else:  # real twiddles: the same real 2x2 on re and on im
        ytr = d1r * tr + d2r * br
        ybr = d3r * tr + d4r * br
        yti, ybi = ytr, ybr
        if COMPLEX:
            yti = d1r * ti + d2r * bi
            ybi = d3r * ti + d4r * bi
    return _join(ytr, ybr, yti, ybi, xi, INCREASING, COMPLEX, BLOCK_B, LOB, C_LOG)


@triton.jit
def _accumulate(ptr, SEG, off, e1, e2, e3, e4, not_first):
    """Sum dD1..dD4 (BLOCK_B, LOB, C/2) over rows into ptr[k * SEG + off].

    A program's first row tile stores, later ones add: no zero-fill, and re-running a
    launch (the autotuner does) gives the same result.
    """
    mask = (off >= 0) & not_first
    tl.store(ptr + off, tl.load(ptr + off, mask=mask, other=0.0) + tl.sum(e1, axis=0))
    tl.store(ptr + SEG + off, tl.load(ptr + SEG + off, mask=mask, other=0.0) + tl.sum(e2, axis=0))
    tl.store(ptr + 2 * SEG + off,
             tl.load(ptr + 2 * SEG + off, mask=mask, other=0.0) + tl.sum(e3, axis=0))
    tl.store(ptr + 3 * SEG + off,
             tl.load(ptr + 3 * SEG + off, mask=mask, other=0.0) + tl.sum(e4, axis=0))


@triton.jit
def _bwd_step(ar, ai, gr, gi, twr, twi, dr, di, TW, SEG, not_first, n, L0, qb, lo0, step,
              C_LOG: tl.constexpr, LOB: tl.constexpr, TIED: tl.constexpr,
              INCREASING: tl.constexpr, COMPLEX: tl.constexpr, TW_CPLX: tl.constexpr,
              BLOCK_B: tl.constexpr):
    """Backward of the step-th level: a = its input (layout step), g = grad of its output
    (layout step + 1). Adds dD_k = sum_rows g * conj(a) (its real part for real twiddles)
    to partial planes dr/di at lev * n/2 + slot (kernel pair order); returns
    g_in = conj(D)^T g (torch's complex convention)."""
    lev = step if INCREASING else C_LOG - 1 - step
    d1r, d2r, d3r, d4r, d1i, d2i, d3i, d4i, slot = _twiddles(twr, twi, TW, n, L0, qb, lo0,
                                                             lev, C_LOG, LOB, TIED, TW_CPLX)
    poff = lev * (n // 2) + slot
    # a is split as the forward step splits it; g undoes the forward's join
    atr, abr, ati, abi = _split(ar, ai, not INCREASING, COMPLEX, BLOCK_B, LOB, C_LOG)
    gtr, gbr, gti, gbi = _split(gr, gi, INCREASING, COMPLEX, BLOCK_B, LOB, C_LOG)
    if COMPLEX:
        # g * conj(a): re = gr ar + gi ai, im = gi ar - gr ai
        _accumulate(dr, SEG, poff, gtr * atr + gti * ati, gtr * abr + gti * abi,
                    gbr * atr + gbi * ati, gbr * abr + gbi * abi, not_first)
    else:
        _accumulate(dr, SEG, poff, gtr * atr, gtr * abr, gbr * atr, gbr * abr, not_first)
    if TW_CPLX:
        _accumulate(di, SEG, poff, gti * atr - gtr * ati, gti * abr - gtr * abi,
                    gbi * atr - gbr * ati, gbi * abr - gbr * abi, not_first)
        # conj(D)^T g: top = conj(D1) gt + conj(D3) gb, bottom = conj(D2) gt + conj(D4) gb
        ntr = d1r * gtr + d1i * gti + d3r * gbr + d3i * gbi
        nti = d1r * gti - d1i * gtr + d3r * gbi - d3i * gbr
        nbr = d2r * gtr + d2i * gti + d4r * gbr + d4i * gbi
        nbi = d2r * gti - d2i * gtr + d4r * gbi - d4i * gbr
    else:
        ntr = d1r * gtr + d3r * gbr
        nbr = d2r * gtr + d4r * gbr
        nti, nbi = ntr, nbr
        if COMPLEX:
            nti = d1r * gti + d3r * gbi
            nbi = d2r * gti + d4r * gbi
    return _join(ntr, nbr, nti, nbi, gi, not INCREASING, COMPLEX, BLOCK_B, LOB, C_LOG)


@triton.jit
def _load_tile(ptr, offs, mask, ref, CPLX: tl.constexpr, COMPLEX: tl.constexpr):
    """Planes (re, im) of a (BLOCK_B, LOB, C) tile in ref's element type: interleaved
    complex when CPLX, else real (im = zeros when COMPLEX, = re as a placeholder if not)."""
    acc_ty = ref.dtype.element_ty
    if CPLX:
        two = tl.arange(0, 2)[None, None, None, :]
        v = tl.load(ptr + (offs * 2)[:, :, :, None] + two, mask=mask[:, :, :, None], other=0.0)
        re, im = tl.split(v.to(acc_ty))
    else:
        re = tl.load(ptr + offs, mask=mask, other=0.0).to(acc_ty)
        im = re
        if COMPLEX:
            im = tl.zeros_like(re)
    return re, im


@triton.jit
def _store_tile(ptr, offs, mask, re, im, CPLX: tl.constexpr):
    """Store planes interleaved (CPLX) or the real plane alone, in ptr's element type."""
    if CPLX:
        two = tl.arange(0, 2)[None, None, None, :]
        tl.store(ptr + (offs * 2)[:, :, :, None] + two,
                 tl.join(re, im).to(ptr.dtype.element_ty), mask=mask[:, :, :, None])
    else:
        tl.store(ptr + offs, re.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def butterfly_fwd_kernel(
    x, y, tw_re, tw_im, batch, n, TW, blk0, nblk, L0, rows_log2,
    C_LOG: tl.constexpr, LOB: tl.constexpr, TIED: tl.constexpr, INCREASING: tl.constexpr,
    COMPLEX: tl.constexpr, X_CPLX: tl.constexpr, TW_CPLX: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """y = the levels L0 .. L0+C_LOG-1 of blocks blk0 .. blk0+nblk-1 applied to x.

    x: (batch, n), interleaved complex when X_CPLX; y: (batch, n), interleaved complex when
    COMPLEX; tw: (nblocks, 4, TW) planes (tw_im read only when TW_CPLX). rows_log2 (the
    batch's bucket) is only an autotuning key. Grid: (cdiv(batch, BLOCK_B), n / (C * LOB)).
    """
    offs, mask, qb, lo0 = _tile_offsets(n, tl.program_id(0) * BLOCK_B, batch, L0,
                                        tl.program_id(1), C_LOG, LOB, BLOCK_B)
    xr, xi = _load_tile(x, offs, mask, tw_re, X_CPLX, COMPLEX)
    for b in range(blk0, blk0 + nblk):
        for step in range(C_LOG):
            xr, xi = _fwd_step(xr, xi, tw_re + b * 4 * TW, tw_im + b * 4 * TW, TW, n, L0, qb,
                               lo0, step, C_LOG, LOB, TIED, INCREASING, COMPLEX, TW_CPLX,
                               BLOCK_B)
    _store_tile(y, offs, mask, xr, xi, COMPLEX)


@triton.jit
def butterfly_bwd_kernel(
    a, g, gx, tw_re, tw_im, dtw_re, dtw_im,
    batch, n, TW, blk, L0, rows_per_split, SEG, rows_log2,
    C_LOG: tl.constexpr, LOB: tl.constexpr, TIED: tl.constexpr, INCREASING: tl.constexpr,
    COMPLEX: tl.constexpr, X_CPLX: tl.constexpr, TW_CPLX: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Backward of block blk's levels L0 .. L0+C_LOG-1 (one forward launch's segment).

    a: the segment's input, g: grad of its output, gx: grad of its input ((batch, n); a and
    gx interleaved complex when X_CPLX, g when COMPLEX; gx of a real input is the real part).
    Program (s, q) handles rows [s * rows_per_split, (s+1) * rows_per_split) in BLOCK_B
    row tiles and writes its twiddle grads, summed over its rows, to the partial planes
    dtw[s, k, :SEG] (the segment's levels in kernel pair order; torch sums over s, restores
    the untied order and folds tied twiddles). Level inputs are recomputed from `a` for
    each level in reverse, restarting from a checkpoint kept after the first half:
    ~c^2/4 + c level applications for c levels and two extra tiles on chip, instead of c
    stored tiles. rows_log2 is only an autotuning key.
    """
    H: tl.constexpr = C_LOG // 2
    pid_s = tl.program_id(0)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, batch)
    twr = tw_re + blk * 4 * TW
    twi = tw_im + blk * 4 * TW
    dr = dtw_re + pid_s * 4 * SEG
    di = dtw_im + pid_s * 4 * SEG
    for row0 in range(row_start, row_start + rows_per_split, BLOCK_B):
        offs, mask, qb, lo0 = _tile_offsets(n, row0, row_end, L0, tl.program_id(1), C_LOG,
                                            LOB, BLOCK_B)
        not_first = row0 > row_start
        ar, ai = _load_tile(a, offs, mask, tw_re, X_CPLX, COMPLEX)
        gr, gi = _load_tile(g, offs, mask, tw_re, COMPLEX, COMPLEX)
        ckr = ar
        cki = ai
        for step in range(H):
            ckr, cki = _fwd_step(ckr, cki, twr, twi, TW, n, L0, qb, lo0, step, C_LOG, LOB, TIED,
                                 INCREASING, COMPLEX, TW_CPLX, BLOCK_B)
        # steps C_LOG-1 .. H: inputs recomputed from the checkpoint
        for rev in range(C_LOG - H):
            cr = ckr
            ci = cki
            for step in range(H, C_LOG - 1 - rev):
                cr, ci = _fwd_step(cr, ci, twr, twi, TW, n, L0, qb, lo0, step, C_LOG, LOB, TIED,
                                   INCREASING, COMPLEX, TW_CPLX, BLOCK_B)
            gr, gi = _bwd_step(cr, ci, gr, gi, twr, twi, dr, di, TW, SEG, not_first, n, L0, qb,
                               lo0, C_LOG - 1 - rev, C_LOG, LOB, TIED, INCREASING, COMPLEX,
                               TW_CPLX, BLOCK_B)
        # steps H-1 .. 0: inputs recomputed from a
        for rev in range(H):
            cr = ar
            ci = ai
            for step in range(H - 1 - rev):
                cr, ci = _fwd_step(cr, ci, twr, twi, TW, n, L0, qb, lo0, step, C_LOG, LOB, TIED,
                                   INCREASING, COMPLEX, TW_CPLX, BLOCK_B)
            gr, gi = _bwd_step(cr, ci, gr, gi, twr, twi, dr, di, TW, SEG, not_first, n, L0, qb,
                               lo0, H - 1 - rev, C_LOG, LOB, TIED, INCREASING, COMPLEX, TW_CPLX,
                               BLOCK_B)
        _store_tile(gx, offs, mask, gr, gi, X_CPLX)
