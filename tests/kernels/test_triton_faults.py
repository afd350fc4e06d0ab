"""Issue 14's suspected faults of the fused Triton butterfly, each pinned by a test.

Runs under the Triton interpreter without a GPU (tests/conftest.py); gradients and outputs are
checked against kernels.reference on fresh random inputs (seed printed by the `gen` fixture).
"""

from __future__ import annotations

import pytest
import torch

import kernels.triton as kt
from kernels.reference import butterfly_multiply_reference as reference
from kernels.triton import function as f
from kernels.triton import kernels as tk
from tests.kernels.test_triton_butterfly import (
    DEVICE,
    EPS,
    check_f64,
    make,
    needs_backend,
    rel,
    run,
)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Every kernel launch of a call: (kind, named arguments incl. constexprs)."""
    seen: list[tuple[str, dict]] = []
    real = f._launch

    def spy(kind: str, grid, args: tuple, consts: dict, width: int) -> dict:
        seen.append((kind, {**dict(zip(f._KERNELS[kind].arg_names, args, strict=False)), **consts}))
        return real(kind, grid, args, consts, width)

    monkeypatch.setattr(f, "_launch", spy)
    return seen


# ---- row tiles: the backward's accumulation of twiddle-grad partials ----------------------


@needs_backend
@pytest.mark.parametrize(
    "case, max_tile_n",
    [
        ((16, 1, False, True, "real", 21), 4096),
        ((32, 2, True, False, "complex", 19), 4096),
        ((16, 1, True, True, "ctw", 23), 4096),
        ((16, 1, False, False, "cx", 17), 4096),
        ((64, 1, False, True, "complex", 13), 8),  # multi-pass, strided tiles
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else f"tile{v}",
)
def test_backward_many_row_tiles_per_program(
    case: tuple, max_tile_n: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BLOCK_B = 2 with 2 programs per column: every program sums its twiddle grads over
    >= 3 row tiles (the last one partly masked), the path a GPU takes at large batch."""
    monkeypatch.setattr(f, "INTERPRET_BLOCK_B", 2)
    monkeypatch.setattr(f, "INTERPRET_PROGRAMS", 2)
    check_f64(*case, gen, max_tile_n=max_tile_n)
    for launch in kt.last_config("backward")["launches"]:
        assert launch["splits"] == 2 and launch["rows_per_split"] >= 3 * launch["BLOCK_B"] - 1


