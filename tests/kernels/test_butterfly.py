"""Butterfly modules against the oracle: nn.Linear drop-in, BP stacks, fast matrix, save/load."""

from __future__ import annotations

import os

import pytest
import torch

from kernels import Butterfly, ButterflyStack, butterfly_multiply, load_factors, save_factors
from kernels.reference import butterfly_dense, butterfly_multiply_reference


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sizes", [(8, 8), (5, 3), (3, 13), (16, 1)])
def test_butterfly_layer_is_its_dense_matrix(complex_: bool, tied: bool, sizes: tuple) -> None:
    """y = W x + b with W the padded/truncated butterfly matrix; gradients agree too."""
    fin, fout = sizes
    g = _gen()
    layer = Butterfly(fin, fout, bias=True, complex=complex_, tied=tied, nblocks=2, generator=g)
    layer = layer.double()
    x = torch.randn(4, 3, fin, dtype=torch.float64, generator=g, requires_grad=True)
    y = layer(x)
    assert y.shape == (4, 3, fout)
    w = butterfly_dense(layer.twiddle_tensor())[:fout, :fin]
    bias = torch.view_as_complex(layer.bias) if complex_ else layer.bias
    expected = x.to(w.dtype) @ w.T + bias
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    r = torch.randn(y.shape, dtype=y.dtype, generator=g)
    gx, gt = torch.autograd.grad((y * r).real.sum(), (x, layer.twiddle))
    gx2, gt2 = torch.autograd.grad((expected * r).real.sum(), (x, layer.twiddle))
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gt, gt2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("init", ["randn", "ortho"])
def test_inits(init: str) -> None:
    """ortho gives unitary 2x2 blocks; randn has the paper's scale (1/2 per complex part)."""
    layer = Butterfly(1024, 1024, bias=False, complex=True, tied=False, init=init, generator=_gen())
    t = layer.twiddle_tensor().detach().to(torch.complex128).reshape(-1, 2, 2)
    if init == "ortho":
        eye = torch.eye(2, dtype=t.dtype).expand_as(t)
        torch.testing.assert_close(t @ t.conj().transpose(-1, -2), eye, atol=1e-6, rtol=0)
    else:
        assert abs(layer.twiddle.std().item() - 0.5) < 0.02


