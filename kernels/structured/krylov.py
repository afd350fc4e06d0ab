"""Krylov matrices of a tridiagonal operator, K(A, v) = [v, A v, ..., A^{n-1} v], fast on CPU.

LDR-TD (kernels.structured.ldr) rebuilds two of these every training step. The plain way, n
sequential matvecs, is ~3n tiny torch ops each way (n = 1024: ~3000 ops of a few us forward
and as many again in autograd's backward). Here the columns come in blocks of s ~ sqrt(n):

- the first s columns by s - 1 matvecs;
- A^s has bandwidth s, so cut into s x s blocks it is block tridiagonal, (left, mid, right)
  each (n/s, s, s), built by log2(s) squarings of A's block form; block c + 1 of columns is
  A^s times block c: three batched matmuls;
- the backward pass (a hand-written adjoint, autograd.Function) runs the same blocking in
  reverse: mu_j = dK_j + A^T mu_{j+1} inside every column block at once (s steps), the block
  carries mu_{cs} by (A^s)^T (n/s steps), then dA and dv as vectorised reductions.

O(s + n/s) torch ops each way instead of 3n (n = 1024, s = 32: forward + backward of one
Krylov matrix ~20 ms on one CPU thread against ~250 ms for matvecs + autograd); the
arithmetic is the same up to rounding.
Layout: the result is (n, r, n) with K[j, i] = A^j v_i (row j of K(A, v_i)^T), contiguous.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def tridiagonal_multiply(
    sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """A v for v (..., n); A has subdiagonal sub (n-1), diagonal diag (n), superdiagonal sup."""
    return diag * v + F.pad(sub * v[..., :-1], (1, 0)) + F.pad(sup * v[..., 1:], (0, 1))


def tridiagonal_matrix(sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """A (n, n), dense."""
    return torch.diag(diag) + torch.diag(sub, -1) + torch.diag(sup, 1)


def _square(
    left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P^2 for P block tridiagonal (blocks (nb, s, s)) whose square has bandwidth <= s."""
    # C[I,I-1] = M_I L_I + L_I M_{I-1}; C[I,I] = L_I R_{I-1} + M_I M_I + R_I L_{I+1};
    # C[I,I+1] = M_I R_I + R_I M_{I+1} (L_0 = R_{nb-1} = 0, so the shifted terms skip them)
    cl = torch.bmm(mid, left)
    cl[1:].baddbmm_(left[1:], mid[:-1])
    cm = torch.bmm(mid, mid)
    cm[1:].baddbmm_(left[1:], right[:-1])
    cm[:-1].baddbmm_(right[:-1], left[1:])
    cr = torch.bmm(mid, right)
    cr[:-1].baddbmm_(right[:-1], mid[1:])
    return cl, cm, cr


