"""The math: butterfly multiply, learnable permutations and structured matrices."""

from kernels.butterfly import Butterfly, ButterflyStack, load_factors, save_factors
from kernels.multiply import butterfly_multiply

__all__ = ["Butterfly", "ButterflyStack", "butterfly_multiply", "load_factors", "save_factors"]
