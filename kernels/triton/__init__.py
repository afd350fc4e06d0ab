"""Fused Triton butterfly kernels (CUDA, or CPU under TRITON_INTERPRET=1).

butterfly_multiply_triton(twiddle, x, increasing_stride) has the semantics of
kernels.reference.butterfly_multiply_reference, with autograd; last_config() reports the
launch configuration (passes, tiles, BLOCK_B, num_warps) of the last call for timing records.
"""

from kernels.triton.function import MAX_TILE_N, butterfly_multiply_triton, last_config, plan_passes

__all__ = ["MAX_TILE_N", "butterfly_multiply_triton", "last_config", "plan_passes"]
