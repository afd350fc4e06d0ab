"""Tests of the fused Triton butterfly (kernels.triton) against the oracle (kernels.reference).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1); with one, the same cases run on CUDA tensors and TestGPU adds
GPU-only checks. Fresh random inputs every run: each test's generator seed is printed
(pytest shows it with a failure) so that a failing case can be replayed.

Tolerances: fp64 results match the fp64 reference to 1e-10 (relative Frobenius); lower
precisions: error vs fp64 (same rounded inputs) <= 2x the reference's in that precision + ulps.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.triton as kt
from kernels.multiply import butterfly_multiply
from kernels.reference import butterfly_multiply_reference as reference
from kernels.triton.kernels import INTERPRET

CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_backend = pytest.mark.skipif(
    not INTERPRET and not CUDA, reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)
KINDS = ("real", "complex", "ctw", "cx")  # ctw: complex twiddle, real x; cx: the reverse
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _fixed_config_outside_gpu_class(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the correctness matrix runs with the fixed launch config (no autotuning: a
    benchmark per new shape would dominate); TestGPU exercises the autotuner."""
    if not INTERPRET and request.cls is not TestGPU:
        monkeypatch.setenv("BUTTERFLY_TRITON_AUTOTUNE", "0")


def make(
    n: int,
    nblocks: int,
    tied: bool,
    kind: str,
    batch: int,
    gen: torch.Generator,
    real: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (twiddle, x) on CPU; twiddles scaled 1/sqrt(2) so norms stay O(1) over levels."""
    m = n.bit_length() - 1
    shape = (nblocks, n - 1, 2, 2) if tied else (nblocks, m, n // 2, 2, 2)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    tw = torch.randn(shape, generator=gen, dtype=cplx if kind in ("complex", "ctw") else real)
    x = torch.randn(batch, n, generator=gen, dtype=cplx if kind in ("complex", "cx") else real)
    return tw / math.sqrt(2), x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b, in fp64 on CPU."""
    a, b = a.detach().cpu(), b.detach().cpu()
    a = a.to(torch.complex128 if a.is_complex() or b.is_complex() else torch.float64)
    return (torch.linalg.norm(a - b) / max(torch.linalg.norm(b).item(), 1e-30)).item()


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float64))  # complex64 -> complex128


