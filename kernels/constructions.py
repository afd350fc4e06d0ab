"""Exact butterfly constructions of known transforms, as hard-permutation `ButterflyStack`s.

Conventions: twiddles as in kernels/reference.py (tied, increasing stride), y = M x for a
(batch, n) input, M = B P (bp), B P P' (bpp, P' one level at size n, applied first) or
B2 P2 B1 P1 (bpbp). Everything is built in complex128 (stacks are complex, as in the
recovery search; real targets take the real part of the output) and is exact to rounding.

Building blocks (F = unitary DFT, P_br = bit reversal, B_F = `dft_twiddle`):
- F = B_F P_br: radix-2 decimation in time, level l pairs (j, j + 2**l) with [[1, w], [1, -w]],
  w = exp(-2 pi i j / 2**(l+1)).
- an output diagonal diag(d) B scales the rows of the top level (`absorb_output_diagonal`);
- an input diagonal D = diag(1, c_{m-1}) (x) ... (x) diag(1, c_0) (entry i is the product of
  c_b over the set bits b of i) commutes with every level but level b, so B D scales the
  second column of level b by c_b (`absorb_input_kron_diagonal`).
Derivations of DCT-II, DST-II and convolution are in the docstrings of their builders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.butterfly import ButterflyStack
from kernels.permutation import Permutation
from kernels.reference import log2_exact

NAMES = ("dft", "idft", "hadamard", "dct", "dst", "convolution")
MODEL_OF = {
    "dft": "bp",
    "idft": "bp",
    "hadamard": "bp",
    "dct": "bpp",
    "dst": "bpp",
    "convolution": "bpbp",
}
CDTYPE = torch.complex128


@dataclass(frozen=True)
class HardPermutation:
    """One hard permutation of a stack: the three choices, shared by every level it has.

    on: (even/odd separation, reverse first half, reverse second half). top_only: BPP's P'
    (one level at size n); otherwise the levels n, n/2, ..., 4 all make the same choices.
    """

    role: str
    on: tuple[bool, bool, bool]
    top_only: bool = False

    def logits(self, magnitude: float = 10.0) -> torch.Tensor:
        """Logits (1, 3) that round to these choices (logit >= 0 is on), float64."""
        return torch.tensor(
            [[magnitude if c else -magnitude for c in self.on]], dtype=torch.float64
        )

    def module(self, n: int) -> Permutation:
        """A rounded `Permutation` of size n making these choices."""
        # a private generator: the random init (overwritten) leaves torch's global RNG alone
        gen = torch.Generator().manual_seed(0)
        perm = Permutation(n, share=True, generator=gen, top_only=self.top_only).double()
        with torch.no_grad():
            perm.logits.copy_(self.logits())
        return perm.round_()

    def indices(self, n: int) -> torch.Tensor:
        """(n,) indices: the permutation applied to x (batch, n) is x[:, indices]."""
        return self.module(n).indices()


BIT_REVERSAL = (True, False, False)
IDENTITY = (False, False, False)
EVENS_THEN_ODDS_REVERSED = (True, False, True)  # P' of the DCT/DST: v = [x_even, rev(x_odd)]


def exact_permutations(name: str) -> list[HardPermutation]:
    """The hard permutations of `exact_stack(name, n)`, in `ButterflyStack.permutations()` order."""
    _check_name(name)
    if name == "hadamard":
        return [HardPermutation("P", IDENTITY)]
    if name in ("dft", "idft"):
        return [HardPermutation("P", BIT_REVERSAL)]
    if name in ("dct", "dst"):
        return [
            HardPermutation("P'", EVENS_THEN_ODDS_REVERSED, top_only=True),
            HardPermutation("P", BIT_REVERSAL),
        ]
    return [HardPermutation("P1", BIT_REVERSAL), HardPermutation("P2", BIT_REVERSAL)]


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown construction {name!r} (known: {', '.join(NAMES)})")


def _check_size(n: int) -> int:
    m = log2_exact(n)
    if n < 4:
        raise ValueError(f"exact stacks need n >= 4 (a learnable permutation's minimum), got {n}")
    return m


def dft_twiddle(n: int, inverse: bool = False, normalized: bool = True) -> torch.Tensor:
    """Tied complex128 twiddle (1, n-1, 2, 2) with B P_br = DFT (or its inverse).

    normalized: unitary (numpy norm="ortho"); otherwise numpy's default, i.e. the forward DFT
    unscaled and the inverse scaled by 1/n (np.fft.fft / np.fft.ifft).
    """
    m = log2_exact(n)
    if m < 1:
        raise ValueError(f"a DFT butterfly needs n >= 2, got {n}")
    sign = 1.0 if inverse else -1.0
    scale = 1 / math.sqrt(2) if normalized else (0.5 if inverse else 1.0)
    rows = []
    for level in range(m):
        s = 1 << level
        w = torch.exp(sign * 2j * math.pi * torch.arange(s, dtype=torch.float64) / (2 * s))
        one = torch.ones(s, dtype=CDTYPE)
        rows.append(torch.stack([torch.stack([one, w], -1), torch.stack([one, -w], -1)], -2))
    return (torch.cat(rows) * scale).unsqueeze(0)


def hadamard_twiddle(n: int) -> torch.Tensor:
    """Tied float64 twiddle (1, n-1, 2, 2) with B = Sylvester H_n / sqrt(n) (P = identity)."""
    log2_exact(n)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    return h2.expand(1, n - 1, 2, 2).clone()


def kron_diagonal(c: torch.Tensor) -> torch.Tensor:
    """Diagonal (n,) of diag(1, c_{m-1}) (x) ... (x) diag(1, c_0) for c (m,).

    Entry i is the product of c_b over the set bits b of i.
    """
    m = c.shape[0]
    idx = torch.arange(1 << m)
    d = torch.ones(1 << m, dtype=c.dtype)
    for b in range(m):
        d = torch.where((idx >> b) & 1 == 1, d * c[b], d)
    return d


def absorb_output_diagonal(twiddle: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Tied twiddle (1, n-1, 2, 2) of diag(d) B for d (n,): the top level's rows scaled."""
    n = twiddle.shape[-3] + 1
    if d.shape != (n,):
        raise ValueError(f"output diagonal must have shape ({n},), got {tuple(d.shape)}")
    out = twiddle.to(torch.promote_types(twiddle.dtype, d.dtype)).clone()
    h = n // 2
    # the top level (stride n/2, one block) owns rows [h-1, n-1): pair j outputs rows j, j + h
    out[..., h - 1 :, 0, :] *= d[:h, None]
    out[..., h - 1 :, 1, :] *= d[h:, None]
    return out


