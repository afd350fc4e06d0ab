"""Fast Walsh-Hadamard transform along the last dim: y = H_n x, unnormalised, Sylvester order.

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] (scipy.linalg.hadamard's order), so H_n H_n = n I.
The same in-place loop as the butterfly with every 2x2 matrix [[1, 1], [1, -1]]: compiled when
available (float32/float64 on the CPU, no gradient needed), else per level in-place torch ops on
strided views of one copy of x (any dtype or device; autograd works through them).
"""

from __future__ import annotations

import torch

from kernels.cpu.compiled import forced_torch, library
from kernels.reference import log2_exact


def fwht(x: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """H_n x along the last dim of x (..., n), n a power of two; a new tensor.

    impl: "auto" / "c" / "torch", as for butterfly_multiply_cpu (default $BUTTERFLY_CPU_BACKEND).
    """
    if x.dim() == 0:
        raise ValueError("fwht needs at least one dimension")
    n = x.shape[-1]
    log2_exact(n)
    compiled = (
        x.dtype in (torch.float32, torch.float64)
        and x.is_cpu
        and not (x.requires_grad and torch.is_grad_enabled())
        and not forced_torch(impl)
    )
    if compiled:
        lib = library()
        assert lib is not None  # forced_torch is False only when the library is loaded
        # no gradient is needed here, so the clone is not tracked (no detach call needed)
        out = x.clone(memory_format=torch.contiguous_format)
        if out.numel():
            lib.fwht[x.dtype](out.data_ptr(), out.numel() // n, n)
        return out
    return fwht_torch(x)


def fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """The vectorised fallback: one copy of x, then log2 n in-place passes on strided views."""
    n = x.shape[-1]
    m = log2_exact(n)
    out = x.clone(memory_format=torch.contiguous_format)
    rows = out.reshape(-1, n)  # a view: out is contiguous
    for level in range(m):
        s = 1 << level
        v = rows.view(rows.shape[0], n // (2 * s), 2, s)
        top, bot = v[:, :, 0], v[:, :, 1]
        t = top.clone()  # top is overwritten before bot reads it
        top.add_(bot)
        bot.neg_().add_(t)  # bot <- t - bot
    return out
