"""The one entry point for a butterfly multiply: the choice of implementation lives here.

`route(twiddle, x)` names the path a call takes; `butterfly_multiply` takes it:

- "triton": CUDA tensors, the fused Triton kernels (kernels/triton), with autograd.
- "cpu-rows": CPU, no gradient needed, real float32/float64 at any batch: the packed in-place
  C row loop (kernels.cpu.CPUButterfly, or its vectorised torch fallback when there is no C
  compiler), which beats the tiled forward at every batch measured (1 .. 256, n = 64 ..
  4096); complex up to COMPLEX_ROWS_MAX_BATCH rows: the complex row loop
  (kernels.cpu.complex_rows). Cached in a `PlanCache` when one is passed.
- "cpu-tiled": CPU, float32/float64/complex64/complex128 otherwise: the tiled C forward and
  backward (kernels.cpu.tiled), with autograd.
- "reference": everything else (other dtypes or devices, gradients or complex without a C
  compiler): the torch oracle of kernels/reference.py, with autograd. The C kernels' absence
  is warned about once (kernels.cpu.compiled); BUTTERFLY_CPU_BACKEND=torch forces it.

A learned (relaxed) permutation's multiply is chosen here too: `permute_route(perm, x)` names
its path and `relaxed_permutation` takes it (the compiled chain of kernels.cpu.permute with its
own backward when training, its inference plan otherwise, Permutation.forward elsewhere).
"""

from __future__ import annotations

import torch

from kernels.cpu import CPUButterfly
from kernels.cpu.compiled import forced_torch, library
from kernels.cpu.complex_rows import ComplexRowPlan
from kernels.cpu.permute import PermutationPlanCache, relaxed_permute
from kernels.cpu.tiled import butterfly_multiply_tiled, tiled_dtype
from kernels.permutation import Permutation
from kernels.reference import butterfly_multiply_reference

ROW_DTYPES = (torch.float32, torch.float64)
PERMUTE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
# the complex row loop beats the tiled forward up to here (n = 1024: crossover 4 .. 16 rows)
COMPLEX_ROWS_MAX_BATCH = 8


class PlanCache:
    """A layer's packed row-loop plan, remembered with the call it fits.

    Keyed on the twiddle's storage, version counter, dtype and stride order, on x's dtype and
    device, on whether a gradient is needed and (complex only) on whether the batch is small,
    so an optimiser step (in place: a new version) is seen. An edit through `.data` bypasses
    the version counter: call `clear()` after one.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple | None = None
        self._plan: CPUButterfly | ComplexRowPlan | None = None
        self._real = False  # the plan is the real row loop, which adds the bias itself

    def lookup(
        self,
        twiddle: torch.Tensor,
        x: torch.Tensor,
        increasing: bool,
        bias: torch.Tensor | None = None,
    ) -> CPUButterfly | ComplexRowPlan | None:
        """The row-loop plan for this call, built at most once per key; None off that path."""
        # kept lean: every tensor attribute read here costs about 0.1 us at batch 1
        t, grad = twiddle, torch.is_grad_enabled()
        xd, td = x.dtype, t.dtype
        # only a complex call's route depends on the batch (COMPLEX_ROWS_MAX_BATCH)
        small = xd.is_complex or td.is_complex
        small = small and x.dim() == 2 and x.shape[0] <= COMPLEX_ROWS_MAX_BATCH
        key = (t.data_ptr(), t._version, td, xd, x.is_cpu, increasing,
               grad and (t.requires_grad or x.requires_grad), small)  # fmt: skip
        # a bias to train (grad mode on, bias.requires_grad) is never fused: key both
        if bias is not None:
            key += (bias.data_ptr(), bias._version, grad and bias.requires_grad)
        if key != self._key:
            plan = None
            if route(twiddle, x) == "cpu-rows" and not _bias_grad(bias):
                plan = _row_plan(twiddle, x, increasing, bias)
            self._key, self._plan = key, plan
            self._real = isinstance(plan, CPUButterfly)
        return self._plan

    def __getstate__(self) -> dict:
        # the plan holds ctypes buffers: not copied
        return {"_key": None, "_plan": None, "_real": False}


def _row_plan(
    twiddle: torch.Tensor, x: torch.Tensor, increasing: bool, bias: torch.Tensor | None
) -> CPUButterfly | ComplexRowPlan:
    """The row loop for this call; a real one adds a real bias itself (fused)."""
    if x.is_complex() or twiddle.is_complex():
        return ComplexRowPlan(twiddle.to(x.dtype) if x.is_complex() else twiddle, increasing)
    return CPUButterfly(twiddle.detach(), increasing, dtype=x.dtype, bias=bias)


def _bias_grad(bias: torch.Tensor | None) -> bool:
    return bias is not None and bias.requires_grad and torch.is_grad_enabled()


def _add_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y with bias added to its first len(bias) columns (in place without autograd)."""
    if bias.shape[0] < y.shape[1]:
        bias = torch.nn.functional.pad(bias, (0, y.shape[1] - bias.shape[0]))
    return y + bias if torch.is_grad_enabled() else y.add_(bias)


