"""Relaxed learnable permutations of docs/protocol.md section 1, their rounding, and bit reversal.

A permutation of size n = 2**m has one level per block size k = n, n/2, ..., 4 (m-1 levels,
level 0 is k = n). Each level is tied across its n/k blocks and made of three relaxed binary
choices with p = sigmoid(logit), applied in order to every block of size k:
  (0) even/odd separation: x -> (1-p0) x + p0 [x_even; x_odd]
  (1) reverse the first half, (2) reverse the second half (each x -> (1-p) x + p rev(x)).
probs: (levels, 3), or (1, 3) to share one triple across levels. Rounding: logit >= 0 is on.
Even/odd on at every level, reversals off, is the bit-reversal permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.reference import log2_exact


def _mix(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    # (1-p) x + p y, not x + p (y - x): exact for p in {0, 1}, so a rounded permutation moves
    # values without rounding them
    return (1 - p) * x + p * y


def permute_level(x: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Apply one level (block size k, probs (3,)) to x (batch, n) along the last dim."""
    batch, n = x.shape
    xb = x.reshape(batch, n // k, k)
    evenodd = torch.cat([xb[..., 0::2], xb[..., 1::2]], dim=-1)
    xb = _mix(xb, evenodd, probs[0])
    h = k // 2
    first, second = xb[..., :h], xb[..., h:]
    first = _mix(first, first.flip(-1), probs[1])
    second = _mix(second, second.flip(-1), probs[2])
    return torch.cat([first, second], dim=-1).reshape(batch, n)


def permute_level_transpose(x: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Apply the transpose of one level to x (batch, n): x -> (I (x) Q_k^T) x per row.

    Used to right-multiply a matrix by a permutation level: A (I (x) Q_k) is this op on A's rows.
    """
    batch, n = x.shape
    xb = x.reshape(batch, n // k, k)
    h = k // 2
    first, second = xb[..., :h], xb[..., h:]
    first = _mix(first, first.flip(-1), probs[1])
    second = _mix(second, second.flip(-1), probs[2])
    interleaved = torch.stack([first, second], dim=-1).reshape(batch, n // k, k)
    xb = _mix(torch.cat([first, second], dim=-1), interleaved, probs[0])
    return xb.reshape(batch, n)


def _level_probs(probs: torch.Tensor, level: int, like: torch.Tensor) -> torch.Tensor:
    p = probs[level if probs.shape[0] > 1 else 0]
    return p.to(like.real.dtype if like.is_complex() else like.dtype)


def permute(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Apply the relaxed permutation with probs (levels or 1, 3) to x (batch, n)."""
    n = x.shape[-1]
    m = log2_exact(n)
    for level in range(m - 1):
        x = permute_level(x, _level_probs(probs, level, x), n >> level)
    return x


def permute_columns(a: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A P for a matrix a (rows, n) and the permutation P = permute(., probs) as a matrix."""
    n = a.shape[-1]
    m = log2_exact(n)
    # P = (I (x) Q_4) ... (I (x) Q_n): A P applies Q_4 last, i.e. levels in reverse on rows.
    for level in range(m - 2, -1, -1):
        a = permute_level_transpose(a, _level_probs(probs, level, a), n >> level)
    return a


def bit_reversal(n: int) -> torch.Tensor:
    """Indices perm with (x[perm])[i] = x[bitreverse(i)] for n a power of two."""
    m = log2_exact(n)
    idx = torch.arange(n)
    rev = torch.zeros_like(idx)
    for b in range(m):
        rev |= ((idx >> b) & 1) << (m - 1 - b)
    return rev


class Permutation(nn.Module):
    """Learnable relaxed permutation of size n (docs/protocol.md section 1).

    share: one logit triple for all levels. top_only: a single level at block size n (the
    authors' extra permutation P' of BPP: three relaxed choices, nothing below). After
    `round_()` the permutation is hard (probs in {0, 1}) and its logits get no gradients.
    """

    def __init__(
        self,
        n: int,
        share: bool = True,
        generator: torch.Generator | None = None,
        top_only: bool = False,
    ):
        super().__init__()
        m = log2_exact(n)
        if n < 4:
            raise ValueError(f"a learnable permutation needs n >= 4, got {n}")
        self.n, self.top_only = n, top_only
        levels = 1 if (share or top_only) else m - 1
        self.logits = nn.Parameter(torch.randn(levels, 3, generator=generator))
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool))

    def probs(self) -> torch.Tensor:
        if bool(self.hard):
            return (self.logits.detach() >= 0).to(self.logits.dtype)
        return torch.sigmoid(self.logits)

    def round_(self) -> Permutation:
        """Freeze to the nearest hard permutation (logit >= 0 means on)."""
        self.hard.fill_(True)
        self.logits.requires_grad_(False)
        return self

    @property
    def trials(self) -> int | None:
        """The leading trial dim of a stacked permutation's logits, None for a plain one."""
        return self.logits.shape[0] if self.logits.dim() == 3 else None

    @classmethod
    def stacked(cls, perms: list[Permutation]) -> Permutation:
        """One permutation whose logits (trials, levels, 3) stack those of `perms` (same shape).

        Its probs() and round_() act on every trial; apply/forward are for plain permutations.
        """
        first = perms[0]
        share = first.logits.shape[0] == 1
        out = cls(first.n, share, torch.Generator(), first.top_only)
        out.logits = nn.Parameter(torch.stack([p.logits.detach() for p in perms]))
        return out

    def apply(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """This permutation's structure with the given probs applied to x (batch, n)."""
        if probs.dim() != 2:
            raise ValueError(f"probs must be (levels, 3), got {tuple(probs.shape)}")
        if self.top_only:
            return permute_level(x, _level_probs(probs, 0, x), self.n)
        return permute(x, probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.probs())

    def apply_columns(self, a: torch.Tensor) -> torch.Tensor:
        """a P for a matrix a (rows, n), P this permutation as a matrix."""
        probs = self.probs()
        if self.top_only:
            return permute_level_transpose(a, _level_probs(probs, 0, a), self.n)
        return permute_columns(a, probs)

    def indices(self) -> torch.Tensor:
        """The hard permutation as indices: forward(x) == x[:, indices] once rounded.

        (n,), or (trials, n) for a stacked permutation.
        """
        probs = (self.logits.detach() >= 0).to(torch.float64)
        idx = torch.arange(self.n, dtype=torch.float64, device=probs.device).unsqueeze(0)
        if probs.dim() == 3:
            return torch.stack([self.apply(idx, p).round().long().squeeze(0) for p in probs])
        return self.apply(idx, probs).round().long().squeeze(0)

    def column_order(self) -> torch.Tensor:
        """cols with A P == A[..., cols] for the hard permutation P (the inverse of indices)."""
        return torch.argsort(self.indices(), dim=-1)

    @staticmethod
    def bit_reversal_logits(n: int, magnitude: float = 10.0) -> torch.Tensor:
        """Logits (m-1, 3) whose rounding is the bit-reversal permutation."""
        m = log2_exact(n)
        logits = torch.full((m - 1, 3), -magnitude)
        logits[:, 0] = magnitude
        return logits
