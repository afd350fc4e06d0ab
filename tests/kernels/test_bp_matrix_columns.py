"""The compiled relaxed levels (kernels/cpu/columns.py) and the bpbp push against torch.

References: kernels.bp_matrix's pure-torch column_level and _BPLevel (bp_matrix.COMPILED off),
the butterfly oracle of kernels.reference, and the dense product of a bpbp stack's two blocks.
Fresh random inputs every run (the `gen` fixture prints its seed); float64 / complex128 to
about 1e-10, values and gradients (input, twiddle, probabilities), with and without a leading
trial dim.
"""

from __future__ import annotations

import pytest
import torch

import kernels.cpu.tiled as tiled
from kernels import bp_matrix, butterfly
from kernels.butterfly import ButterflyStack
from kernels.cpu import columns, compiled
from kernels.reference import butterfly_multiply_reference

EXACT = dict(rtol=1e-10, atol=1e-10)
LEADS = [(), (3,)]
WIDE = [torch.float64, torch.complex128]


@pytest.fixture(autouse=True)
def _compiled() -> None:
    if not compiled.compiled_available():
        pytest.skip(f"compiled kernels unavailable: {compiled.backend()}")


def _probs(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Uniform probabilities with the lerp's branch points and ends mixed in."""
    p = torch.rand(*shape, dtype=torch.float64, generator=gen)
    flat = p.view(-1)
    for i, v in zip(range(0, flat.numel(), 5), (0.0, 0.5, 1.0), strict=False):
        flat[i] = v
    return p.requires_grad_()


def _loss(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (z * r).real.sum() if z.is_complex() else (z * r.real).sum()


def _check(fast, slow, inputs: list[torch.Tensor], gen: torch.Generator, **tol) -> None:
    """fast() == slow() in value and in the gradient of a random linear loss."""
    zf, zs = fast(), slow()
    torch.testing.assert_close(zf, zs, **(tol or EXACT))
    r = torch.randn(zs.shape, dtype=torch.complex128, generator=gen).to(
        zs.dtype if zs.is_complex() else torch.complex128
    )
    gf = torch.autograd.grad(_loss(zf, r), inputs)
    gs = torch.autograd.grad(_loss(zs, r), inputs)
    for a, b in zip(gf, gs, strict=True):
        torch.testing.assert_close(a, b, **(tol or EXACT))


def _reference_chain(x: torch.Tensor, p: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    for j, k in enumerate(ks):
        x = bp_matrix.column_level(x, p[..., j, :], k)
    return x


@pytest.mark.parametrize("dtype", WIDE)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize(
    "n,ks", [(4, (4,)), (8, (2, 4, 8)), (32, (32,)), (64, (4, 8, 16, 32, 64)), (128, (64, 128))]
)
def test_column_chain_matches_torch(n, ks, lead, dtype, gen) -> None:
    x = torch.randn(*lead, 5, n, dtype=dtype, generator=gen, requires_grad=True)
    p = _probs((*lead, len(ks), 3), gen)
    assert columns.columns_fit(x, p)
    _check(
        lambda: columns.relaxed_columns(x, p, ks), lambda: _reference_chain(x, p, ks), [x, p], gen
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_column_chain_single_precision(dtype, gen) -> None:
    """float32 / complex64 against the float64 reference of the same numbers."""
    ks = (16, 32, 64)
    x = torch.randn(2, 7, 64, dtype=dtype, generator=gen, requires_grad=True)
    p = torch.rand(2, 3, 3, generator=gen, requires_grad=True)
    z = columns.relaxed_columns(x, p, ks)
    assert z.dtype == dtype
    wide = torch.complex128 if dtype.is_complex else torch.float64
    want = _reference_chain(x.detach().to(wide), p.detach().double(), ks)
    torch.testing.assert_close(z.to(wide), want, rtol=1e-5, atol=1e-5)
    gx, gp = torch.autograd.grad(z.abs().square().sum(), [x, p])
    assert gx.dtype == dtype and gp.dtype == torch.float32


def test_column_chain_edges(gen) -> None:
    """No levels is the identity; a non-contiguous or conjugated input reads as its values."""
    x = torch.randn(16, 3, 2, dtype=torch.float64, generator=gen)
    xc = torch.view_as_complex(x).conj().transpose(0, 1)  # (3, 16), conj bit, strided
    p = torch.rand(0, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(columns.relaxed_columns(xc, p, ()), xc.resolve_conj())
    p = torch.rand(1, 3, dtype=torch.float64, generator=gen)
    want = _reference_chain(xc.resolve_conj().clone(), p, (2,))
    torch.testing.assert_close(columns.relaxed_columns(xc, p, (2,)), want, **EXACT)
    with pytest.raises(ValueError, match="do not fit"):
        columns.relaxed_columns(xc, p, (3,))


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_compiled_gradcheck(complex_: bool, lead: tuple[int, ...], gen) -> None:
    """Both compiled backwards against finite differences."""
    dtype = torch.complex128 if complex_ else torch.float64
    x = torch.randn(*lead, 3, 8, dtype=dtype, generator=gen, requires_grad=True)
    p = torch.rand(*lead, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p: columns.relaxed_columns(x, p, (4, 8)), (x, p))
    mat = torch.randn(*lead, 4, 4, dtype=dtype, generator=gen, requires_grad=True)
    t = torch.randn(*lead, 4, 2, 2, dtype=dtype, generator=gen, requires_grad=True)
    q = torch.rand(*lead, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(columns.bp_level, (mat, t, q))


@pytest.mark.parametrize("dtype", WIDE)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("s", [1, 2, 8, 64])
def test_bp_level_matches_torch(s, lead, dtype, gen) -> None:
    mat = torch.randn(*lead, s, s, dtype=dtype, generator=gen, requires_grad=True)
    t = torch.randn(*lead, s, 2, 2, dtype=dtype, generator=gen, requires_grad=True)
    p = _probs((*lead, 3), gen)
    assert columns.bp_level_fit(mat, t, p)
    _check(
        lambda: columns.bp_level(mat, t, p),
        lambda: bp_matrix._BPLevel.apply(mat, t, p),
        [mat, t, p],
        gen,
    )


def test_fit_rejects_what_the_kernels_do_not_take(gen) -> None:
    x = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    p = torch.rand(1, 3, dtype=torch.float64, generator=gen)
    assert columns.columns_fit(x, p)
    assert not columns.columns_fit(x.to(torch.float16), p)
    assert not columns.columns_fit(x.unsqueeze(0).expand(2, 4, 8), p)  # lead dims differ
    mat, t = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, 2, dtype=torch.complex128)
    assert not columns.bp_level_fit(mat, t, p[0])  # mixed dtypes go through torch


def test_backend_torch_forces_the_reference(monkeypatch, gen) -> None:
    """BUTTERFLY_CPU_BACKEND=torch: no compiled level runs, results still match."""
    x = torch.randn(6, 64, dtype=torch.complex128, generator=gen, requires_grad=True)
    probs = torch.rand(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    fast = bp_matrix.permute_columns(x, probs)
    monkeypatch.setenv(compiled.BACKEND_ENV, "torch")
    assert not columns.columns_fit(x, probs)
    monkeypatch.setattr(columns, "relaxed_columns", None)  # would fail if called
    torch.testing.assert_close(bp_matrix.permute_columns(x, probs), fast, **EXACT)


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("dtype", WIDE)
@pytest.mark.parametrize("skip", [1, 3, 6])
def test_tiled_skip_leaves_the_low_levels_out(skip, dtype, store, monkeypatch, gen) -> None:
    """butterfly_multiply_tiled(skip) == the reference with those levels' twiddles = I."""
    monkeypatch.setattr(tiled, "STORE_LEVELS", store)
    n, rows = 64, 37  # several tiles and a rest
    tw = torch.randn(1, n - 1, 2, 2, dtype=dtype, generator=gen, requires_grad=True)
    x = torch.randn(rows, n, dtype=dtype, generator=gen, requires_grad=True)
    eye = torch.eye(2, dtype=dtype).expand(1, (1 << skip) - 1, 2, 2)

    def slow() -> torch.Tensor:
        full = torch.cat([eye, tw[:, (1 << skip) - 1 :]], dim=1)
        return butterfly_multiply_reference(full, x, False)

    _check(lambda: tiled.butterfly_multiply_tiled(tw, x, False, skip), slow, [tw, x], gen)


@pytest.mark.parametrize("lead", LEADS)
def test_real_matmul(lead, gen) -> None:
    a = torch.randn(*lead, 9, 4, dtype=torch.complex128, generator=gen, requires_grad=True)
    b = torch.randn(*lead, 4, 5, dtype=torch.complex128, generator=gen, requires_grad=True)
    _check(lambda: bp_matrix.real_matmul(a, b), lambda: (a @ b).real, [a, b], gen)
    c = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(bp_matrix.real_matmul(a, c), a.real @ c, **EXACT)


@pytest.mark.parametrize("real", [False, True])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("n,block", [(64, 4), (256, 16)])
def test_times_bp_matches_torch(n, block, lead, real, monkeypatch, gen) -> None:
    """times_bp with the compiled levels and left-out butterfly levels against the torch path
    (COMPILED off: column_level chain; the butterfly through its identity-twiddle route)."""
    m = n.bit_length() - 1
    k = torch.randn(*lead, n, n, dtype=torch.complex128, generator=gen, requires_grad=True)
    tw = torch.randn(*lead, n - 1, 2, 2, dtype=torch.complex128, generator=gen)
    tw.requires_grad_()
    probs = _probs((*lead, m - 1, 3), gen)

    def slow() -> torch.Tensor:
        with monkeypatch.context() as mp:
            mp.setattr(bp_matrix, "COMPILED", False)
            mp.setattr(bp_matrix, "route", lambda *a: "reference")
            z = bp_matrix.times_bp(k, tw, probs, block)
        return z.real if real else z

    _check(lambda: bp_matrix.times_bp(k, tw, probs, block, real), slow, [k, tw, probs], gen)


@pytest.mark.parametrize("real_output", [False, True])
@pytest.mark.parametrize("trials", [None, 2])
def test_bpbp_push_is_the_dense_product(real_output, trials, gen) -> None:
    """n = 256 > BPBP_DENSE_MAX_N: matrix() (the push) == B2 P2 @ B1 P1 (values, gradients)."""
    n = 256
    assert n > butterfly.BPBP_DENSE_MAX_N
    gens = [gen] * trials if trials else gen
    kw = dict(share_logits=False, real_output=real_output, trials=trials, generator=gens)
    stack = ButterflyStack(n, "bpbp", **kw).double()
    params = [q for q in stack.parameters() if q.requires_grad]

    def dense() -> torch.Tensor:
        mat = stack._block(1) @ stack._block(0)
        return mat.real if real_output else mat

    _check(stack.matrix, dense, params, gen)


def test_thresholds_follow_the_backend(monkeypatch) -> None:
    """Without the compiled levels the sizes measured for the torch paths apply."""
    cpu = torch.device("cpu")
    assert bp_matrix.compiled_levels(cpu) and bp_matrix.small_n(cpu) == bp_matrix.SMALL_N
    monkeypatch.setenv(compiled.BACKEND_ENV, "torch")
    assert not bp_matrix.compiled_levels(cpu)
    assert bp_matrix.small_n(cpu) == bp_matrix.SMALL_N_TORCH
