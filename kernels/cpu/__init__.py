"""Fast butterfly multiply on the CPU: the paper's "compiled in-place loop", and more.

Modules: this one (the real row loop for inference, CPUButterfly), tiled.py (compiled
forward and backward for training, real and complex, an autograd Function), complex_rows.py
(the complex row loop for inference at small batch), permute.py (relaxed permutations at
inference), columns.py (relaxed permutation levels on a matrix's columns with autograd, for
kernels/bp_matrix.py), compiled.py (build and bind the C of csource*.py), bench.py (the timing
table). kernels/multiply.py chooses between them.

y = B x (and BP's y = B P x) for real float32/float64 inputs, one thread. x is copied (or, for
BP, gathered through P) once into the output buffer, then every level of every block runs in
place on it. Two implementations with identical semantics to kernels.reference:

- "c": the C loop of csource.py, compiled at first use (compiled.py) and called via ctypes;
- "torch-vectorised": per level, in-place elementwise ops on strided views of the output (no
  einsum, no new tensor per level), used when no compiler is available or the build fails.

`backend()` says which one runs and why; the `impl` argument or $BUTTERFLY_CPU_BACKEND
("auto", "c", "torch") chooses. The one-shot functions pack the twiddle on every call (tens of
microseconds); `CPUButterfly` packs it once and passes all fixed kernel arguments in one
preset array, which leaves a few microseconds of Python and ctypes overhead per call (the
kernel itself takes 0.3 us at n = 64); pass a preallocated `out` to also skip the allocation.
"""

from __future__ import annotations

import threading

import torch

from kernels.cpu.compiled import BFLY_ARGV, backend, compiled_available, forced_torch, library
from kernels.cpu.hadamard import fwht
from kernels.reference import butterfly_multiply_reference, log2_exact

__all__ = [
    "CPUButterfly",
    "backend",
    "bp_multiply_cpu",
    "butterfly_multiply_cpu",
    "compiled_available",
    "fwht",
    "pack_twiddle",
]

FAST_DTYPES = (torch.float32, torch.float64)


def twiddle_geometry(twiddle: torch.Tensor) -> tuple[bool, int, int, int]:
    """(tied, nblocks, n, m) of a tied or untied twiddle; a one-line ValueError if malformed."""
    shape = tuple(twiddle.shape)
    if twiddle.dim() == 5 and shape[-2:] == (2, 2):
        nblocks, m, half = shape[:3]
        n = 2 * half
        if n < 2 or log2_exact(n) != m:
            raise ValueError(f"untied twiddle must be (nblocks, m, 2**m / 2, 2, 2), got {shape}")
        return False, nblocks, n, m
    if twiddle.dim() == 4 and shape[-2:] == (2, 2):
        nblocks, n = shape[0], shape[1] + 1
        if n < 2:
            raise ValueError(f"tied twiddle must be (nblocks, n-1, 2, 2) with n >= 2, got {shape}")
        return True, nblocks, n, log2_exact(n)
    raise ValueError(
        f"twiddle must be tied (nblocks, n-1, 2, 2) or untied (nblocks, m, n/2, 2, 2), got {shape}"
    )


