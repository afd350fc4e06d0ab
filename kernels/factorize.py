"""Closed-form projections onto structured classes: hierarchical butterfly, sparse, low rank.

No gradients, no hyper-parameters. The butterfly convention is that of `kernels.reference`:
`hierarchical_butterfly(M)` returns an untied twiddle tw (1, m, n/2, 2, 2) with
`butterfly_dense(tw) ~= M`, i.e. `butterfly_multiply_reference(tw, x) ~= x @ M.T` for x
(batch, n) (M acts on each row, like an nn.Linear with weight M). In particular
`butterfly_multiply_reference(tw, I)` is M.T, not M: to make the reference's output on the
identity equal a target T, factor T.T.
"""

from __future__ import annotations

import torch

from kernels.reference import log2_exact


def _as_64(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix in float64 or complex128 (the working precision of this module)."""
    return matrix.to(torch.complex128 if matrix.is_complex() else torch.float64)


def _square(matrix: torch.Tensor) -> int:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square n x n matrix, got shape {tuple(matrix.shape)}")
    return matrix.shape[0]


@torch.no_grad()
def hierarchical_butterfly(matrix: torch.Tensor) -> torch.Tensor:
    """Untied increasing-stride butterfly twiddle (1, m, n/2, 2, 2) with butterfly_dense ~= M.

    matrix: (n, n), n = 2**m >= 2, real or complex of any float dtype; computed in
    float64/complex128 and returned in the input's dtype and device.

    Algorithm (Le, Zheng, Riccietti, Gribonval 2022): the outermost factor (stride n/2)
    splits B = BF_n diag(B_top, B_bot), so for each i < n/2 the 2 x n/2 block
    [M[i, :n/2]; M[i+n/2, :n/2]] equals [D1[i]; D3[i]] B_top[i, :] (and D2, D4, B_bot on
    the right half): a rank-1 SVD per block, the singular value split as sqrt on both sides.
    Recursing on B_top and B_bot gives every level; all sub-problems of one depth are solved
    in one batched SVD, O(n^2) work in all. Exact (to rounding) when M is a butterfly;
    otherwise a heuristic projection (each split is the best rank-1 fit of its blocks).
    For a target with a known permutation P (M = B P, P a permutation matrix), factor
    M P^{-1} = M P^T; with P x = x[perm] that is `M[:, perm]` (e.g. perm = bit_reversal(n)).
    """
    n = _square(matrix)
    m = log2_exact(n)
    if m < 1:
        raise ValueError(f"a butterfly needs n >= 2, got {n}")
    half = n // 2
    sub = _as_64(matrix).unsqueeze(0)  # (nsub, k, k): the sub-butterflies of one depth
    levels: list[torch.Tensor] = [torch.empty(0)] * m
    for level in range(m - 1, 0, -1):
        nsub, k = sub.shape[0], sub.shape[1]
        h = k // 2
        # blocks[b, c, i, r, :] = sub[b, r*h + i, c*h : (c+1)*h]: column half c, row pair i
        blocks = sub.reshape(nsub, 2, h, 2, h).permute(0, 3, 2, 1, 4)
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        root = s[..., :1].sqrt()  # (nsub, 2, h, 1)
        # twiddle[b*h + i, r, c] = u[b, c, i, r, 0] sqrt(s): D1 (0,0), D2 (0,1), D3 (1,0), D4 (1,1)
        outer = (u[..., :, 0] * root).permute(0, 2, 3, 1)  # (nsub, h, r, c)
        levels[level] = outer.reshape(half, 2, 2)
        # children: sub-butterfly 2b (top, column half 0) and 2b+1 (bottom, column half 1)
        sub = (vh[..., 0, :] * root).reshape(2 * nsub, h, h)
    levels[0] = sub.reshape(half, 2, 2)  # the 2x2 blocks left are the stride-1 twiddles
    twiddle = torch.stack(levels).unsqueeze(0)
    return twiddle.to(dtype=matrix.dtype, device=matrix.device)


def sparse_projection(matrix: torch.Tensor, nnz: int) -> torch.Tensor:
    """The matrix with all but its nnz largest-magnitude entries set to zero (same shape)."""
    if not 0 <= nnz <= matrix.numel():
        raise ValueError(f"nnz must be in [0, {matrix.numel()}], got {nnz}")
    flat = matrix.reshape(-1)
    keep = torch.topk(flat.abs(), nnz).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(matrix.shape)


def lowrank_projection(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation (truncated SVD) of matrix (rows, cols), same dtype."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if not 0 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be in [0, {min(matrix.shape)}], got {rank}")
    u, s, vh = torch.linalg.svd(_as_64(matrix), full_matrices=False)
    out = (u[:, :rank] * s[:rank].to(u.dtype)) @ vh[:rank]
    return out.to(matrix.dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F, computed in float64/complex128."""
    a64, b64 = _as_64(a), _as_64(b)
    return float(torch.linalg.norm(a64 - b64) / torch.linalg.norm(b64))


@torch.no_grad()
def monarch_projection(matrix: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius-closest Monarch matrix P^T L P R to matrix (n, n): returns (L, R).

    Layout (kernels.structured.monarch): b = block_size divides n, nb = n / b; L, R (nb, b, b)
    and W[s nb + l, k b + p] = sum over intermediates j = k b + q = r nb + l of
    L[l, s, r] R[k, q, p]. Each parameter row R[k, q, :] and column L[l, :, r] belongs to
    exactly one j, and the j sharing a block pair (l, k) touch only the b x b submatrix
    W[s nb + l, k b + p] (s, p < b); other entries of W cannot be represented. So the problem
    splits into independent blocks, each a best rank-t fit with t = max(1, b / nb) (the number
    of j per pair): a truncated SVD per block (Eckart-Young), the singular values split as
    sqrt on both sides (Dao et al. 2022, Thm. 3.3 for b = sqrt(n)). Exact (to rounding) for a
    Monarch matrix; computed in float64/complex128, returned in the input's dtype and device.
    """
    n = _square(matrix)
    b = block_size
    if b < 1 or n % b:
        raise ValueError(f"block size must divide n = {n}, got {b}")
    nb = n // b
    t = max(1, b // nb)
    if b % nb and nb % b:
        raise ValueError(f"block size {b} and n / block size {nb} must divide one another")
    m = _as_64(matrix)
    j = torch.arange(n)
    l_of, r_of, k_of, q_of = j % nb, j // nb, j // b, j % b
    groups = j[torch.argsort(l_of * nb + k_of, stable=True)].view(-1, t)  # t j's per (l, k)
    lg, kg = l_of[groups[:, 0]], k_of[groups[:, 0]]
    rows = torch.arange(b)[None, :] * nb + lg[:, None]  # outputs s nb + l
    cols = kg[:, None] * b + torch.arange(b)[None, :]  # inputs k b + p
    u, s, vh = torch.linalg.svd(m[rows[:, :, None], cols[:, None, :]])  # (groups, b, b)
    root = s[:, :t].sqrt().to(u.dtype)
    left_cols = (u[:, :, :t] * root[:, None, :]).transpose(1, 2).reshape(-1, b)  # per j
    right_rows = (vh[:, :t, :] * root[:, :, None]).reshape(-1, b)
    flat = groups.reshape(-1)
    left = torch.zeros(nb, b, b, dtype=m.dtype)
    right = torch.zeros(nb, b, b, dtype=m.dtype)
    left[l_of[flat], :, r_of[flat]] = left_cols
    right[k_of[flat], q_of[flat], :] = right_rows
    return (
        left.to(dtype=matrix.dtype, device=matrix.device),
        right.to(dtype=matrix.dtype, device=matrix.device),
    )
