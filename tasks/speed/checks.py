"""Correctness gates run before any timing: a fast but wrong kernel must fail, not win.

`Built` is a provider's ready case (timed fn + check); `autograd_case` and `numpy_case` build
one for a torch-differentiable op (float64 torch oracle) or a parameter-free transform
(numpy/scipy oracle).

Every provider's output (and gradients, where it has a backward) is compared with a float64
reference at the case's n. Errors are relative Frobenius norms; the tolerance models the
roundings a correct implementation makes (see `tolerance`), so it is loose enough for any
correct kernel and orders of magnitude below the O(1) error of a wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
import scipy.linalg
import torch

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "bfloat16": 2.0**-8}
HADAMARD_MATRIX_MAX_N = 4096  # scipy.linalg.hadamard as the oracle up to here (128 MB in fp64)


def tolerance(store: str, acc: str, levels: float, reduction: float) -> float:
    """Allowed relative error of a correct kernel.

    store: precision inputs/outputs/intermediates are rounded to (one rounding per level);
    acc: precision of accumulations; levels: rounded stages in sequence (log2 n for a fast
    transform); reduction: length of the longest sum (n for a dense row, batch for a weight
    gradient), whose random-walk error grows like its square root.
    """
    return UNIT_ROUNDOFF[store] * (8 + 2 * levels) + 2 * UNIT_ROUNDOFF[acc] * math.sqrt(reduction)


def rows_to_check(batch: int, k: int) -> torch.Tensor:
    """Rows of the batch checked against the reference: the first k-1 and the last one."""
    return torch.tensor(sorted(set(range(min(k - 1, batch))) | {batch - 1}))


def to64(t: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(t).detach()
    if device is not None:
        t = t.to(device)
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def relative_error(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """||got - ref|| / ||ref|| in float64, on the reference's device."""
    ref64 = to64(ref)
    got64 = to64(got, ref64.device)
    if got64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(got64.shape)} != reference {tuple(ref64.shape)}")
    scale = torch.linalg.vector_norm(ref64).item()
    return torch.linalg.vector_norm(got64 - ref64).item() / max(scale, 1e-300)


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor | np.ndarray, tol: float) -> None:
    """AssertionError naming `what`, its relative error and the tolerance, if err > tol."""
    err = relative_error(got, ref)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative error {err:.2e} > tolerance {tol:.2e}")


def chunked_param_grads(
    ref_op: Callable[..., torch.Tensor],
    x64: torch.Tensor,
    params64: Sequence[torch.Tensor],
    gy64: torch.Tensor,
    chunk: int = 1024,
) -> list[torch.Tensor]:
    """d<gy, ref_op(x, *params)>/d params in float64 over the whole batch, chunk by chunk.

    Weight gradients sum over the batch, so they are checked on all of it; chunking bounds the
    reference's memory (the oracle keeps every level's activations) at any batch size.
    """
    leaves = [p.detach().requires_grad_(True) for p in params64]
    total = [torch.zeros_like(p) for p in leaves]
    for start in range(0, x64.shape[0], chunk):
        y = ref_op(x64[start : start + chunk], *leaves)
        grads = torch.autograd.grad(y, leaves, gy64[start : start + chunk])
        for acc, g in zip(total, grads, strict=True):
            acc += g
    return total


# --- checked cases: the Built of a provider -------------------------------------------


@dataclass
class Built:
    """A ready case: `fn` is timed; `check` asserts correctness; `info` goes to extra_info."""

    fn: Callable[[], object]
    check: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)
    context: Callable[[], AbstractContextManager[object]] = nullcontext  # entered around both