def absorb_input_kron_diagonal(twiddle: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Tied twiddle (1, n-1, 2, 2) of B diag(kron_diagonal(c)) for c (m,).

    Level b's second column (the input with bit b set) is scaled by c_b.
    """
    n = twiddle.shape[-3] + 1
    m = log2_exact(n)
    if c.shape != (m,):
        raise ValueError(f"Kronecker factors must have shape ({m},), got {tuple(c.shape)}")
    out = twiddle.to(torch.promote_types(twiddle.dtype, c.dtype)).clone()
    for b in range(m):
        out[..., (1 << b) - 1 : (2 << b) - 1, :, 1] *= c[b]
    return out


def dct_twiddle(n: int) -> torch.Tensor:
    """Twiddle (1, n-1, 2, 2) with DCT-II = Re(B P_br P') (P' = evens, then odds reversed).

    With v = P' x, sum_j x_j cos(pi k (2j+1) / 2n) = Re(exp(-i pi k / 2n) (F_u v)_k)
    (Makhoul 1980; F_u the unscaled DFT), so the target 2/sqrt(n) cos(...) is
    Re(diag(2 exp(-i pi k / 2n)) F P_br P') with F = B_F P_br unitary.
    """
    k = torch.arange(n, dtype=torch.float64)
    return absorb_output_diagonal(dft_twiddle(n), 2 * torch.exp(-1j * math.pi * k / (2 * n)))


def dst_twiddle(n: int) -> torch.Tensor:
    """Twiddle (1, n-1, 2, 2) with DST-II = Re(B P_br P'), the same P_br and P' as the DCT.

    sin(pi (k+1)(2j+1) / 2n) = (-1)^j cos(pi (n-1-k)(2j+1) / 2n), so DST = R DCT S with R the
    row reversal and S = diag((-1)^j). R D F = (R D R)(R F) and R F = conj(F) diag(w^j),
    w = exp(2 pi i / n); P' S = diag(+1 first half, -1 second half) P'. Moving both diagonals
    through P_br (bit b <-> bit m-1-b) leaves diag(1, c_l) on bit l with c_0 = 1 and
    c_l = exp(i pi / 2**l): DST = Re(diag(2 exp(-i pi (n-1-k) / 2n)) conj(B_F) D_c P_br P').
    """
    m = _check_size(n)
    k = torch.arange(n, dtype=torch.float64)
    c = torch.exp(1j * math.pi / 2.0 ** torch.arange(m, dtype=torch.float64))
    c[0] = 1.0  # exp(i pi) from w^j times the -1 of S
    tw = absorb_input_kron_diagonal(dft_twiddle(n, inverse=True), c)
    return absorb_output_diagonal(tw, 2 * torch.exp(-1j * math.pi * (n - 1 - k) / (2 * n)))


def convolution_twiddles(
    c: torch.Tensor, normalized: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B1, B2) twiddles, each (1, n-1, 2, 2), with B2 P_br B1 P_br = circulant(c) [/ sqrt(n)].

    circulant(c)[i, j] = c[(i - j) mod n] = F^H diag(F_u c) F (F unitary, F_u unscaled), so
    B1 = diag(F_u c) B_F and B2 = conj(B_F); normalized divides by sqrt(n) (tasks/targets.py).
    """
    n = c.shape[0]
    c_hat = torch.fft.fft(c.to(CDTYPE), norm="ortho" if normalized else "backward")
    return absorb_output_diagonal(dft_twiddle(n), c_hat), dft_twiddle(n, inverse=True)


def paper_filter(n: int) -> torch.Tensor:
    """The convolution target's filter: the first n draws of numpy's legacy randn after seed 0."""
    return torch.from_numpy(np.random.RandomState(0).randn(n))


def _twiddles(name: str, n: int, c: torch.Tensor | None, normalized: bool) -> list[torch.Tensor]:
    if name == "dft":
        return [dft_twiddle(n)]
    if name == "idft":
        return [dft_twiddle(n, inverse=True)]
    if name == "hadamard":
        return [hadamard_twiddle(n)]
    if name == "dct":
        return [dct_twiddle(n)]
    if name == "dst":
        return [dst_twiddle(n)]
    filt = paper_filter(n) if c is None else torch.as_tensor(c)
    if filt.shape != (n,):
        raise ValueError(f"filter c must have shape ({n},), got {tuple(filt.shape)}")
    return list(convolution_twiddles(filt, normalized))


def exact_stack(
    name: str, n: int, c: torch.Tensor | np.ndarray | None = None, normalized: bool = True
) -> ButterflyStack:
    """The exact float64/complex128 `ButterflyStack` of a transform, permutations rounded.

    name: one of NAMES; n = 2**m >= 4. The matrix is that of tasks/targets.py (dft unitary,
    idft its inverse, hadamard, dct, dst). convolution: y = circulant(c) x / sqrt(n) for a
    filter c (n,) (default `paper_filter(n)`); normalized=False drops the 1/sqrt(n).
    Real targets (and a real filter) get real_output=True. Its permutations are
    `exact_permutations(name)`.
    """
    _check_name(name)
    _check_size(n)
    if name != "convolution" and (c is not None or not normalized):
        raise ValueError(f"c and normalized apply to 'convolution' only, not {name!r}")
    twiddles = _twiddles(name, n, None if c is None else torch.as_tensor(c), normalized)
    complex_filter = c is not None and torch.as_tensor(c).is_complex()
    real = name not in ("dft", "idft") and not complex_filter
    stack = ButterflyStack(
        n,
        MODEL_OF[name],
        complex=True,
        tied=True,
        share_logits=True,
        real_output=real,
        generator=torch.Generator().manual_seed(0),  # the random init is overwritten below
    ).double()
    with torch.no_grad():
        for bfly, tw in zip(stack.butterflies, twiddles, strict=True):
            new = torch.view_as_real(tw.to(CDTYPE).contiguous())
            if bfly.twiddle.shape != new.shape:
                raise ValueError(
                    f"twiddle layout {tuple(bfly.twiddle.shape)} is not {tuple(new.shape)}"
                )
            bfly.twiddle.copy_(new)
        for perm, hard in zip(stack.permutations(), exact_permutations(name), strict=True):
            perm.logits.copy_(hard.logits())
    return stack.round_permutations_()