def block_power(
    sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, s: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A^s for s a power of two dividing n, as blocks (n/s, s, s) of its block-tridiagonal form:
    left[I] = A^s[I, I-1], mid[I] = A^s[I, I], right[I] = A^s[I, I+1] (s x s row/column blocks).

    By log2(s) squarings of A's own block form; A^k has bandwidth k <= s throughout.
    """
    n = diag.shape[0]
    nb = n // s
    sub_b = F.pad(sub, (0, 1)).view(nb, s)  # sub_b[I, a] = A[Is + a + 1, Is + a]
    sup_b = F.pad(sup, (0, 1)).view(nb, s)  # sup_b[I, a] = A[Is + a, Is + a + 1]
    mid = torch.diag_embed(diag.view(nb, s))
    mid = mid + torch.diag_embed(sub_b[:, :-1], -1) + torch.diag_embed(sup_b[:, :-1], 1)
    left = torch.zeros_like(mid)
    right = torch.zeros_like(mid)
    left[1:, 0, s - 1] = sub_b[:-1, s - 1]  # A[(I+1)s, Is + s - 1]
    right[:-1, s - 1, 0] = sup_b[:-1, s - 1]  # A[Is + s - 1, (I+1)s]
    for _ in range(s.bit_length() - 1):
        left, mid, right = _square(left, mid, right)
    return left, mid, right


def _step_size(n: int) -> int:
    """The largest power of two <= sqrt(n) that divides n (1 for odd n: plain recursion)."""
    s = 1 << ((n.bit_length() - 1) // 2)
    while n % s:
        s //= 2
    return s


def _forward_steps(
    sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, v: torch.Tensor, s: int
) -> torch.Tensor:
    """[v, A v, ..., A^{s-1} v] as (s, r, n) for v (r, n); three in-place ops a step."""
    out = torch.empty(s, *v.shape, dtype=v.dtype, device=v.device)
    out[0] = v
    for t in range(1, s):
        prev, cur = out[t - 1], out[t]
        torch.mul(diag, prev, out=cur)
        cur[:, 1:].addcmul_(sub, prev[:, :-1])
        cur[:, :-1].addcmul_(sup, prev[:, 1:])
    return out


def _transpose_steps(
    sub: torch.Tensor,
    diag: torch.Tensor,
    sup: torch.Tensor,
    grad: torch.Tensor,
    init: torch.Tensor,
    keep: bool,
) -> torch.Tensor:
    """mu_t = grad_t + A^T mu_{t+1} for t = s-1..0 in every column block at once.

    grad (nb, s, r, n), init (nb, r, n) = mu_{(c+1)s}. Returns mu (s, nb, r, n) (t first, so
    that each step writes one contiguous slab) if keep, else only mu_0 (nb, r, n).
    """
    steps = grad.shape[1]
    mu = torch.empty(steps, *init.shape, dtype=grad.dtype, device=grad.device) if keep else None
    state = init
    for t in range(steps - 1, -1, -1):
        # (A^T u)[i] = diag[i] u[i] + sup[i-1] u[i-1] + sub[i] u[i+1]
        if mu is None:
            cur = torch.addcmul(grad[:, t], diag, state)
        else:
            cur = torch.addcmul(grad[:, t], diag, state, out=mu[t])
        cur[..., 1:].addcmul_(sup, state[..., :-1])
        cur[..., :-1].addcmul_(sub, state[..., 1:])
        state = cur
    return mu if mu is not None else state


class _KrylovTridiagonal(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, v: torch.Tensor, s: int
    ) -> torch.Tensor:
        r, n = v.shape
        nb = n // s
        # state [I, (t, i), a]: row block I, local row a, so A^s acts by batched matmuls
        first = _forward_steps(sub, diag, sup, v, s)
        block = first.reshape(s * r, nb, s).transpose(0, 1).contiguous()
        blocks = [block]
        left = mid = right = None
        if nb > 1:
            left, mid, right = block_power(sub, diag, sup, s)
            lt, mt, rt = left.transpose(1, 2), mid.transpose(1, 2), right.transpose(1, 2)
            for _ in range(nb - 1):
                nxt = torch.bmm(block, mt)
                nxt[1:].baddbmm_(block[:-1], lt[1:])  # row block I from I - 1 and I + 1
                nxt[:-1].baddbmm_(block[1:], rt[:-1])
                block = nxt
                blocks.append(block)
        k = torch.empty(nb, s * r, nb, s, dtype=v.dtype, device=v.device)  # [c, (t, i), I, a]
        for c, blk in enumerate(blocks):
            k[c].copy_(blk.transpose(0, 1))  # one pass over the output, no stack + permute
        k = k.view(n, r, n)
        ctx.s = s
        ctx.save_for_backward(sub, diag, sup, k, *(() if left is None else (left, mid, right)))
        return k

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sub, diag, sup, k, *power = ctx.saved_tensors
        s = ctx.s
        n, r, _ = k.shape
        nb = n // s
        g = grad.contiguous().view(nb, s, r, n)
        zeros = torch.zeros(nb, r, n, dtype=grad.dtype, device=grad.device)
        if nb == 1:
            mu = _transpose_steps(sub, diag, sup, g, zeros, keep=True)
        else:
            left, mid, right = power
            local = _transpose_steps(sub, diag, sup, g, zeros, keep=False)  # carry 0
            # carries mu_{cs} = local_{cs} + (A^s)^T mu_{(c+1)s}, last block first
            carries = [local[nb - 1]]
            for c in range(nb - 2, 0, -1):
                # (A^s)^T x on row vectors x [J, i, a]:
                # y_J = x_J mid_J + x_{J+1} left_{J+1} + x_{J-1} right_{J-1}
                x = carries[-1].reshape(r, nb, s).transpose(0, 1)
                y = torch.bmm(x, mid)
                y[:-1].baddbmm_(x[1:], left[1:])
                y[1:].baddbmm_(x[:-1], right[:-1])
                carries.append(local[c] + y.transpose(0, 1).reshape(r, n))
            # block c restarts from mu_{(c+1)s}; the last block's carry is 0
            init = torch.stack([*carries[::-1], zeros[0]])
            mu = _transpose_steps(sub, diag, sup, g, init, keep=True)
        mu = mu.transpose(0, 1).reshape(n, r, n)  # [t, c] -> j = c s + t
        # dA = sum_j mu_j k_{j-1}^T on the tridiagonal pattern; flat shifted products keep
        # every operand contiguous (the entries that cross a row boundary are dropped)
        p, q = mu[1:].reshape(-1), k[:-1].reshape(-1)
        d_diag = (p * q).view(-1, n).sum(0)
        d_sub = F.pad(p[1:] * q[:-1], (0, 1)).view(-1, n).sum(0)[:-1]  # mu_j[a+1] k_{j-1}[a]
        d_sup = F.pad(p[:-1] * q[1:], (0, 1)).view(-1, n).sum(0)[:-1]  # mu_j[a] k_{j-1}[a+1]
        return d_sub, d_diag, d_sup, mu[0], None


def krylov_tridiagonal(
    sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, v: torch.Tensor, step: int = 0
) -> torch.Tensor:
    """K (n, r, n) with K[j, i] = A^j v_i for v (r, n); A = tridiag(sub, diag, sup).

    step: the block size s (must divide n); 0 picks ~sqrt(n). Differentiable in all inputs.
    """
    r, n = v.shape
    s = step or _step_size(n)
    if n % s:
        raise ValueError(f"step {s} must divide n = {n}")
    return _KrylovTridiagonal.apply(sub, diag, sup, v, s)
