"""The contract every structured hidden layer of the compression experiment satisfies.

A layer is a square linear map W on R^n with no bias (the network adds its own):
forward(x) = x @ W.T for x (batch, n) real, returning (batch, n) real, and `matrix()` is W
itself (n, n) real, built by a route independent of forward wherever one exists so that the
tests compare two computations. Complex parameters are stored as real tensors with a trailing
dimension of 2, so `hidden_params` (trainable scalars) is the plain sum of numel.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.reference import log2_exact


def check_size(n: int, power_of_two: bool = False, minimum: int = 2) -> int:
    """n itself if it is an int >= minimum (and a power of two when asked); ValueError else."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"layer size must be an integer >= {minimum}, got {n!r}")
    if power_of_two:
        log2_exact(n)  # raises a ValueError naming n
    return n


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> torch.Tensor:
    """i.i.d. N(0, std^2) float32 of `shape` drawn from `generator`."""
    return torch.randn(*shape, generator=generator) * std


def random_orthogonal(count: int, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """count Haar-random orthogonal size x size matrices, float32 (count, size, size)."""
    q, r = torch.linalg.qr(torch.randn(count, size, size, generator=generator, dtype=torch.float64))
    d = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    d[d == 0] = 1.0
    return (q * d.unsqueeze(-2)).float()  # sign fix: without it QR is not Haar distributed


class StructuredLayer(nn.Module):
    """Base class: x (batch, n) -> (batch, n) = x @ matrix().T, no bias.

    Subclasses set `self.n`, implement `forward` (the fast path used in training) and
    override `matrix` with an explicit construction; the default here only applies forward to
    the identity, which is exact but proves nothing about forward.
    """

    n: int

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    @property
    def hidden_params(self) -> int:
        """Trainable scalars: complex parameters count twice (stored real, trailing 2)."""
        return sum(p.numel() for p in self.parameters())

    def param_dtype(self) -> torch.dtype:
        """The real dtype of the parameters (float32 unless the module was cast)."""
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x of shape (batch, {self.n}), got {tuple(x.shape)}")

    def matrix(self) -> torch.Tensor:
        """W (n, n) with forward(x) == x @ W.T: forward on the identity gives W.T."""
        eye = torch.eye(self.n, dtype=self.param_dtype())
        return self(eye).T

    def extra_repr(self) -> str:
        return f"n={self.n}, hidden_params={self.hidden_params}"
