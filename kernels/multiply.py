"""The one entry point for a butterfly multiply: picks the best available implementation.

CUDA tensors go to the fused Triton kernels (kernels/triton); every other device runs the
vectorised torch path of kernels/reference.py (one einsum per factor).
"""

from __future__ import annotations

import torch

from kernels.reference import butterfly_multiply_reference


def butterfly_multiply(
    twiddle: torch.Tensor, x: torch.Tensor, increasing_stride: bool = True
) -> torch.Tensor:
    """y = B x for x (batch, n).

    twiddle: tied (nblocks, n-1, 2, 2) or untied (nblocks, m, n/2, 2, 2), real or complex.
    """
    if x.is_cuda:
        # imported lazily: Triton decides at import whether to interpret its kernels, and
        # CPU-only callers should not pay for importing it
        from kernels.triton import butterfly_multiply_triton

        return butterfly_multiply_triton(twiddle, x, increasing_stride)
    return butterfly_multiply_reference(twiddle, x, increasing_stride)