def loss(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A real scalar sum(y * w) (its real part for complex y)."""
    return (y * w).real.sum() if y.is_complex() else (y * w).sum()


def run(fn, tw: torch.Tensor, x: torch.Tensor, w: torch.Tensor, increasing: bool, **kw):
    """Output and (grad twiddle, grad x) of loss(fn(tw, x), w)."""
    tw = tw.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = fn(tw, x, increasing, **kw)
    return (y, *torch.autograd.grad(loss(y, w.to(y.device, y.dtype)), (tw, x)))


def check_f64(
    n: int,
    nblocks: int,
    tied: bool,
    increasing: bool,
    kind: str,
    batch: int,
    gen: torch.Generator,
    **kw,
) -> None:
    """Forward, grad twiddle and grad x equal the reference's in fp64."""
    tw, x = make(n, nblocks, tied, kind, batch, gen)
    w = torch.randn(
        batch, n, generator=gen, dtype=torch.float64 if kind == "real" else torch.complex128
    )
    ref = run(reference, tw, x, w, increasing)
    got = run(kt.butterfly_multiply_triton, tw.to(DEVICE), x.to(DEVICE), w, increasing, **kw)
    for name, a, b in zip(("y", "dtwiddle", "dx"), got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < 1e-10, (name, rel(a, b))


def _cases() -> list[tuple]:
    """Every n from 2 to 256 with four rotating feature combinations (strides, tying,
    real / complex / mixed, 1-3 blocks, odd batches), plus the full cross product at n=8."""
    cases = []  # over the 32: every (tied, kind), (stride, kind) and (tied, stride) pair
    for i, n in enumerate(2**k for k in range(1, 9)):
        for j, batch in enumerate((1, 3, 17, 5)):
            cases.append(
                (
                    n,
                    1 + (i + j) % 3,
                    (i + j // 2) % 2 == 0,
                    (i // 2 + j) % 2 == 0,
                    KINDS[(i + j) % 4],
                    batch,
                )
            )
    for tied in (False, True):
        for increasing in (True, False):
            cases += [(8, 1, tied, increasing, kind, 3) for kind in KINDS]
    return cases


def _id(case: tuple) -> str:
    n, nb, tied, inc, kind, batch = case
    return f"n{n}-nb{nb}-{'tied' if tied else 'untied'}-{'inc' if inc else 'dec'}-{kind}-b{batch}"


@needs_backend
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_matches_reference_f64(case: tuple, gen: torch.Generator) -> None:
    check_f64(*case, gen)


@needs_backend
@pytest.mark.parametrize(
    "case",
    [
        (1024, 1, False, True, "real", 3),
        (2048, 1, True, False, "complex", 1),
        (4096, 1, False, False, "ctw", 1),
        (4096, 2, True, True, "real", 2),
    ],
    ids=_id,
)
def test_large_single_pass_f64(case: tuple, gen: torch.Generator) -> None:
    m = case[0].bit_length() - 1
    assert [(p.level0, p.c_log, p.lob) for p in kt.plan_passes(m)] == [(0, m, 1)]
    check_f64(*case, gen)


@needs_backend
@pytest.mark.parametrize(
    "case, max_tile_n",
    [
        ((64, 2, False, True, "real", 5), 16),
        ((64, 1, True, False, "complex", 3), 16),
        ((32, 2, False, False, "ctw", 2), 4),
        ((32, 1, True, True, "cx", 3), 4),
        ((128, 1, True, False, "real", 7), 32),
    ],
    ids=lambda v: _id(v) if isinstance(v, tuple) else f"tile{v}",
)
def test_multi_pass_f64(case: tuple, max_tile_n: int, gen: torch.Generator) -> None:
    """The multi-pass path (n > max tile), reached cheaply by lowering max_tile_n."""
    check_f64(*case, gen, max_tile_n=max_tile_n)
    m, cmax = case[0].bit_length() - 1, max_tile_n.bit_length() - 1
    assert kt.last_config("backward")["num_passes"] == math.ceil(m / cmax) > 1


def test_plan_passes() -> None:
    """Fewest passes, balanced sizes, coalescing groups bounded by the tile size."""
    assert [(p.level0, p.c_log, p.lob) for p in kt.plan_passes(12)] == [(0, 12, 1)]
    assert [(p.level0, p.c_log, p.lob) for p in kt.plan_passes(13)] == [(0, 7, 1), (7, 6, 32)]
    assert [p.c_log for p in kt.plan_passes(25)] == [9, 8, 8]
    assert [(p.c_log, p.lob) for p in kt.plan_passes(8, 8)] == [(3, 1), (3, 1), (2, 2)]


@needs_backend
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_non_contiguous_input(kind: str, gen: torch.Generator) -> None:
    """x a transposed view, twiddle a strided slice: same results as on contiguous copies."""
    n, batch = 32, 6
    tw, x = make(n, 2, False, kind, batch, gen)
    xt = x.t().contiguous().t()  # same values, column-major
    tw_big = torch.stack([tw, torch.zeros_like(tw)], dim=-1)[..., 0]  # strided view
    assert not xt.is_contiguous() and not tw_big.is_contiguous()
    w = torch.randn(batch, n, generator=gen, dtype=x.dtype)
    ref = run(reference, tw, x, w, True)
    got = run(kt.butterfly_multiply_triton, tw_big.to(DEVICE), xt.to(DEVICE), w, True)
    assert all(rel(a, b) < 1e-10 for a, b in zip(got, ref, strict=True))
    sliced = torch.randn(batch, 2 * n, generator=gen, dtype=x.dtype)[:, 1::2]
    assert (
        rel(kt.butterfly_multiply_triton(tw.to(DEVICE), sliced.to(DEVICE)), reference(tw, sliced))
        < 1e-10
    )


def _lowp_errors(got: tuple, low: tuple, truth: tuple) -> list[tuple[str, float, float]]:
    return [
        (name, rel(a, t), rel(b, t))
        for name, a, b, t in zip(("y", "dtwiddle", "dx"), got, low, truth, strict=True)
    ]


@needs_backend
@pytest.mark.parametrize(
    "n, tied, increasing, kind",
    [(16, False, True, "real"), (256, True, False, "complex"), (1024, False, False, "ctw")],
)
def test_fp32_flash_style(
    n: int, tied: bool, increasing: bool, kind: str, gen: torch.Generator
) -> None:
    """fp32 error vs fp64 truth <= 2x the fp32 reference's error + a few ulps."""
    tw, x = make(n, 2, tied, kind, 5, gen, real=torch.float32)
    w = torch.randn(5, n, generator=gen, dtype=torch.float64)
    truth = run(reference, _wide(tw), _wide(x), w, increasing)
    low = run(reference, tw, x, w, increasing)
    got = run(kt.butterfly_multiply_triton, tw.to(DEVICE), x.to(DEVICE), w, increasing)
    assert got[0].dtype == low[0].dtype
    for name, e_got, e_low in _lowp_errors(got, low, truth):
        assert e_got <= 2 * e_low + 8 * EPS[torch.float32], (name, e_got, e_low)


@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, tied, increasing", [(64, False, True), (256, True, False)])
def test_half_precision_flash_style(
    dtype: torch.dtype, n: int, tied: bool, increasing: bool, gen: torch.Generator
) -> None:
    """bf16 / fp16 x and output, fp32 twiddles and accumulation.

    Flash-attention style against the reference run entirely in that dtype (twiddles rounded
    too, every level rounded), for the output and both gradients. That bound is loose for
    gradients (the low-precision reference sums the twiddle gradient over the batch in the
    dtype, so its error is large), so each result also gets an absolute bound: y and grad x
    are fp32 results rounded once to the dtype (<= 1 ulp, relative), the fp32 twiddle
    gradient of the same rounded inputs is accurate to fp32 (<= 1e-5).
    """
    tw, x = make(n, 1, tied, "real", 17, gen, real=torch.float32)
    x = x.to(dtype)
    w = torch.randn(17, n, generator=gen, dtype=torch.float32).to(dtype)
    truth = run(reference, tw.double(), x.double(), w.double(), increasing)
    low = run(reference, tw.to(dtype), x, w, increasing)
    got = run(kt.butterfly_multiply_triton, tw.to(DEVICE), x.to(DEVICE), w, increasing)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, e_got, e_low in _lowp_errors(got, low, truth):
        assert e_got <= 2 * e_low + 2 * EPS[dtype], (name, e_got, e_low)
        assert e_got <= (1e-5 if name == "dtwiddle" else EPS[dtype]), (name, e_got)


@needs_backend
def test_backward_deterministic(gen: torch.Generator) -> None:
    """Twiddle grads are reduced through per-program partials, not atomics: bitwise stable.

    Under the (sequential) interpreter this cannot fail; it checks that the split path runs.
    TestGPU.test_backward_large_batch is the real check (concurrent programs, several row
    tiles each), test_triton_faults the accumulation's correctness under the interpreter."""
    tw, x = make(64, 1, True, "complex", 21, gen, real=torch.float32)
    w = torch.randn(21, 64, generator=gen, dtype=torch.complex64)
    a, b = (run(kt.butterfly_multiply_triton, tw.to(DEVICE), x.to(DEVICE), w, True) for _ in "ab")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert kt.last_config("backward")["launches"][0]["splits"] > 1  # several partials summed


@needs_backend
def test_last_config_records_launches(gen: torch.Generator) -> None:
    tw, x = make(16, 3, False, "real", 4, gen)
    kt.butterfly_multiply_triton(tw.to(DEVICE), x.to(DEVICE))
    cfg = kt.last_config()
    assert cfg["n"] == 16 and cfg["nblocks"] == 3 and cfg["num_passes"] == 1
    assert cfg["num_launches"] == 1 and cfg["launches"][0]["blocks"] == 3  # fused blocks
    assert cfg["BLOCK_B"] >= 1 and cfg["interpreter"] == INTERPRET


def test_autotune_configs_fit_registers() -> None:
    """The GPU config space (pure Python, checked here without a GPU): per-thread tile
    values within the budget, never empty, a single 16-warp config for the largest tile."""
    from kernels.triton import function as f

    def pruned(kind: str, c_log: int, lob: int, cplx: bool, rows: int) -> list[tuple[int, int]]:
        args = dict(C_LOG=c_log, LOB=lob, COMPLEX=cplx, batch=rows, rows_per_split=rows)
        return [(c.kwargs["BLOCK_B"], c.num_warps) for c in f._PRUNE[kind](f._CONFIGS, args)]

    # the complex 4096-point backward tile spills at every config: never launched (the
    # plan splits it, see test_triton_faults), and its spilling config is pruned
    assert (1, 16) not in pruned("bwd", 12, 1, True, 999)
    for kind, cap in (("fwd", f.FWD_PER_THREAD), ("bwd", f.BWD_PER_THREAD)):
        for c_log, lob, cplx, rows in (
            (12, 1, False, 999),
            (1, 1, True, 999),
            (6, 32, False, 3),
            (3, 1, False, 1),
        ):
            got = pruned(kind, c_log, lob, cplx, rows)
            width = (1 << c_log) * lob * (2 if cplx else 1)
            assert got and all(
                b * width <= cap * 32 * w and b <= max(rows, 1) * 2 for b, w in got
            ), (kind, c_log, got)


def test_bad_inputs() -> None:
    tw8 = torch.randn(1, 3, 4, 2, 2)
    with pytest.raises(ValueError, match="power of two, got 6"):
        kt.butterfly_multiply_triton(torch.randn(1, 5, 2, 2), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"twiddle shape \(1, 3, 4, 2, 2\) does not fit n=16"):
        kt.butterfly_multiply_triton(tw8, torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"twiddle shape \(1, 6, 2, 2\) does not fit n=8"):
        kt.butterfly_multiply_triton(torch.randn(1, 6, 2, 2), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"x must be \(batch, n\), got shape \(8,\)"):
        kt.butterfly_multiply_triton(tw8, torch.randn(8))
    with pytest.raises(ValueError, match="max_tile_n must be a power of two >= 2, got 12"):
        kt.butterfly_multiply_triton(tw8, torch.randn(2, 8), max_tile_n=12)
    with pytest.raises(ValueError, match="unsupported x dtype torch.int64"):
        kt.butterfly_multiply_triton(tw8, torch.ones(2, 8, dtype=torch.long))


@needs_backend
def test_trivial_shapes(gen: torch.Generator) -> None:
    """n = 1 (no levels) and an empty batch need no launch but keep dtypes and autograd."""
    tw = torch.randn(2, 0, 2, 2, generator=gen, dtype=torch.complex128, requires_grad=True)
    x = torch.randn(3, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    y = kt.butterfly_multiply_triton(tw, x)
    assert y.dtype == torch.complex128 and torch.equal(y.real, x)
    y.real.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    tw8, x8 = make(8, 1, False, "real", 0, gen)
    assert kt.butterfly_multiply_triton(tw8.to(DEVICE), x8.to(DEVICE)).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["f64", "c128"])
def test_multiply_on_cpu_is_reference(dtype: torch.dtype, gen: torch.Generator) -> None:
    """kernels.multiply keeps CPU tensors on the reference path (bitwise the same)."""
    tw = torch.randn(2, 4, 8, 2, 2, generator=gen, dtype=dtype)
    x = torch.randn(5, 16, generator=gen, dtype=dtype)
    for increasing in (True, False):
        assert torch.equal(butterfly_multiply(tw, x, increasing), reference(tw, x, increasing))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPU:
    """The compiled kernels on CUDA tensors (never the interpreter: conftest sets it only
    without a GPU), autotuned, against the reference on CPU."""

    @pytest.mark.parametrize("n", [2, 64, 1024, 4096, 16384])
    @pytest.mark.parametrize("kind", ["real", "complex"])
    def test_fp32_flash_style(self, n: int, kind: str, gen: torch.Generator) -> None:
        assert not INTERPRET
        tw, x = make(n, 2, n.bit_length() % 2 == 0, kind, 37, gen, real=torch.float32)
        w = torch.randn(37, n, generator=gen, dtype=x.dtype)
        truth = run(reference, _wide(tw), _wide(x), w, True)
        low = run(reference, tw, x, w, True)
        got = run(kt.butterfly_multiply_triton, tw.cuda(), x.cuda(), w, True)
        assert got[0].is_cuda
        for name, e_got, e_low in _lowp_errors(got, low, truth):
            assert e_got <= 2 * e_low + 8 * EPS[torch.float32], (name, e_got, e_low)
        assert kt.last_config()["num_warps"] in (4, 8, 16) and not kt.last_config()["interpreter"]

    @pytest.mark.parametrize("n", [8192, 65536])
    def test_natural_multi_pass_f64(self, n: int, gen: torch.Generator) -> None:
        """n > MAX_TILE_N: two passes with the default tile size (too slow to interpret)."""
        check_f64(n, 2, n > 10000, False, "complex", 3, gen)
        assert kt.last_config("backward")["num_passes"] == 2

    def test_fixed_config_without_autotuning(
        self, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("BUTTERFLY_TRITON_AUTOTUNE", "0")
        check_f64(4096, 1, False, True, "real", 5, gen)
        assert kt.last_config("backward")["num_warps"] in (4, 8, 16)

    def test_multiply_dispatches_to_triton(self, gen: torch.Generator) -> None:
        tw, x = make(256, 1, False, "real", 11, gen, real=torch.float32)
        y = butterfly_multiply(tw.cuda(), x.cuda(), False)
        assert y.is_cuda and kt.last_config()["n"] == 256 and kt.last_config()["batch"] == 11
        assert rel(y, reference(tw.double(), x.double(), False)) < 1e-5

    @pytest.mark.parametrize("kind", ["real", "complex"])
    def test_backward_large_batch(self, kind: str, gen: torch.Generator) -> None:
        """Batch 8192: programs run concurrently and each sums several row tiles; gradients
        match the reference and are bitwise the same on a second run."""
        tw, x = make(1024, 1, False, kind, 8192, gen, real=torch.float32)
        w = torch.randn(8192, 1024, generator=gen, dtype=x.dtype)
        a, b = (run(kt.butterfly_multiply_triton, tw.cuda(), x.cuda(), w, True) for _ in "ab")
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        launch = kt.last_config("backward")["launches"][0]
        assert launch["rows_per_split"] > launch["BLOCK_B"]
        truth = run(reference, _wide(tw), _wide(x), w, True)
        low = run(reference, tw, x, w, True)
        for name, e_got, e_low in _lowp_errors(a, low, truth):
            assert e_got <= 2 * e_low + 8 * EPS[torch.float32], (name, e_got, e_low)

    def test_autotune_separates_batch_buckets(self, gen: torch.Generator) -> None:
        """Batch 1 and 16384 at one n are tuned separately (two autotuner cache entries)."""
        from kernels.triton import function as f

        before = len(f._tuned("fwd").cache)
        for batch in (1, 16384):
            tw, x = make(1024, 1, False, "real", batch, gen, real=torch.float32)
            kt.butterfly_multiply_triton(tw.cuda(), x.cuda())
        assert len(f._tuned("fwd").cache) >= before + 2

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision(self, dtype: torch.dtype, gen: torch.Generator) -> None:
        tw, x = make(2048, 1, True, "real", 64, gen, real=torch.float32)
        x = x.to(dtype)
        y = kt.butterfly_multiply_triton(tw.cuda(), x.cuda())
        e_low = rel(reference(tw.to(dtype), x), reference(tw.double(), x.double()))
        assert y.dtype == dtype
        assert rel(y, reference(tw.double(), x.double())) <= 2 * e_low + 4 * EPS[dtype]
