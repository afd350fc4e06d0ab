"""The one entry point for a butterfly multiply: picks the best available implementation.

Today every device runs the vectorised torch path of kernels/reference.py (one einsum per
factor); fused Triton kernels for CUDA tensors plug in here.
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
    return butterfly_multiply_reference(twiddle, x, increasing_stride)
