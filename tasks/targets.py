"""The 8 target transforms of docs/protocol.md section 2, and user matrices loaded from a file.

Every target is n x n with indices from 0, computed in float64 / complex128.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch

from kernels.reference import log2_exact


def _idx(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(n), np.arange(n), indexing="ij")


def dft(n: int) -> np.ndarray:
    j, k = _idx(n)
    return np.exp(-2j * np.pi * j * k / n) / math.sqrt(n)


def dct(n: int) -> np.ndarray:
    k, i = _idx(n)
    return 2 / math.sqrt(n) * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


def dst(n: int) -> np.ndarray:
    k, i = _idx(n)
    return 2 / math.sqrt(n) * np.sin(np.pi * (k + 1) * (2 * i + 1) / (2 * n))


def convolution(n: int) -> np.ndarray:
    c = np.random.RandomState(0).randn(n)
    i, j = _idx(n)
    return c[(i - j) % n] / math.sqrt(n)


def hadamard(n: int) -> np.ndarray:
    return scipy.linalg.hadamard(n).astype(np.float64) / math.sqrt(n)


def hartley(n: int) -> np.ndarray:
    j, k = _idx(n)
    arg = 2 * np.pi * j * k / n
    return (np.cos(arg) + np.sin(arg)) / math.sqrt(n)


def legendre(n: int) -> np.ndarray:
    x = -1 + 2 * (np.arange(n) + 1) / (n + 1)
    k = np.arange(n)[:, None]
    return scipy.special.eval_legendre(k, x[None, :]) / math.sqrt(n)


def randn(n: int) -> np.ndarray:
    return np.random.RandomState(0).randn(n, n) / math.sqrt(n)


TARGETS: dict[str, Callable[[int], np.ndarray]] = {
    "dft": dft,
    "dct": dct,
    "dst": dst,
    "convolution": convolution,
    "hadamard": hadamard,
    "hartley": hartley,
    "legendre": legendre,
    "randn": randn,
}


def target_matrix(name: str, n: int) -> torch.Tensor:
    """The named target at size n as float64 or complex128."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    log2_exact(n)
    return torch.from_numpy(np.ascontiguousarray(TARGETS[name](n)))


def check_matrix(a: np.ndarray, source: str) -> torch.Tensor:
    """Validate a user matrix: square, n a power of two >= 4, numeric, finite."""
    if a.dtype.kind not in "fiuc" or a.dtype == np.bool_:
        raise ValueError(f"{source}: matrix must be numeric, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{source}: matrix must be square, got shape {a.shape}")
    n = a.shape[0]
    if n < 4 or n & (n - 1):
        raise ValueError(f"{source}: size must be a power of two >= 4, got {n}")
    if not np.isfinite(a).all():
        raise ValueError(f"{source}: matrix has NaN or infinite entries")
    dtype = np.complex128 if a.dtype.kind == "c" else np.float64
    return torch.from_numpy(np.ascontiguousarray(a.astype(dtype)))


def load_matrix(path: str | Path) -> torch.Tensor:
    """Load a user matrix from .npy (or .txt / .csv) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        elif path.suffix in (".txt", ".csv"):
            a = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
        else:
            raise ValueError(f"{path}: unsupported file type (use .npy, .txt or .csv)")
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read matrix ({exc})") from None
    return check_matrix(np.asarray(a), str(path))


def rmse(approx: torch.Tensor, target: torch.Tensor) -> float:
    """||approx - target||_F / n, the paper's RMSE (complex: over real and imaginary parts)."""
    n = target.shape[0]
    return float(torch.linalg.norm((approx - target).to(torch.complex128)) / n)
