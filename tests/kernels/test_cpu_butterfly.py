"""The fast CPU butterfly (kernels.cpu) against the oracle, for both of its backends.

Fresh random inputs every run: each test's generator is seeded from os.urandom and the seed is
printed (pytest shows it with a failure). The "c" backend is skipped with a reason where no
compiler is available; the torch fallback always runs.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import scipy.linalg
import torch

import kernels.cpu as kc
from kernels.cpu import compiled
from kernels.cpu.hadamard import fwht_torch
from kernels.reference import butterfly_multiply_reference, log2_exact

SIZES = [1 << k for k in range(1, 14)]  # 2 .. 8192
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(params=["c", "torch"])
def impl(request: pytest.FixtureRequest) -> str:
    """Each backend by name; "c" is skipped (with the reason) where it cannot be built."""
    if request.param == "c" and not kc.compiled_available():
        pytest.skip(f"compiled kernels unavailable: {kc.backend()}")
    return request.param


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty cache directory and a forgotten library; the normal one is reloaded after."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path))
    compiled.reset()
    yield tmp_path
    compiled.reset()


def twiddle(nblocks: int, n: int, tied: bool, gen: torch.Generator) -> torch.Tensor:
    """Random float64 twiddle; entries of variance 1/2 keep the norm of x on average."""
    shape = (nblocks, n - 1, 2, 2) if tied else (nblocks, log2_exact(n), n // 2, 2, 2)
    return torch.randn(*shape, dtype=torch.float64, generator=gen) * 0.5**0.5


def rows(batch: int, n: int, gen: torch.Generator, layout: int) -> torch.Tensor:
    """float64 x (batch, n): contiguous (0), transposed (1) or every other column (2)."""
    if layout == 1:
        return torch.randn(n, batch, dtype=torch.float64, generator=gen).t()
    if layout == 2:
        return torch.randn(batch, 2 * n, dtype=torch.float64, generator=gen)[:, ::2]
    return torch.randn(batch, n, dtype=torch.float64, generator=gen)


def rel_err(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """Largest error relative to the componentwise bound |B| |x| (robust to cancellation)."""
    return ((y.double() - exact).abs() / bound).max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n: int, dtype: torch.dtype, impl: str, gen: torch.Generator) -> None:
    """Every batch / tying / stride order / nblocks / layout against the float64 oracle.

    float64: within 1e-12 of the oracle. float32: at most twice the error of the oracle run in
    float32 (both against the float64 oracle on the same float32 inputs), plus 4 eps.
    """
    case = 0
    for batch in (1, 3, 16):
        for tied in (False, True):
            for inc in (True, False):
                for nblocks in (1, 2):
                    case += 1
                    tw = twiddle(nblocks, n, tied, gen).to(dtype)
                    x = rows(batch, n, gen, case % 3).to(dtype)
                    y = kc.butterfly_multiply_cpu(tw, x, inc, impl=impl)
                    assert y.dtype == dtype and y.shape == (batch, n) and y.is_contiguous()
                    exact = butterfly_multiply_reference(tw.double(), x.double(), inc)
                    bound = butterfly_multiply_reference(tw.double().abs(), x.double().abs(), inc)
                    err = rel_err(y, exact, bound)
                    what = f"batch={batch} tied={tied} inc={inc} nblocks={nblocks}"
                    if dtype == torch.float64:
                        assert err <= 1e-12, f"{what}: {err:.3g}"
                    else:
                        ref_err = rel_err(butterfly_multiply_reference(tw, x, inc), exact, bound)
                        assert err <= 2 * ref_err + 4 * EPS32, f"{what}: {err:.3g} vs {ref_err:.3g}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bp_gathers_then_multiplies(tied: bool, impl: str, gen: torch.Generator) -> None:
    """bp_multiply_cpu(tw, perm, x) = B x[:, perm], with the plan, out= and in float32."""
    for n in (2, 16, 512, 4096):
        perm = torch.randperm(n, generator=gen)
        tw = twiddle(2, n, tied, gen)
        x = rows(3, n, gen, n % 3)
        expected = butterfly_multiply_reference(tw, x[:, perm])
        y = kc.bp_multiply_cpu(tw, perm, x, impl=impl)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        plan = kc.CPUButterfly(tw, perm=perm, impl=impl)
        out = torch.empty(3, n, dtype=torch.float64)
        assert plan(x, out) is out
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        y32 = kc.bp_multiply_cpu(tw.float(), perm.int(), x.float(), impl=impl)
        torch.testing.assert_close(y32, expected.float(), rtol=1e-4, atol=1e-4)


def test_plan_out_in_place_and_overlap(impl: str, gen: torch.Generator) -> None:
    """The plan writes into out; out is x works in place; other overlaps are refused."""
    n = 64
    tw = twiddle(1, n, False, gen)
    plan = kc.CPUButterfly(tw, increasing_stride=False, impl=impl)
    assert plan.backend == ("c" if impl == "c" else "torch-vectorised")
    x = rows(4, n, gen, 0)
    expected = butterfly_multiply_reference(tw, x, increasing_stride=False)
    y = x.clone()
    assert plan(y, out=y) is y
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    buf = torch.zeros(5, n, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlaps"):
        plan(buf[:4], out=buf[1:])
    with pytest.raises(ValueError, match="overlaps"):
        kc.CPUButterfly(tw, perm=torch.arange(n), impl=impl)(buf[:4], out=buf[:4])
    with pytest.raises(ValueError, match="out must be"):
        plan(x, out=torch.empty(4, n, dtype=torch.float32))
    assert plan(x[:0]).shape == (0, n)


def test_needs_gradient_or_complex_goes_to_the_reference(gen: torch.Generator) -> None:
    """requires_grad (x or twiddle) and complex inputs take the reference path: same values,
    and gradients flow; the plan itself refuses a gradient instead of dropping it."""
    n = 32
    tw = twiddle(2, n, False, gen).requires_grad_()
    x = rows(3, n, gen, 1).requires_grad_()
    y = kc.butterfly_multiply_cpu(tw, x)
    assert y.requires_grad
    (gx, gt) = torch.autograd.grad(y.sum(), (x, tw))
    y_ref = butterfly_multiply_reference(tw, x)
    (gx_ref, gt_ref) = torch.autograd.grad(y_ref.sum(), (x, tw))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gt, gt_ref)
    perm = torch.randperm(n, generator=gen)
    yb = kc.bp_multiply_cpu(tw, perm, x)
    assert yb.requires_grad
    torch.testing.assert_close(yb, butterfly_multiply_reference(tw, x[:, perm]))
    with torch.no_grad():  # no gradient needed: the fast path
        torch.testing.assert_close(kc.butterfly_multiply_cpu(tw, x), y_ref.detach())
    with pytest.raises(RuntimeError, match="forward only"):
        kc.CPUButterfly(tw)(x)
    twc = torch.randn(1, n - 1, 2, 2, dtype=torch.complex128, generator=gen)
    xc = torch.randn(2, n, dtype=torch.complex128, generator=gen)
    torch.testing.assert_close(
        kc.butterfly_multiply_cpu(twc, xc), butterfly_multiply_reference(twc, xc)
    )


def test_bad_input_is_a_one_line_value_error(gen: torch.Generator) -> None:
    """Sizes that are not powers of two, mismatched x, bad permutations: one-line errors."""
    tw4, x4 = torch.randn(1, 3, 2, 2), torch.randn(1, 4)
    cases = [
        lambda: kc.butterfly_multiply_cpu(torch.randn(1, 3, 3, 2, 2), torch.randn(1, 6)),
        lambda: kc.butterfly_multiply_cpu(torch.randn(1, 5, 2, 2), torch.randn(1, 6)),
        lambda: kc.butterfly_multiply_cpu(tw4, torch.randn(1, 8)),
        lambda: kc.butterfly_multiply_cpu(tw4, torch.randn(4)),
        lambda: kc.butterfly_multiply_cpu(torch.randn(3, 2, 2), x4),
        lambda: kc.bp_multiply_cpu(tw4, torch.tensor([0, 1, 2, 4]), x4),
        lambda: kc.bp_multiply_cpu(tw4, torch.arange(3), x4),
        lambda: kc.fwht(torch.randn(2, 6)),
        lambda: kc.CPUButterfly(tw4, impl="fast"),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError) as info:
            case()
        assert "\n" not in str(info.value), f"case {i}: {info.value}"
    with pytest.raises(ValueError, match="power of two, got 6"):
        cases[0]()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fwht_is_the_sylvester_hadamard(
    dtype: torch.dtype, impl: str, gen: torch.Generator
) -> None:
    """fwht = H_n x along the last dim (any leading dims, any strides); H_n H_n = n I."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for n in (1, 2, 4, 8, 64, 512, 4096):
        h = torch.from_numpy(scipy.linalg.hadamard(n)).double()
        x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen)
        y = kc.fwht(x.to(dtype).transpose(0, 1), impl=impl)  # non-contiguous input
        assert y.shape == (3, 2, n) and y.dtype == dtype
        torch.testing.assert_close(
            y.double(), (x @ h.T).transpose(0, 1), rtol=tol, atol=tol * n**0.5
        )
        ints = torch.randint(-8, 9, (3, n), generator=gen).double()
        assert torch.equal(kc.fwht(kc.fwht(ints, impl=impl), impl=impl), n * ints)


