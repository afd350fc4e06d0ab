"""The oracle: a slow, readable butterfly multiply that every fast path is tested against.

Layout of the twiddles (shared by every module in `kernels`):

- n = 2**m, the size of one butterfly; a butterfly has m levels ("factors").
- Level l has stride s = 2**l and is the factor B^(2s) = I_{n/2s} (x) BF_{2s}. It mixes the
  pairs (g*2s + j, g*2s + j + s) for block g < n/2s and j < s with one 2x2 matrix
  [[D1[j], D2[j]], [D3[j], D4[j]]]: y_top = D1 x_top + D2 x_bot, y_bot = D3 x_top + D4 x_bot.
- untied twiddle: (nblocks, m, n/2, 2, 2); pair p = g*s + j of level l owns twiddle[b, l, p].
- tied twiddle: (nblocks, n-1, 2, 2); level l owns rows [2**l - 1, 2**(l+1) - 1) (its s
  distinct 2x2 matrices, shared by all n/2s blocks): 4(n-1) numbers per butterfly.
- increasing stride applies levels 0, 1, ..., m-1 (B = B^(n) ... B^(2), the paper's order);
  decreasing stride applies m-1, ..., 0 (the transpose order).
- nblocks butterflies are applied one after another, block 0 first.
Twiddles and inputs may be real or complex (torch complex dtypes).
"""

from __future__ import annotations

import torch


def log2_exact(n: int) -> int:
    """log2(n) for a power of two n >= 1; a ValueError naming n otherwise."""
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"size must be a power of two, got {n!r}")
    return n.bit_length() - 1


def untie(twiddle: torch.Tensor) -> torch.Tensor:
    """Expand a tied twiddle (nblocks, n-1, 2, 2) to untied form (nblocks, m, n/2, 2, 2)."""
    if twiddle.dim() == 5:
        return twiddle
    if twiddle.dim() != 4 or twiddle.shape[-2:] != (2, 2):
        raise ValueError(f"tied twiddle must be (nblocks, n-1, 2, 2), got {tuple(twiddle.shape)}")
    nblocks, n = twiddle.shape[0], twiddle.shape[1] + 1
    m = log2_exact(n)
    levels = []
    for level in range(m):
        s = 1 << level
        t = twiddle[:, s - 1 : 2 * s - 1]  # (nblocks, s, 2, 2)
        levels.append(
            t.unsqueeze(1).expand(nblocks, n // (2 * s), s, 2, 2).reshape(nblocks, n // 2, 2, 2)
        )
    return torch.stack(levels, dim=1)


def apply_level(twiddle_level: torch.Tensor, x: torch.Tensor, level: int) -> torch.Tensor:
    """One factor: twiddle_level (n/2, 2, 2) of stride 2**level applied to x (batch, n)."""
    batch, n = x.shape
    s = 1 << level
    t = twiddle_level.reshape(n // (2 * s), s, 2, 2)
    xs = x.reshape(batch, n // (2 * s), 2, s)
    # y[b, g, i, j] = sum_k t[g, j, i, k] * x[b, g, k, j]
    return torch.einsum("gjik,bgkj->bgij", t, xs).reshape(batch, n)


def butterfly_multiply_reference(
    twiddle: torch.Tensor, x: torch.Tensor, increasing_stride: bool = True
) -> torch.Tensor:
    """y = B_{nblocks-1} ... B_0 x for x (batch, n); twiddle tied or untied (see module doc)."""
    tw = untie(twiddle)
    if tw.dim() != 5 or tw.shape[-2:] != (2, 2):
        raise ValueError(f"untied twiddle must be (nblocks, m, n/2, 2, 2), got {tuple(tw.shape)}")
    nblocks, m, half = tw.shape[:3]
    n = 2 * half
    if x.dim() != 2 or x.shape[1] != n or (1 << m) != n:
        raise ValueError(
            f"x must be (batch, {n}) for a twiddle of {m} levels, got {tuple(x.shape)}"
        )
    if tw.is_complex() and not x.is_complex():
        x = x.to(tw.dtype)
    elif x.is_complex() and not tw.is_complex():
        tw = tw.to(x.dtype)
    order = range(m) if increasing_stride else range(m - 1, -1, -1)
    for b in range(nblocks):
        for level in order:
            x = apply_level(tw[b, level], x, level)
    return x


def butterfly_factor_dense(twiddle_level: torch.Tensor, level: int) -> torch.Tensor:
    """The n x n matrix of one factor, built entry by entry (used by tests as ground truth)."""
    half = twiddle_level.shape[0]
    n = 2 * half
    s = 1 << level
    mat = torch.zeros(n, n, dtype=twiddle_level.dtype)
    for g in range(n // (2 * s)):
        for j in range(s):
            top, bot = g * 2 * s + j, g * 2 * s + j + s
            t = twiddle_level[g * s + j]
            mat[top, top], mat[top, bot] = t[0, 0], t[0, 1]
            mat[bot, top], mat[bot, bot] = t[1, 0], t[1, 1]
    return mat


def butterfly_dense(twiddle: torch.Tensor, increasing_stride: bool = True) -> torch.Tensor:
    """The n x n matrix of all blocks as a product of explicit dense factors."""
    tw = untie(twiddle)
    nblocks, m, half = tw.shape[:3]
    mat = torch.eye(2 * half, dtype=tw.dtype)
    order = range(m) if increasing_stride else range(m - 1, -1, -1)
    for b in range(nblocks):
        for level in order:
            mat = butterfly_factor_dense(tw[b, level], level) @ mat
    return mat
