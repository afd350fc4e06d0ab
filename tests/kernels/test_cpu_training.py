"""Compiled CPU forward and backward (kernels.cpu.tiled) and the dispatch of kernels.multiply.

Every check is against the float64 / complex128 oracle (kernels.reference under torch
autograd) on fresh random inputs (the `gen` fixture prints its seed). Batches cover the tile
of the kernels: 1, a tile minus one, a tile, a tile plus one and several tiles plus a rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels.cpu.tiled as tiled
from kernels import Butterfly
from kernels.cpu import CPUButterfly, compiled
from kernels.cpu.complex_rows import ComplexRowPlan
from kernels.multiply import butterfly_multiply, route
from kernels.reference import butterfly_multiply_reference, log2_exact

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
WIDE = {
    torch.float32: torch.float64,
    torch.float64: torch.float64,
    torch.complex64: torch.complex128,
    torch.complex128: torch.complex128,
}


@pytest.fixture(autouse=True)
def _compiled() -> None:
    if not compiled.compiled_available():
        pytest.skip(f"compiled kernels unavailable: {compiled.backend()}")


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty cache directory and a forgotten library; the normal one is reloaded after."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path))
    compiled.reset()
    yield tmp_path
    compiled.reset()


def rows_per_tile(dtype: torch.dtype) -> int:
    lib = compiled.library()
    assert lib is not None
    return lib.tl_rows[tiled._REAL.get(dtype, dtype)]


def random_twiddle(
    nblocks: int, n: int, tied: bool, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Entries of variance 1/2 (real) keep |x| on average; complex parts of variance 1/4."""
    shape = (nblocks, n - 1, 2, 2) if tied else (nblocks, log2_exact(n), n // 2, 2, 2)
    wide = WIDE[dtype]
    return (torch.randn(*shape, dtype=wide, generator=gen) * 0.5**0.5).to(dtype)


def random_x(batch: int, n: int, dtype: torch.dtype, gen: torch.Generator, layout: int):
    """x (batch, n): contiguous (0), transposed (1) or every other column (2)."""
    wide = WIDE[dtype]
    if layout == 1:
        return torch.randn(n, batch, dtype=wide, generator=gen).to(dtype).t()
    if layout == 2:
        return torch.randn(batch, 2 * n, dtype=wide, generator=gen).to(dtype)[:, ::2]
    return torch.randn(batch, n, dtype=wide, generator=gen).to(dtype)


def grads(fn, tw: torch.Tensor, x: torch.Tensor, gy: torch.Tensor, inc: bool):
    """(y, grad twiddle, grad x) of <fn(tw, x), gy> (real part), each detached."""
    tw = tw.detach().requires_grad_()
    x = x.detach().requires_grad_()
    y = fn(tw, x, inc)
    loss = (y * gy.conj()).real.sum() if y.is_complex() else (y * gy).sum()
    gtw, gx = torch.autograd.grad(loss, (tw, x))
    return y.detach(), gtw, gx


def uses_tiled(y: torch.Tensor) -> bool:
    """Whether y's autograd graph runs through the compiled Function."""
    todo, seen = [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "TiledButterflyBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Normwise relative error max|got - exact| / max|exact|."""
    diff = (got.to(exact.dtype) - exact).abs().max()
    return (diff / exact.abs().max().clamp_min(1e-300)).item()


def check_case(
    n: int, batch: int, tied: bool, inc: bool, nblocks: int, dtype: torch.dtype,
    real_x: bool, layout: int, gen: torch.Generator,
) -> None:  # fmt: skip
    """Forward and both gradients of the compiled path against the wide oracle.

    Tolerance: float64 1e-12; float32 four times the error of the oracle itself run in the
    narrow dtype on the same inputs, plus 1e-6 (the compiled sums are grouped differently).
    """
    tw = random_twiddle(nblocks, n, tied, dtype, gen)
    xdtype = tiled._REAL.get(dtype, dtype) if real_x else dtype
    x = random_x(batch, n, xdtype, gen, layout)
    gy = torch.randn(batch, n, dtype=WIDE[dtype], generator=gen).to(dtype)
    fast = grads(butterfly_multiply, tw, x, gy, inc)
    wide = WIDE[dtype]
    xw = x.to(WIDE[xdtype])
    exact = grads(butterfly_multiply_reference, tw.to(wide), xw, gy.to(wide), inc)
    narrow = grads(butterfly_multiply_reference, tw, x, gy, inc)
    what = f"n={n} batch={batch} tied={tied} inc={inc} nblocks={nblocks} {dtype} real_x={real_x}"
    names = ("y", "grad twiddle", "grad x")
    for name, got, ex, nar in zip(names, fast, exact, narrow, strict=True):
        assert got.dtype == nar.dtype and got.shape == nar.shape, f"{what}: {name}"
        err = rel(got, ex)
        if wide == dtype:
            assert err <= 1e-12, f"{what}: {name} {err:.3g}"
        else:
            ref_err = rel(nar, ex)
            assert err <= 4 * ref_err + 1e-6, f"{what}: {name} {err:.3g} vs {ref_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "c64", "c128"])
@pytest.mark.parametrize("n", [2, 4, 32, 256])
def test_forward_and_gradients_match_the_oracle(
    n: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Every tying / stride order / nblocks / input layout, batches around the tile size."""
    tile = rows_per_tile(dtype)
    case = 0
    for batch in (1, tile - 1, tile, tile + 1, 3 * tile + 5):
        for tied in (False, True):
            for inc in (True, False):
                for nblocks in (1, 2):
                    case += 1
                    real_x = dtype.is_complex and case % 4 == 0
                    check_case(n, batch, tied, inc, nblocks, dtype, real_x, case % 3, gen)


def test_large_sizes_and_the_recovery_case(gen: torch.Generator) -> None:
    """n = 1024 untied real; complex64 tied with batch = n (transform recovery's call)."""
    check_case(1024, 37, False, True, 2, torch.float32, False, 0, gen)
    check_case(512, 512, True, True, 1, torch.complex64, True, 0, gen)
    check_case(512, 512, True, False, 1, torch.complex64, False, 1, gen)


def test_gradcheck_complex_and_real(gen: torch.Generator) -> None:
    """torch.autograd.gradcheck (finite differences) on small float64 / complex128 cases."""
    for dtype in (torch.float64, torch.complex128):
        for tied in (False, True):
            tw = random_twiddle(2, 8, tied, dtype, gen).requires_grad_()
            x = random_x(3, 8, dtype, gen, 1).requires_grad_()
            fn = tiled.butterfly_multiply_tiled
            assert torch.autograd.gradcheck(lambda t, v, fn=fn: fn(t, v), (tw, x))


def test_only_the_needed_gradient_and_stride_zero_grad(gen: torch.Generator) -> None:
    """A twiddle-only or x-only backward, and the expanded (stride 0) gradient of sum()."""
    tw = random_twiddle(1, 64, False, torch.float64, gen).requires_grad_()
    x = random_x(20, 64, torch.float64, gen, 0)
    (gt,) = torch.autograd.grad(butterfly_multiply(tw, x).sum(), (tw,))
    (gt_ref,) = torch.autograd.grad(butterfly_multiply_reference(tw, x).sum(), (tw,))
    torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(butterfly_multiply(tw.detach(), xg).sum(), (xg,))
    (gx_ref,) = torch.autograd.grad(butterfly_multiply_reference(tw.detach(), xg).sum(), (xg,))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_butterfly_layer_trains_through_the_compiled_path(gen: torch.Generator) -> None:
    """A complex Butterfly (real parameters viewed as complex) gives the oracle's gradients."""
    for complex_, tied, nblocks in ((True, True, 2), (True, False, 1), (False, False, 2)):
        layer = Butterfly(48, 40, complex=complex_, tied=tied, nblocks=nblocks, generator=gen)
        x = torch.randn(19, 48, generator=gen)
        y = layer(x)
        assert uses_tiled(y)
        target = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        loss = (y - target).abs().pow(2).sum()
        loss.backward()
        # the oracle in float64 on a copy of the parameters
        tw = layer.twiddle.detach().double().requires_grad_()
        bias = layer.bias.detach().double().requires_grad_()
        twc = torch.view_as_complex(tw) if complex_ else tw
        xp = torch.nn.functional.pad(x.double(), (0, 64 - 48))
        yr = butterfly_multiply_reference(twc, xp)[:, :40]
        yr = yr + (torch.view_as_complex(bias) if complex_ else bias)
        (yr - target.to(yr.dtype)).abs().pow(2).sum().backward()
        assert tw.grad is not None and bias.grad is not None
        for got, exact in ((layer.twiddle.grad, tw.grad), (layer.bias.grad, bias.grad)):
            assert rel(got, exact) <= 1e-5, f"complex={complex_} tied={tied}: {rel(got, exact)}"


def test_route_names_each_path(gen: torch.Generator) -> None:
    """The dispatch: rows without a gradient (complex: small batches only), tiled with one,
    the reference for what the C kernels do not cover."""
    tw = random_twiddle(1, 16, True, torch.float32, gen)
    x = random_x(4, 16, torch.float32, gen, 0)
    assert route(tw, x) == "cpu-rows"
    assert route(tw, random_x(300, 16, torch.float32, gen, 0)) == "cpu-rows"  # any batch
    assert route(tw.requires_grad_(), x) == "cpu-tiled"
    with torch.no_grad():
        assert route(tw, x) == "cpu-rows"
    assert route(tw.detach().to(torch.complex64), x) == "cpu-rows"  # complex, small batch
    assert route(tw.detach().to(torch.complex64), random_x(9, 16, torch.float32, gen, 0)) == (
        "cpu-tiled"
    )
    assert route(tw.detach().half(), x.half()) == "reference"
    assert route(tw.detach().double(), x) == "reference"  # mixed widths: the oracle's rules


def test_without_a_compiler_training_uses_the_reference(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """CC=/bin/false: gradients come from the reference, inference from the torch fallback."""
    monkeypatch.setenv("CC", "/bin/false")
    tw = random_twiddle(2, 32, False, torch.float64, gen).requires_grad_()
    x = random_x(5, 32, torch.float64, gen, 2)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert route(tw, x) == "reference"
    y = butterfly_multiply(tw, x)
    torch.testing.assert_close(y, butterfly_multiply_reference(tw, x))
    assert y.requires_grad and not uses_tiled(y)
    with torch.no_grad():
        assert route(tw, random_x(500, 32, torch.float64, gen, 0)) == "cpu-rows"
        assert route(tw.to(torch.complex128), x) == "reference"


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
def test_complex_row_loop_matches_the_oracle(dtype: torch.dtype, gen: torch.Generator) -> None:
    """The complex row loop (inference at small batch): every tying, stride order, nblocks,
    real or complex strided input, against the wide oracle; one plan called again with another
    batch and a conjugated view (its argument array is reused)."""
    real = tiled._REAL[dtype]
    for n in (2, 4, 8, 16, 32, 512):
        for tied in (False, True):
            for inc in (True, False):
                for nblocks in (1, 2):
                    tw = random_twiddle(nblocks, n, tied, dtype, gen)
                    for xdtype in (dtype, real):
                        x = random_x(3, n, xdtype, gen, 2)
                        y = ComplexRowPlan(tw, inc)(x)
                        exact = butterfly_multiply_reference(
                            tw.to(torch.complex128), x.to(WIDE[xdtype]), inc
                        )
                        narrow = butterfly_multiply_reference(tw, x, inc)
                        err, ref_err = rel(y, exact), rel(narrow, exact)
                        what = f"n={n} tied={tied} inc={inc} nblocks={nblocks} x {xdtype}"
                        assert y.dtype == dtype, what
                        assert err <= 4 * ref_err + (1e-6 if dtype == torch.complex64 else 1e-13), (
                            f"{what}: {err:.3g} vs {ref_err:.3g}"
                        )
                    plan, xc = ComplexRowPlan(tw, inc), random_x(2, n, dtype, gen, 1)
                    plan(x)
                    again = plan(xc.conj()[:1])
                    want = butterfly_multiply_reference(tw, xc.conj().resolve_conj()[:1], inc)
                    assert again.shape == (1, n) and rel(again, want) <= 1e-5, n


@pytest.mark.parametrize("impl", ["c", "torch"])
def test_fused_bias_in_the_row_loop(impl: str, gen: torch.Generator) -> None:
    """CPUButterfly(bias=...) adds the bias to the first k outputs in its own call; an eval
    Butterfly with in, out < n gives what training mode gives, in float64."""
    tw = random_twiddle(2, 32, True, torch.float64, gen)
    bias = torch.randn(20, dtype=torch.float64, generator=gen)
    x = random_x(3, 32, torch.float64, gen, 1)
    y = CPUButterfly(tw, bias=bias, impl=impl)(x)
    expected = butterfly_multiply_reference(tw, x)
    expected[:, :20] += bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    layer = Butterfly(27, 21, tied=False, nblocks=2, generator=gen).double()
    x = torch.randn(4, 27, dtype=torch.float64, generator=gen)
    want = layer(x).detach()
    with torch.inference_mode():
        got = layer.eval()(x)
        assert layer._cpu_plan()._plan is not None  # the row loop ran, bias fused
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.bias.add_(1.0)  # a new version: the plan (and its bias snapshot) is rebuilt
        torch.testing.assert_close(layer(x), want + 1.0, rtol=1e-12, atol=1e-12)


def test_bench_tables_cover_only_the_sections_run() -> None:
    """`kernels.cpu.bench --sections nets` writes the network table alone, with the speed-up
    of the factored path over the materialised one and the ratio to the dense network."""
    from kernels.cpu.bench import markdown

    row = dict(section="nets", n=1024, batch=256, dtype="float32", nblocks=0, tied=True)
    rows = [
        {**row, "case": "dense", "impl": "as trained", "ms": 20.0},
        {**row, "case": "bp_real", "impl": "as trained", "ms": 2.0},
        {**row, "case": "bp_real", "impl": "materialised B P + GEMM", "ms": 40.0},
    ]
    md = markdown(rows, {"cpu": "test"})
    assert "## Training step" not in md and "## Inference" not in md
    assert "| bp_real | 2.00 | 40.00 | 20.0x | 0.10 |" in md