@needs_backend
def test_backward_one_program_per_row_tile(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other extreme: as many programs as rows (each partial from one row tile)."""
    monkeypatch.setattr(f, "INTERPRET_BLOCK_B", 1)
    monkeypatch.setattr(f, "INTERPRET_PROGRAMS", 64)
    check_f64(8, 1, False, True, "complex", 5, gen)
    assert kt.last_config("backward")["launches"][0]["splits"] == 5


# ---- autotune key -------------------------------------------------------------------------


def _tune_key(kind: str, named: dict) -> tuple:
    keys = [*f._KEY, "nblk"] if kind == "fwd" else f._KEY
    return tuple(named[k] for k in keys)


@needs_backend
def test_autotune_key_separates_batches(gen: torch.Generator, launches: list) -> None:
    """Batch 1 and 256 at the same n must not share a tuned BLOCK_B: the key the autotuner
    computes from the real launch arguments differs (forward and backward)."""
    for batch in (1, 256):
        tw, x = make(16, 1, False, "real", batch, gen, real=torch.float32)
        y = kt.butterfly_multiply_triton(tw.to(DEVICE).requires_grad_(), x.to(DEVICE))
        y.sum().backward()
    fwd = [_tune_key(k, a) for k, a in launches if k == "fwd" and a["batch"] in (1, 256)]
    bwd = [_tune_key(k, a) for k, a in launches if k == "bwd"]
    assert len(set(fwd)) == 2 and len(set(bwd)) == 2
    assert f.rows_log2(1) < f.rows_log2(256) < f.rows_log2(16384)
    for kernel in (tk.butterfly_fwd_kernel, tk.butterfly_bwd_kernel):
        assert set(f._KEY) <= set(kernel.arg_names)


# ---- memory passes ------------------------------------------------------------------------


@needs_backend
@pytest.mark.parametrize("kind", ["complex", "cx", "ctw"])
def test_complex_io_is_interleaved_in_kernel(kind: str, gen: torch.Generator,
                                             launches: list) -> None:
    """Complex x / y / grads reach the kernels as the caller's interleaved storage: the
    kernel reads x's own memory, writes the returned y and grad x (no split or re-join)."""
    tw, x = make(32, 1, False, kind, 6, gen, real=torch.float32)
    tw, x = tw.to(DEVICE).requires_grad_(), x.to(DEVICE).requires_grad_()
    y = kt.butterfly_multiply_triton(tw, x)
    (gx,) = torch.autograd.grad((y * y.conj()).real.sum(), (x,))
    (kf, fwd), (kb, bwd) = launches
    assert kf == "fwd" and kb == "bwd"
    assert fwd["x"].data_ptr() == x.data_ptr() and fwd["y"].data_ptr() == y.data_ptr()
    assert bwd["a"].data_ptr() == x.data_ptr() and bwd["gx"].data_ptr() == gx.data_ptr()
    assert fwd["COMPLEX"] and fwd["X_CPLX"] == x.is_complex()
    assert fwd["TW_CPLX"] == tw.is_complex()
    ref = reference(tw.detach().double() if not tw.is_complex() else tw.detach().cdouble(),
                    x.detach().double() if not x.is_complex() else x.detach().cdouble())
    assert rel(y, ref) < 1e-5


@needs_backend
@pytest.mark.parametrize("max_tile_n", [4096, 8])
def test_bf16_buffers_stay_bf16(max_tile_n: int, gen: torch.Generator, launches: list) -> None:
    """bf16 x: output, multi-pass intermediates, grad of every segment and the returned grad x
    are bf16 buffers written by the kernels (only twiddles and partials are fp32). Bounds:
    y and grad x within 2 bf16 ulps (one rounding per pass); the twiddle grad fp32-accurate
    in one pass, bf16-accurate with several (it is computed from bf16 intermediate grads)."""
    n, batch = 64, 9
    tw, x = make(n, 1, False, "real", batch, gen, real=torch.float32)
    x = x.to(torch.bfloat16)
    w = torch.randn(batch, n, generator=gen).to(torch.bfloat16)
    got = run(kt.butterfly_multiply_triton, tw.to(DEVICE), x.to(DEVICE), w, True,
              max_tile_n=max_tile_n)
    for kind, a in launches:
        for name in ("x", "y") if kind == "fwd" else ("a", "g", "gx"):
            assert a[name].dtype == torch.bfloat16, (kind, name)
        assert a["tw_re"].dtype == torch.float32
    assert len(launches) == (2 if max_tile_n == 4096 else 2 + 1 + 2)  # fwd, recompute, bwd
    truth = run(reference, tw.double(), x.double(), w.double(), True)
    assert got[0].dtype == got[2].dtype == torch.bfloat16
    for name, a, b in zip(("y", "dtwiddle", "dx"), got, truth, strict=True):
        bound = 1e-5 if name == "dtwiddle" and max_tile_n >= n else 2 * EPS[torch.bfloat16]
        assert rel(a, b) <= bound, (name, rel(a, b))


@needs_backend
def test_twiddle_layout_cached_per_version(gen: torch.Generator,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One re-layout per twiddle version: forward + backward share it, a second call reuses
    it, an in-place update (an optimiser step) lays it out again and results follow it."""
    calls = []
    real = f._layout
    monkeypatch.setattr(f, "_layout", lambda tw, g: calls.append(1) or real(tw, g))
    monkeypatch.setattr(f, "_TW_CACHE", {})
    tw, x = make(16, 2, False, "complex", 4, gen)
    tw, x = tw.to(DEVICE).requires_grad_(), x.to(DEVICE)
    kt.butterfly_multiply_triton(tw, x).abs().sum().backward()
    kt.butterfly_multiply_triton(tw, x)
    assert len(calls) == 1
    with torch.no_grad():
        tw.mul_(0.5)
    y = kt.butterfly_multiply_triton(tw, x)
    assert len(calls) == 2
    assert rel(y, reference(tw.detach(), x)) < 1e-10


# ---- register pressure and program count ---------------------------------------------------


@needs_backend
def test_complex_backward_splits_large_tiles(gen: torch.Generator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Complex backward tiles above BWD_MAX_TILE_COMPLEX (4096 spills on sm_90 and sm_80) run
    as more passes than the forward's; results still match the reference. Lowered to 16
    here so that the interpreter reaches the path at n = 64."""
    monkeypatch.setattr(f, "BWD_MAX_TILE_COMPLEX", 16)
    check_f64(64, 2, True, False, "ctw", 3, gen)
    assert kt.last_config("forward")["num_passes"] == 1
    assert kt.last_config("backward")["num_passes"] == 2
    check_f64(64, 1, False, True, "real", 3, gen)  # real data keeps one pass
    assert kt.last_config("backward")["num_passes"] == 1


def test_complex_backward_plan_at_4096() -> None:
    """The real plan at n = 4096: forward one tile, complex backward 2048-point tiles."""
    g = f.Geometry(16384, 4096, 12, 1, False, True, True, True, torch.float32, torch.float32,
                   tuple(f.plan_passes(12)))
    assert [(1 << p.c_log) * p.lob for p in g.passes] == [4096]
    assert all((1 << p.c_log) * p.lob <= 2048 for p in f.backward_geometry(g).passes)
    real = f.Geometry(16384, 4096, 12, 1, False, True, False, False, torch.float32,
                      torch.float32, g.passes)
    assert f.backward_geometry(real) is real


@pytest.mark.parametrize("sms", [108, 132])  # A100, H100 SXM
@pytest.mark.parametrize("cplx", [False, True])
def test_backward_fills_every_sm(sms: int, cplx: bool) -> None:
    """At batch 16384 every backward launch has at least one program per SM (the partial
    budget alone allowed 42 at n = 4096 complex), and about 4 per SM at most."""
    item = 8 if cplx else 4
    for m in range(6, 17):
        for p in f.plan_passes(m):
            nq = (1 << m) // ((1 << p.c_log) * p.lob)
            nsplit, rows = f.split_count(16384, nq, 4 * p.c_log * (1 << m) // 2 * item, sms)
            assert sms <= nsplit * nq < 4 * sms + nq, (m, p, nsplit)
            assert nsplit * rows >= 16384 > (nsplit - 1) * rows