def _needs_grad(twiddle: torch.Tensor, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (twiddle.requires_grad or x.requires_grad)


def route(twiddle: torch.Tensor, x: torch.Tensor) -> str:
    """The path butterfly_multiply(twiddle, x) takes: see the module doc."""
    if x.is_cuda:
        return "triton"
    dtype = tiled_dtype(twiddle, x)
    if dtype is None:
        return "reference"
    grad = _needs_grad(twiddle, x)
    if dtype in ROW_DTYPES and not grad:
        return "cpu-rows"  # without a compiler: the plan's vectorised torch fallback
    if forced_torch() or library() is None:
        return "reference"
    if not grad and x.dim() == 2 and x.shape[0] <= COMPLEX_ROWS_MAX_BATCH:
        return "cpu-rows"
    return "cpu-tiled"


def butterfly_multiply(
    twiddle: torch.Tensor,
    x: torch.Tensor,
    increasing_stride: bool = True,
    *,
    cache: PlanCache | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = B x (+ bias on the first len(bias) columns) for x (batch, n).

    twiddle: tied (nblocks, n-1, 2, 2) or untied (nblocks, m, n/2, 2, 2), real or complex.
    cache: where the row loop keeps its packed twiddle between calls (Butterfly passes one).
    bias: (k,) with k <= n; the real row loop adds it in its own call (one op less at batch 1).
    """
    if cache is not None:
        plan = cache.lookup(twiddle, x, increasing_stride, bias)
        if plan is not None:
            if cache._real:  # the key holds x's device and dtype and no gradient: run() fits
                return plan.run(x)
            y = plan(x)
            return y if bias is None else _add_bias(y, bias)
    path = route(twiddle, x)
    if path == "cpu-rows":
        fuse = bias is not None and not _bias_grad(bias)  # a bias to train is added by torch
        plan = _row_plan(twiddle, x, increasing_stride, bias if fuse else None)
        y = plan(x)
        fused = fuse and isinstance(plan, CPUButterfly)
        return y if bias is None or fused else _add_bias(y, bias)
    if path == "triton":
        # imported lazily: Triton decides at import whether to interpret its kernels, and
        # CPU-only callers should not pay for importing it
        from kernels.triton import butterfly_multiply_triton

        y = butterfly_multiply_triton(twiddle, x, increasing_stride)
    elif path == "cpu-tiled":
        y = butterfly_multiply_tiled(twiddle, x, increasing_stride)
    else:
        y = butterfly_multiply_reference(twiddle, x, increasing_stride)
    return y if bias is None else _add_bias(y, bias)


def permute_route(perm: Permutation, x: torch.Tensor) -> str:
    """The path relaxed_permutation(perm, x) takes.

    "cpu-relaxed": CPU, float32/64 or complex64/128, grad mode on, a C compiler: the compiled
    chain with its own backward (relaxed_permute). "cpu-plan": the same without grad mode: the
    inference plan (PermutationPlanCache). "torch": everything else, Permutation.forward.
    """
    if x.device.type != "cpu" or x.dtype not in PERMUTE_DTYPES or forced_torch():
        return "torch"
    if library() is None:
        return "torch"
    return "cpu-relaxed" if torch.is_grad_enabled() else "cpu-plan"


def relaxed_permutation(
    perm: Permutation, x: torch.Tensor, cache: PermutationPlanCache | None = None
) -> torch.Tensor:
    """perm(x) for x (batch, n) on the path permute_route names; `cache` keeps inference plans."""
    path = permute_route(perm, x)
    if path == "cpu-relaxed":
        return relaxed_permute(x, perm.probs(), perm.top_only)
    if path == "cpu-plan":
        plan = (cache or PermutationPlanCache()).lookup(perm, x.dtype)
        if plan is not None:
            return plan(x)
    return perm(x)