def autograd_case(
    op: Callable[..., torch.Tensor],
    ref_op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    params: list[torch.Tensor],
    direction: str,
    gen: torch.Generator,
    tols: tuple[float, float, float],
    info: dict[str, Any] | None = None,
    check_rows: int = 64,
) -> Built:
    """A Built for y = op(x, *params), checked against ref_op in float64 (torch autograd).

    tols: (output, grad of x, grads of params). Outputs and x's gradient are checked on
    check_rows rows (rows are independent); params' gradients on the whole batch (they sum
    over it), chunk by chunk.
    """
    names = ["x", *(f"param{i}" for i in range(len(params)))]
    gy = None
    if direction == "forward_backward":
        for t in (x, *params):
            t.requires_grad_(True)
        gy = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        leaves = [x, *params]

        def fn() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            y = op(x, *params)
            return y, torch.autograd.grad(y, leaves, gy)
    else:

        def fn() -> torch.Tensor:
            return op(x, *params)

    def check() -> None:
        res = fn()
        y, grads = res if gy is not None else (res, ())
        rows = rows_to_check(x.shape[0], check_rows).to(x.device)
        p64 = [to64(p) for p in params]
        x64 = to64(x[rows]).requires_grad_(gy is not None)
        y_ref = ref_op(x64, *p64)
        assert_close("output", y.detach()[rows], y_ref, tols[0])
        if gy is None:
            return
        (gx_ref,) = torch.autograd.grad(y_ref, x64, to64(gy[rows]))
        assert_close("grad x", grads[0][rows], gx_ref, tols[1])
        full = chunked_param_grads(ref_op, to64(x), p64, to64(gy))
        for name, got, ref in zip(names[1:], grads[1:], full, strict=True):
            assert_close(f"grad {name}", got, ref, tols[2])

    return Built(fn, check, dict(info or {}))


def numpy_case(
    op: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    direction: str,
    gen: torch.Generator,
    ref: Callable[[np.ndarray], np.ndarray],
    ref_grad: Callable[[np.ndarray], np.ndarray] | None,
    tol: float,
    check_rows: int = 64,
) -> Built:
    """A Built for a parameter-free transform y = op(x), checked against numpy/scipy."""
    gy = None
    if direction == "forward_backward":
        x.requires_grad_(True)
        with torch.no_grad():
            like = op(x)
        gy = torch.randn(like.shape, generator=gen, device=x.device, dtype=like.dtype)

        def fn() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            y = op(x)
            return y, torch.autograd.grad(y, x, gy)
    else:

        def fn() -> torch.Tensor:
            return op(x)

    def check() -> None:
        res = fn()
        y, grads = res if gy is not None else (res, ())
        rows = rows_to_check(x.shape[0], check_rows).to(x.device)
        assert_close("output", y.detach()[rows], ref(_np64(x[rows])), tol)
        if gy is not None and ref_grad is not None:
            assert_close("grad x", grads[0][rows], ref_grad(_np64(gy[rows])), tol)

    return Built(fn, check)


def _np64(t: torch.Tensor) -> np.ndarray:
    return to64(t).cpu().numpy()


# --- float64 oracles of the transforms (numpy / scipy, independent of torch) ----------------


def fft_grad(gy: np.ndarray) -> np.ndarray:
    """x's gradient for y = fft(x): F^H gy = n ifft(gy) (torch's conjugate convention)."""
    return gy.shape[-1] * np.fft.ifft(gy, axis=-1)


def rfft_grad(gy: np.ndarray, n: int) -> np.ndarray:
    """x's gradient for y = rfft(x), x real: Re(F_half^H gy) = Re(n ifft(gy zero-padded to n))."""
    pad = np.zeros(gy.shape[:-1] + (n,), dtype=np.complex128)
    pad[..., : gy.shape[-1]] = gy
    return np.real(n * np.fft.ifft(pad, axis=-1))


def dct2(x: np.ndarray) -> np.ndarray:
    """Unnormalised DCT-II along the last dim: y_k = 2 sum_j x_j cos(pi k (2j+1) / 2n)."""
    return scipy.fft.dct(x, type=2, axis=-1)


def dct2_grad(gy: np.ndarray) -> np.ndarray:
    """C^T gy for the unnormalised DCT-II C: scipy's DCT-III plus gy_0 (its k=0 weight is 1)."""
    return scipy.fft.dct(gy, type=3, axis=-1) + gy[..., :1]


def hadamard(x: np.ndarray) -> np.ndarray:
    """H_n x along the last dim (Sylvester order, unnormalised), in float64.

    The explicit scipy matrix up to HADAMARD_MATRIX_MAX_N; beyond, H_n = H_2 (x) ... (x) H_2
    applied one bit (axis) at a time, an independent route to the same matrix.
    """
    rows, n = x.shape
    if n <= HADAMARD_MATRIX_MAX_N:
        return x @ scipy.linalg.hadamard(n, dtype=np.float64)  # H is symmetric
    m = n.bit_length() - 1
    y = x.reshape(rows, *([2] * m))
    for axis in range(1, m + 1):
        a, b = np.take(y, 0, axis=axis), np.take(y, 1, axis=axis)
        y = np.stack([a + b, a - b], axis=axis)
    return y.reshape(rows, n)
