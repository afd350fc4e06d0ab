"""Providers of the speed benchmark, as data: adding a baseline adds one entry to PROVIDERS.

A provider's factory(n, batch, dtype, device, direction, generator) pre-builds every input and
returns a `Built`: `fn`, the zero-argument callable that is timed, and `check`, which runs the
provider on those inputs and asserts it matches a float64 oracle (tasks/speed/checks.py).
Shapes: x (batch, n) -> y (batch, n) (rfft: (batch, n/2 + 1) complex); weights n x n;
tied twiddles (1, n-1, 2, 2), untied (1, log2 n, n/2, 2, 2) (layout: kernels/reference.py).

flops and bytes are models, per forward call: bytes is the compulsory traffic (inputs read
once, outputs written once, parameters read once: docs/protocol.md section 6's floor), so
bytes / time against the machine's copy bandwidth says how close a kernel is to the limit.
forward_backward multiplies both by the provider's `backward_factor`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kernels.butterfly import init_twiddle
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_multiply_reference, log2_exact
from tasks.speed import checks
from tasks.speed.cases import DEVICES, Case, Grid, SpeedParams
from tasks.speed.checks import Built

GPU, CPU, BOTH = ("cuda",), ("cpu",), ("cpu", "cuda")
FWD, FWD_BWD = ("forward",), ("forward", "forward_backward")
F32, BF16 = ("float32",), ("bfloat16",)


Factory = Callable[[int, int, torch.dtype, torch.device, str, torch.Generator], Built]


@dataclass(frozen=True)
class Provider:
    name: str
    devices: tuple[str, ...]
    directions: tuple[str, ...]
    dtypes: tuple[str, ...]
    factory: Factory
    flops: Callable[[int, int], float]  # (n, batch) -> flops of one forward call
    bytes: Callable[[int, int, int], float]  # (n, batch, itemsize) -> compulsory bytes, forward
    footprint: Callable[[int, int, int], float]  # (n, batch, itemsize) -> peak bytes, forward
    backward_factor: float = 1.0
    module: str | None = None  # import needed; its failure is a recorded skip
    note: str = ""

    def flops_for(self, case: Case) -> float:
        fb = self.backward_factor if case.direction == "forward_backward" else 1.0
        return self.flops(case.n, case.batch) * fb

    def bytes_for(self, case: Case) -> float:
        fb = self.backward_factor if case.direction == "forward_backward" else 1.0
        return self.bytes(case.n, case.batch, case.torch_dtype.itemsize) * fb

    def unavailable(self) -> str | None:
        """None if the implementation imports, else 'not available: <error>'."""
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except Exception as exc:  # any import failure (missing module, no compiler, no triton)
            return f"not available: {type(exc).__name__}: {exc}"
        return None


# --- shared building blocks ----------------------------------------------------------------


def _cpu_generator(gen: torch.Generator) -> torch.Generator:
    # twiddle inits draw on the CPU (QR in float64): seed a CPU generator from the case's one
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    return torch.Generator().manual_seed(seed)


def _twiddle(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: Any):
    # orthogonal 2x2 factors keep B orthogonal: no overflow or cancellation at n = 2^14 in bf16
    return init_twiddle(shape, False, "ortho", _cpu_generator(gen)).to(device, dtype)


@contextlib.contextmanager
def _fp32_matmul(precision: str, device: torch.device) -> Iterator[None]:
    """cuBLAS fp32 matmul precision ('ieee' or 'tf32') for the duration; CPUs are unaffected."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = flags.fp32_precision
    flags.fp32_precision = precision
    try:
        yield
    finally:
        flags.fp32_precision = old


# --- factories -----------------------------------------------------------------------------