def test_fwht_fallback_keeps_autograd(gen: torch.Generator) -> None:
    """With a gradient needed, fwht runs the torch passes and autograd sees H^T = H."""
    x = torch.randn(2, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    (g,) = torch.autograd.grad((kc.fwht(x) * r).sum(), x)
    torch.testing.assert_close(g, fwht_torch(r))


def test_broken_compiler_falls_back_with_one_warning(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """CC=/bin/false: one RuntimeWarning, then the torch path, results still right."""
    monkeypatch.setenv("CC", "/bin/false")
    tw = twiddle(2, 64, True, gen)
    x = rows(3, 64, gen, 2)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        y = kc.butterfly_multiply_cpu(tw, x)
    torch.testing.assert_close(y, butterfly_multiply_reference(tw, x), rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not kc.compiled_available()
        assert kc.backend().startswith("torch-vectorised: /bin/false exited with")
        assert torch.equal(kc.fwht(torch.ones(1, 4)), torch.tensor([[4.0, 0, 0, 0]]))
    with pytest.raises(RuntimeError, match="unavailable"):
        kc.CPUButterfly(tw, impl="c")
    assert not list(fresh_build.iterdir())  # no half-written files left behind


def test_missing_compiler_and_forced_fallback(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compiler on PATH: a warning naming CC; BUTTERFLY_CPU_BACKEND=torch is reported."""
    monkeypatch.setenv("CC", "no-such-cc-for-butterfly")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not kc.compiled_available()
    compiled.reset()
    monkeypatch.setenv(compiled.BACKEND_ENV, "torch")
    assert kc.backend() == f"torch-vectorised: forced by {compiled.BACKEND_ENV}=torch"
    assert kc.CPUButterfly(torch.randn(1, 3, 2, 2)).backend == "torch-vectorised"


def test_concurrent_builds_leave_one_whole_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two builds racing into one cache both end with the same loadable library, no temp files."""
    if not kc.compiled_available():
        pytest.skip(f"compiled kernels unavailable: {kc.backend()}")
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path))
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(compiled.build())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]
    try:
        compiled.reset()
        assert kc.backend() == f"c: {compiled.compiler()} {' '.join(compiled.FLAGS)} -> {paths[0]}"
        assert compiled.build() == paths[0]  # cached: no rebuild
    finally:
        monkeypatch.undo()
        compiled.reset()


def test_native_flags_refused_retries_portable(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """A compiler that rejects -march=native still gives compiled kernels (portable flags)."""
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler on PATH")
    fake = fresh_build / "fake-cc"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) exit 1;; esac\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert kc.compiled_available()
    assert kc.backend().startswith(f"c: {fake} {' '.join(compiled.PORTABLE_FLAGS)} -> ")
    tw, x = twiddle(1, 128, False, gen), rows(2, 128, gen, 1)
    torch.testing.assert_close(
        kc.butterfly_multiply_cpu(tw, x), butterfly_multiply_reference(tw, x)
    )