def pack_twiddle(twiddle: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The structure-of-arrays layout the in-place loops read (O(nblocks n log n), done once).

    untied (nblocks, m, n/2, 2, 2) -> (nblocks, m, 4, n/2): d1..d4 of a level each contiguous.
    tied (nblocks, n-1, 2, 2) -> (nblocks, 4, n): level l's s matrices at [s, 2s) of each array
    (entry 0 unused, so every level starts at an index that is a multiple of its length).
    """
    tied, nblocks, n, m = twiddle_geometry(twiddle)
    tw = twiddle.detach().to(device="cpu", dtype=dtype or twiddle.dtype)
    if not tied:
        return tw.reshape(nblocks, m, n // 2, 4).transpose(2, 3).contiguous()
    packed = torch.zeros(nblocks, 4, n, dtype=tw.dtype)
    packed[:, :, 1:] = tw.reshape(nblocks, n - 1, 4).transpose(1, 2)
    return packed


class CPUButterfly:
    """A butterfly (optionally after a gather permutation: y = B x[:, perm]) ready to apply.

    The twiddle is prepacked at construction (a snapshot: later edits of `twiddle` are not
    seen) and the kernel chosen once, so each call costs one ctypes call plus an output
    allocation (none if `out` is passed). Forward only: a call whose x needs a gradient raises.
    bias (k <= n entries, a snapshot too) is added to the first k outputs in the same call.
    """

    def __init__(
        self,
        twiddle: torch.Tensor,
        increasing_stride: bool = True,
        perm: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        impl: str | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.tied, self.nblocks, self.n, self.m = twiddle_geometry(twiddle)
        self.dtype = dtype or twiddle.dtype
        if self.dtype not in FAST_DTYPES:
            raise ValueError(f"CPUButterfly needs float32 or float64, got {self.dtype}")
        self.increasing_stride = increasing_stride
        self._itemsize = 4 if self.dtype == torch.float32 else 8
        self._packed = pack_twiddle(twiddle, self.dtype)
        self._perm = None if perm is None else _check_perm(perm, self.n)
        lib = None if forced_torch(impl) else library()
        self._fn = None if lib is None else lib.bfly_argv[self.dtype]
        # every argument but x's pointer and strides, out's pointer and the batch is fixed: set
        # them once; the lock keeps two threads from interleaving their writes to the array
        # (ctypes releases the GIL during the call)
        perm_ptr = 0 if self._perm is None else self._perm.data_ptr()
        self._bias = None
        if bias is not None:
            if bias.dim() != 1 or bias.shape[0] > self.n or bias.is_complex():
                raise ValueError(f"bias must be real with at most {self.n} entries")
            self._bias = bias.detach().to(device="cpu", dtype=self.dtype).contiguous()
        bias_ptr = 0 if self._bias is None else self._bias.data_ptr()
        nbias = 0 if self._bias is None else self._bias.shape[0]
        self._args = BFLY_ARGV(
            0, 0, 0, perm_ptr, 0, 0, self.n, self._packed.data_ptr(), self.nblocks,
            self.tied, increasing_stride, bias_ptr, nbias,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._steps = None if self._fn is not None else self._level_views()

    @property
    def backend(self) -> str:
        """'c' or 'torch-vectorised'."""
        return "c" if self._fn is not None else "torch-vectorised"

    def _level_views(self) -> list[tuple[int, *tuple[torch.Tensor, ...]]]:
        # (s, d1, d2, d3, d4) in application order, each d shaped to broadcast against the
        # (batch, n/2s, s) views of the top and bottom halves of every group
        steps = []
        n, m = self.n, self.m
        order = range(m) if self.increasing_stride else range(m - 1, -1, -1)
        for b in range(self.nblocks):
            for level in order:
                s = 1 << level
                if self.tied:
                    ds = [self._packed[b, k, s : 2 * s] for k in range(4)]
                else:
                    ds = [self._packed[b, level, k].view(n // (2 * s), s) for k in range(4)]
                steps.append((s, *ds))
        return steps

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """y = B x (or B x[:, perm]) for x (batch, n), any strides; written to out if given."""
        # kept lean: at n = 64 these few checks cost as much as the butterfly itself
        shape = x.shape
        if len(shape) != 2 or shape[1] != self.n or not x.is_cpu:
            raise ValueError(f"x must be a CPU tensor (batch, {self.n}), got {tuple(shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("CPUButterfly is forward only; use the reference for autograd")
        if x.dtype is not self.dtype:
            x = x.to(self.dtype)
        batch, n = shape
        xp = x.data_ptr()
        s0, s1 = x.stride()
        if out is None:
            out = x.new_empty(batch, n)  # x's dtype and device: faster than torch.empty's kwargs
            op = out.data_ptr()
        else:
            op = _check_out(out, x, xp, s0, s1, self._itemsize, self._perm is not None)
        fn = self._fn
        if fn is None:
            self._apply_torch(x, out)
            return out
        args, lock = self._args, self._lock
        lock.acquire()
        try:
            args[0], args[1], args[2], args[4], args[5] = xp, s0, s1, op, batch
            fn(args)
        finally:
            lock.release()
        return out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """__call__ without its device, dtype and autograd checks, for a caller that has made
        them (kernels.multiply's PlanCache keys its plan on them): x's shape is still checked."""
        shape = x.shape
        if len(shape) != 2 or shape[1] != self.n:
            raise ValueError(f"x must be a CPU tensor (batch, {self.n}), got {tuple(shape)}")
        batch = shape[0]
        out = x.new_empty(batch, self.n)
        fn = self._fn
        if fn is None:
            self._apply_torch(x, out)
            return out
        args, lock = self._args, self._lock
        xp, (s0, s1), op = x.data_ptr(), x.stride(), out.data_ptr()
        lock.acquire()
        try:
            args[0], args[1], args[2], args[4], args[5] = xp, s0, s1, op, batch
            fn(args)
        finally:
            lock.release()
        return out

    def _apply_torch(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self._perm is not None:
            torch.index_select(x, 1, self._perm, out=out)
        elif out.data_ptr() != x.data_ptr():
            out.copy_(x)
        batch, n = out.shape
        for s, d1, d2, d3, d4 in self._steps:
            v = out.view(batch, n // (2 * s), 2, s)
            top, bot = v[:, :, 0], v[:, :, 1]
            t = top.clone()  # the one temporary: top is overwritten before bot reads it
            top.mul_(d1).addcmul_(bot, d2)
            bot.mul_(d4).addcmul_(t, d3)
        if self._bias is not None:
            out[:, : self._bias.shape[0]] += self._bias


def _check_perm(perm: torch.Tensor, n: int) -> torch.Tensor:
    # the C gather reads x[perm[i]] unchecked: validate the range once here
    if perm.dim() != 1 or perm.shape[0] != n or perm.is_floating_point() or perm.is_complex():
        raise ValueError(f"perm must be {n} integer indices, got {perm.dtype} {tuple(perm.shape)}")
    perm = perm.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise ValueError(f"perm indices must lie in [0, {n})")
    return perm


def _check_out(
    out: torch.Tensor, x: torch.Tensor, xp: int, s0: int, s1: int, size: int, gather: bool
) -> int:
    """out's data pointer, once out is known to fit x (batch, n) and to be safe to write.

    xp, s0, s1, size: x's data pointer, strides and element size, which the caller has anyway.
    """
    if out.dtype is not x.dtype or out.shape != x.shape or not out.is_cpu:
        raise ValueError(f"out must be {x.dtype} {tuple(x.shape)} on the CPU")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    op = out.data_ptr()
    batch, n = x.shape
    if batch == 0 or n == 0:
        return op
    x_end = xp + ((batch - 1) * s0 + (n - 1) * s1 + 1) * size
    if xp < op + batch * n * size and op < x_end:
        # out is x (without a gather) is fine; any other overlap would read values the loop
        # has already overwritten
        if op != xp or gather or not x.is_contiguous():
            raise ValueError("out overlaps x (only out is x, without a permutation, is allowed)")
    return op


def _needs_reference(twiddle: torch.Tensor, x: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled() and (x.requires_grad or twiddle.requires_grad)
    fast = x.dtype in FAST_DTYPES and twiddle.dtype in FAST_DTYPES
    cpu = x.device.type == "cpu" and twiddle.device.type == "cpu"
    return grad or not fast or not cpu


def _reference_into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return y if out is None else out.copy_(y)


def butterfly_multiply_cpu(
    twiddle: torch.Tensor,
    x: torch.Tensor,
    increasing_stride: bool = True,
    *,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """y = B_{nblocks-1} ... B_0 x for x (batch, n): kernels.reference semantics, fast.

    twiddle tied (nblocks, n-1, 2, 2) or untied (nblocks, m, n/2, 2, 2). Real float32/float64 on
    the CPU run the compiled loop (or its torch fallback) in the promoted dtype; anything else
    (x or twiddle needing a gradient, complex or half dtypes, another device) is handed to
    kernels.reference.butterfly_multiply_reference, which supports autograd. Packs the twiddle
    on every call: use CPUButterfly to pack once for repeated multiplies.
    """
    if _needs_reference(twiddle, x):
        return _reference_into(butterfly_multiply_reference(twiddle, x, increasing_stride), out)
    dtype = torch.promote_types(x.dtype, twiddle.dtype)
    return CPUButterfly(twiddle, increasing_stride, dtype=dtype, impl=impl)(x, out=out)


def bp_multiply_cpu(
    twiddle: torch.Tensor,
    perm: torch.Tensor,
    x: torch.Tensor,
    increasing_stride: bool = True,
    *,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """BP: y = B P x = B (x[:, perm]) for x (batch, n); P's gather is the one copy into out.

    Same dtypes, fallbacks and twiddle layouts as butterfly_multiply_cpu.
    """
    if _needs_reference(twiddle, x):
        _, _, n, _ = twiddle_geometry(twiddle)
        perm = _check_perm(perm, n).to(x.device)
        y = butterfly_multiply_reference(twiddle, x[:, perm], increasing_stride)
        return _reference_into(y, out)
    dtype = torch.promote_types(x.dtype, twiddle.dtype)
    return CPUButterfly(twiddle, increasing_stride, perm, dtype=dtype, impl=impl)(x, out=out)