def test_drop_in_for_linear_trains() -> None:
    """A Butterfly layer in an nn.Sequential receives gradients and reduces a loss."""
    g = _gen()
    model = torch.nn.Sequential(
        Butterfly(16, 16, generator=g), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 2, (64,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


@pytest.mark.parametrize("model", ["bp", "bpp", "bpbp"])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("n", [4, 16, 64])
def test_fast_matrix_matches_forward(model: str, share: bool, n: int) -> None:
    """The O(n^2) tied recursion equals pushing the identity through the layers, relaxed or hard."""
    stack = ButterflyStack(n, model, share_logits=share, generator=_gen()).double()
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(stack.matrix(), stack(eye).T, rtol=1e-10, atol=1e-10)
    twiddle = stack.butterflies[0].twiddle
    g1 = torch.autograd.grad(stack.matrix().abs().square().sum(), twiddle)[0]
    g2 = torch.autograd.grad(stack(eye).abs().square().sum(), twiddle)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)
    stack.round_permutations_()
    torch.testing.assert_close(stack.matrix(), stack(eye).T, rtol=1e-10, atol=1e-10)


def test_untied_stack_matrix() -> None:
    stack = ButterflyStack(16, "bpbp", tied=False, generator=_gen()).double()
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(stack.matrix(), stack(eye).T)


def test_real_output_takes_real_part() -> None:
    stack = ButterflyStack(8, "bp", real_output=True, generator=_gen())
    assert not stack.matrix().is_complex()
    assert not stack(torch.randn(2, 8)).is_complex()


def test_save_load_round_trip(tmp_path) -> None:
    """Saved factors load back into a module that multiplies vectors like the original."""
    stack = ButterflyStack(32, "bpp", generator=_gen())
    stack.perms[0].round_()
    path = tmp_path / "f.pt"
    save_factors(stack, path, {"note": "test"})
    loaded = load_factors(path)
    x = torch.randn(5, 32, dtype=torch.complex64)
    torch.testing.assert_close(loaded(x), stack(x))
    assert bool(loaded.perms[0].hard) and not bool(loaded.extra_perm.hard)
    assert not list(tmp_path.glob(".*tmp"))


def test_load_rejects_foreign_file(tmp_path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(ValueError, match="not a butterfly-suite factors file"):
        load_factors(path)


def test_dispatch_matches_reference() -> None:
    g = _gen()
    tw = torch.randn(2, 5, 16, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)
    for inc in (True, False):
        torch.testing.assert_close(
            butterfly_multiply(tw, x, inc), butterfly_multiply_reference(tw, x, inc)
        )


@pytest.mark.parametrize("bad", [0, 3, 12])
def test_stack_rejects_bad_sizes(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        ButterflyStack(bad, "bp")


def test_stack_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        ButterflyStack(8, "bpbpbp")


def test_eval_forward_uses_a_plan_that_follows_weight_updates() -> None:
    import copy

    gen = torch.Generator().manual_seed(3)
    layer = Butterfly(64, 64, bias=True, tied=True, init="ortho", generator=gen)
    x = torch.randn(5, 64, generator=gen)
    want = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        got = layer(x)
    assert layer._cpu_plan()._plan is not None  # the compiled (or vectorised) CPU path ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.twiddle.mul_(2.0)  # an in-place update bumps the version counter
        torch.testing.assert_close(layer(x), 2**6 * (want - layer.bias) + layer.bias)
    clone = copy.deepcopy(layer)
    assert clone._cpu_plan()._plan is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x))


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _check_against_uncached(layer: Butterfly, x: torch.Tensor) -> None:
    """layer(x) (eval: through its plan cache) is bit for bit the uncached dispatch of
    kernels.multiply, and close to the oracle."""
    tw, bias = layer.twiddle_tensor().detach(), layer.bias.detach()
    bias = torch.view_as_complex(bias) if layer.complex else bias
    got = layer(x)
    torch.testing.assert_close(got, butterfly_multiply(tw, x, bias=bias), rtol=0, atol=0)
    want = butterfly_multiply_reference(_wide(tw), _wide(x)) + bias
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("complex_", [False, True])
def test_eval_plan_is_never_stale(
    backend: str, complex_: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eval layer's cached plan across batch sizes, strides, dtypes and weight updates: every
    call is what the uncached dispatch gives; a real plan is reused across batches and strides."""
    monkeypatch.setenv("BUTTERFLY_CPU_BACKEND", backend)
    g = _gen()
    layer = Butterfly(32, 32, complex=complex_, tied=True, generator=g).eval()
    dtype = torch.complex64 if complex_ else torch.float32
    xs = [torch.randn(1, 32, dtype=dtype, generator=g),
          torch.randn(16, 32, dtype=dtype, generator=g),
          torch.randn(32, 3, dtype=dtype, generator=g).t(),
          torch.randn(1, 64, dtype=dtype, generator=g)[:, ::2],
          torch.randn(2, 32, generator=g, dtype=torch.float64),
          torch.randn(1, 32, dtype=dtype, generator=g)]  # fmt: skip
    with torch.inference_mode():
        plans = []
        for x in xs if complex_ else xs[:4] + xs[5:]:  # float64 x needs a float64 real layer
            _check_against_uncached(layer, x)
            plans.append(layer._cpu_plan()._plan)
        if complex_:  # the complex row loop only up to COMPLEX_ROWS_MAX_BATCH rows
            assert plans[1] is None
        else:  # one float32 plan fits every batch and stride
            assert plans[0] is not None and all(p is plans[0] for p in plans[:4])
            layer.double()  # new storage (through .data, no new version): a new plan
            _check_against_uncached(layer, xs[4])
            assert layer._cpu_plan()._plan is not plans[0]
            layer.float()
            _check_against_uncached(layer, xs[0])
        with pytest.raises(ValueError, match="batch, 32"):
            butterfly_multiply(layer.twiddle_tensor(), xs[0][:, :16], cache=layer._cpu_plan())
    for edit in ("twiddle", "bias"):
        with torch.no_grad():
            layer(xs[0])  # the plan of this very call is cached
            getattr(layer, edit).mul_(-0.5)  # in place: a new version of the parameter
            _check_against_uncached(layer, xs[0])