def _dense(precision: str) -> Factory:
    """nn.Linear's product y = x W^T; precision: float32 (TF32 off), tf32 or bfloat16."""

    def factory(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
        w = torch.randn(n, n, generator=gen, device=device, dtype=dtype) / math.sqrt(n)
        x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
        out = torch.empty(batch, n, device=device, dtype=dtype)
        if direction == "forward":  # a preallocated output: time the product, not the allocator
            op = lambda x, w: torch.mm(x, w.t(), out=out)  # noqa: E731
        else:
            op = F.linear
        tols = (
            checks.tolerance(precision, "float32", 1, n),
            checks.tolerance(precision, "float32", 1, n),
            checks.tolerance(precision, "float32", 1, batch),
        )
        ref = lambda x, w: x @ w.t()  # noqa: E731
        built = checks.autograd_case(op, ref, x, [w], direction, gen, tols, None, check_rows)
        mode = "tf32" if precision == "tf32" else "ieee"
        built.context = lambda: _fp32_matmul(mode, torch.device(device))
        built.info = {"matmul_precision": precision}
        return built

    return factory


def _butterfly_bp(kernel: str) -> Factory:
    """The paper's BP: y = B P x, tied twiddle (4(n-1) numbers), P the bit-reversal gather."""

    def factory(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
        tw = _twiddle((1, n - 1, 2, 2), gen, dtype, device)
        perm = bit_reversal(n).to(device)
        x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
        info = {"twiddle": "tied", "permutation": "bit-reversal gather"}
        if kernel == "cpu":
            from kernels.cpu import CPUButterfly, backend

            bp = CPUButterfly(tw, perm=perm)  # packs the twiddle once, outside the timing
            out = torch.empty(batch, n, dtype=dtype)
            op = lambda x, tw: bp(x, out=out)  # noqa: E731
            info.update(backend=bp.backend, backend_detail=backend())
        else:
            op = lambda x, tw: butterfly_multiply_reference(tw, x[:, perm])  # noqa: E731
        m = log2_exact(n)
        tols = tuple(checks.tolerance("float32", "float32", m, r) for r in (2, 2, batch * n))
        ref = lambda x, tw: butterfly_multiply_reference(tw, x[:, perm])  # noqa: E731
        return checks.autograd_case(op, ref, x, [tw], direction, gen, tols, info, check_rows)

    return factory


def _butterfly_triton(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
    """The fused Triton kernel on an untied twiddle (the GPU layer: 2 n log2 n numbers), no P."""
    from kernels import triton as bt

    m = log2_exact(n)
    tw = _twiddle((1, m, n // 2, 2, 2), gen, dtype, device)
    x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
    store = "bfloat16" if dtype == torch.bfloat16 else "float32"
    tols = tuple(checks.tolerance(store, "float32", m, r) for r in (2, 2, batch * n))
    op = lambda x, tw: bt.butterfly_multiply_triton(tw, x)  # noqa: E731
    ref = lambda x, tw: butterfly_multiply_reference(tw, x)  # noqa: E731
    info = {"twiddle": "untied"}
    built = checks.autograd_case(op, ref, x, [tw], direction, gen, tols, info, check_rows)
    inner = built.check

    def check() -> None:
        inner()  # the check ran the timed call: record the launches it made
        built.info["launch_config"] = bt.last_config("forward")
        if direction == "forward_backward":
            built.info["launch_config_backward"] = bt.last_config("backward")

    built.check = check
    return built


def _fft(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
    """torch.fft.fft of a complex input (complex64 for float32): cuFFT on a GPU."""
    x = torch.randn(batch, n, generator=gen, device=device, dtype=torch.complex64)
    out = torch.empty_like(x)
    op = (lambda x: torch.fft.fft(x, out=out)) if direction == "forward" else torch.fft.fft
    tol = checks.tolerance("float32", "float32", log2_exact(n), 1)
    built = checks.numpy_case(op, x, direction, gen, np.fft.fft, checks.fft_grad, tol, check_rows)
    built.info = {"input_dtype": "complex64"}
    return built


def _rfft(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
    """torch.fft.rfft of a real input: n/2 + 1 complex outputs."""
    x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
    out = torch.empty(batch, n // 2 + 1, device=device, dtype=torch.complex64)
    op = (lambda x: torch.fft.rfft(x, out=out)) if direction == "forward" else torch.fft.rfft
    tol = checks.tolerance("float32", "float32", log2_exact(n), 1)
    grad = lambda gy: checks.rfft_grad(gy, n)  # noqa: E731
    return checks.numpy_case(op, x, direction, gen, np.fft.rfft, grad, tol, check_rows)


def _dct(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
    """DCT-II (scipy's unnormalised scale) by Makhoul: reorder, one complex FFT of length n."""
    theta = math.pi * torch.arange(n, dtype=torch.float64) / (2 * n)
    c = (2 * torch.cos(theta)).to(device, dtype)
    s = (2 * torch.sin(theta)).to(device, dtype)
    idx = torch.arange(n)
    order = torch.cat([idx[0::2], idx[1::2].flip(0)]).to(device)  # v = [x_even, reversed x_odd]

    def op(x: torch.Tensor) -> torch.Tensor:
        # four ops (gather, fft, two fused multiplies): at small n each op's overhead dominates
        z = torch.fft.fft(x.index_select(-1, order))
        return torch.addcmul(z.real * c, z.imag, s)  # 2 Re(exp(-i pi k / 2n) z_k)

    x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
    tol = checks.tolerance("float32", "float32", log2_exact(n) + 2, 1)
    return checks.numpy_case(op, x, direction, gen, checks.dct2, checks.dct2_grad, tol, check_rows)


def _hadamard(n, batch, dtype, device, direction, gen, check_rows=64) -> Built:
    """Fast Walsh-Hadamard, unnormalised: the compiled loop on a CPU, torch views on a GPU."""
    from kernels.cpu import backend, fwht
    from kernels.cpu.hadamard import fwht_torch

    x = torch.randn(batch, n, generator=gen, device=device, dtype=dtype)
    cpu = torch.device(device).type == "cpu"
    tol = checks.tolerance("float32", "float32", log2_exact(n), 2)
    op = fwht if cpu else fwht_torch
    built = checks.numpy_case(op, x, direction, gen, checks.hadamard, None, tol, check_rows)
    built.info = {"backend": backend() if cpu else "torch-vectorised"}
    return built


# --- the registry --------------------------------------------------------------------------


def _lg(n: int) -> int:
    return n.bit_length() - 1


def _acts(k: float) -> Callable[[int, int, int], float]:
    # k activation-sized tensors in the case dtype (complex counts twice); numpy-checked
    # providers copy only check_rows rows to float64, which is negligible
    return lambda n, b, s: k * b * n * s


def _bfly_footprint(saved: Callable[[int], int]) -> Callable[[int, int, int], float]:
    # x, y, dy, dx + `saved` activations per row in the case dtype; the float64 check holds x
    # and dy whole (16 bytes a row entry) and one 1024-row chunk of the oracle's activations
    return lambda n, b, s: b * n * (s * (4 + saved(n)) + 16) + 8 * 1024 * n * (_lg(n) + 2)


_BP_BYTES = lambda n, b, s: s * (2 * b * n + 4 * n) + 8 * n  # noqa: E731  x, y, tied tw, perm
_DENSE = dict(
    directions=FWD_BWD,
    flops=lambda n, b: 2.0 * b * n * n,
    bytes=lambda n, b, s: s * (n * n + 2 * b * n),
    footprint=lambda n, b, s: 2 * n * n * (s + 8) + b * n * (4 * s + 16),  # W, dW (+fp64)
    backward_factor=3.0,  # dx = dy W and dW = dy^T x: two more products of the same size
)
_BFLY = dict(flops=lambda n, b: 3.0 * b * n * _lg(n), backward_factor=3.0)

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("butterfly_triton", GPU, FWD_BWD, F32 + BF16, _butterfly_triton, **_BFLY,
                 bytes=lambda n, b, s: s * (2 * b * n + 2 * n * _lg(n)),
                 footprint=_bfly_footprint(lambda n: 0),
                 module="kernels.triton", note="fused Triton forward/backward, untied twiddle"),
        Provider("butterfly_cpu", CPU, FWD, F32, _butterfly_bp("cpu"), **_BFLY, bytes=_BP_BYTES,
                 footprint=_acts(3), module="kernels.cpu",
                 note="the paper's BP: compiled in-place loop after the P gather"),
        Provider("butterfly_reference", BOTH, FWD_BWD, F32, _butterfly_bp("reference"), **_BFLY,
                 bytes=_BP_BYTES, footprint=_bfly_footprint(_lg),  # autograd keeps each level
                 note="the oracle (one einsum per level), for scale"),
        Provider("dense_fp32", BOTH, dtypes=F32, factory=_dense("float32"), **_DENSE),
        Provider("dense_tf32", GPU, dtypes=F32, factory=_dense("tf32"), **_DENSE),
        Provider("dense_bf16", GPU, dtypes=BF16, factory=_dense("bfloat16"), **_DENSE),
        Provider("fft", BOTH, FWD_BWD, F32, _fft, flops=lambda n, b: 5.0 * b * n * _lg(n),
                 bytes=lambda n, b, s: 4.0 * s * b * n, footprint=_acts(12), backward_factor=2.0,
                 note="complex input; numpy's complex FFT of the paper"),
        Provider("rfft", BOTH, FWD_BWD, F32, _rfft, flops=lambda n, b: 2.5 * b * n * _lg(n),
                 bytes=lambda n, b, s: s * b * n + 2.0 * s * b * (n // 2 + 1),
                 footprint=_acts(6), backward_factor=2.0),
        Provider("dct", BOTH, FWD_BWD, F32, _dct,
                 flops=lambda n, b: 5.0 * b * n * _lg(n) + 4.0 * b * n,
                 bytes=lambda n, b, s: 2.0 * s * b * n, footprint=_acts(10), backward_factor=2.0,
                 note="DCT-II: Makhoul reordering + one complex FFT of length n"),
        Provider("hadamard", BOTH, FWD, F32, _hadamard, flops=lambda n, b: 1.0 * b * n * _lg(n),
                 bytes=lambda n, b, s: 2.0 * s * b * n, footprint=_acts(3), module="kernels.cpu"),
    )
}  # fmt: skip


def available_memory(device: str) -> float:
    """Bytes free for a case: CUDA's free memory, or the CPU's MemAvailable."""
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf  # unknown: let the allocator decide (an OOM is still a recorded skip)


def skip_reason(prov: Provider, case: Case, params: SpeedParams) -> str | None:
    """Why this case cannot run here (device, import, n cap, memory), or None."""
    if case.device not in prov.devices:
        return f"{prov.name} runs on {'/'.join(prov.devices)} only; this run is on {case.device}"
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU; none is visible"
    missing = prov.unavailable()
    if missing:
        return missing
    cap = params.cap(prov.name, case.device)
    if cap is not None and case.n > cap:
        return f"n={case.n} is above max_n={cap} for {prov.name} on {case.device} (params)"
    need = prov.footprint(case.n, case.batch, case.torch_dtype.itemsize)
    if case.direction == "forward_backward":
        need *= 2
    free = available_memory(case.device)
    if need > params.memory_fraction * free:
        return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {case.device}"
    return None


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA or CPU out-of-memory error."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)
    )


def check_params(p: SpeedParams) -> None:
    """The provider names in params exist: `providers` and the PROVIDER of each max_n key."""
    unknown = [name for name in p.providers if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider {unknown[0]!r} (allowed: {', '.join(PROVIDERS)})")
    for key in p.max_n:
        name, _, dev = key.partition("@")
        if name not in PROVIDERS or (dev and dev not in DEVICES):
            raise ValueError(f"max_n key {key!r} must be PROVIDER or PROVIDER@cpu|cuda")


def items(grid: Grid) -> list[tuple[str, Case]]:
    """providers x cases: each provider with every case of a dtype and direction it declares.

    A provider that cannot run on this device still gets its cases (each becomes a recorded
    skip); those use its own dtypes, since the device's dtype list may not include them.
    """
    p, dev = grid.params, grid.device
    every_dtype = {d for ds in p.dtypes.values() for d in ds}
    out = []
    for name in p.providers:
        prov = PROVIDERS[name]
        allowed = set(p.dtypes.get(dev, [])) if dev in prov.devices else every_dtype
        dtypes = [d for d in prov.dtypes if d in allowed]
        directions = [d for d in p.directions if d in prov.directions]
        for batch in p.batches.get(dev, []):
            for dtype in dtypes:
                for direction in directions:
                    for n in p.sizes:
                        out.append((name, Case(dev, n, batch, dtype, direction)))
    return out
