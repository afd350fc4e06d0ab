"""Compiled relaxed permutations (kernels.cpu.permute) and the layers' inference paths.

Against kernels.permutation (the torch definition) and the float64 oracle, on fresh random
probabilities and inputs (the `gen` fixture prints its seed).
"""

from __future__ import annotations

import pytest
import torch

from kernels.cpu import compiled
from kernels.cpu.permute import PermutationPlanCache, RelaxedPermutationPlan, relaxed_permute
from kernels.permutation import Permutation
from kernels.structured.butterfly_layer import BPLayer

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


@pytest.fixture(autouse=True)
def _compiled() -> None:
    if not compiled.compiled_available():
        pytest.skip(f"compiled kernels unavailable: {compiled.backend()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "c64", "c128"])
def test_plan_equals_the_torch_permutation(dtype: torch.dtype, gen: torch.Generator) -> None:
    """Same values as Permutation.forward, to the last bit: shared, per level, top only,
    relaxed and rounded, n = 4 .. 2048, batch 1, 5 and 37, strided input."""
    for n in (4, 8, 64, 2048):
        for share, top_only in ((True, False), (False, False), (False, True)):
            perm = Permutation(n, share=share, generator=gen, top_only=top_only)
            for rounded in (False, True):
                if rounded:
                    perm.round_()
                for batch in (1, 5, 37):  # the row chain, one tile, tiles and a rest
                    x = torch.randn(batch, 2 * n, dtype=dtype, generator=gen)[:, ::2]
                    plan = RelaxedPermutationPlan(perm.probs(), n, top_only, dtype)
                    with torch.no_grad():
                        want = perm(x)
                    got = plan(x)
                    what = f"n={n} share={share} top_only={top_only} rounded={rounded}"
                    assert torch.equal(got, want), f"{what}: {(got - want).abs().max():.3g}"


def test_plan_cache_follows_logit_updates(gen: torch.Generator) -> None:
    """An in-place logit update or round_() rebuilds the plan; the same logits reuse it."""
    perm = Permutation(16, share=True, generator=gen)
    cache = PermutationPlanCache()
    x = torch.randn(3, 16, generator=gen)
    first = cache.lookup(perm, x.dtype)
    assert first is not None and cache.lookup(perm, x.dtype) is first
    with torch.no_grad():
        perm.logits.mul_(-1.0)
        torch.testing.assert_close(cache.lookup(perm, x.dtype)(x), perm(x), rtol=0, atol=0)
    perm.round_()
    with torch.no_grad():
        torch.testing.assert_close(cache.lookup(perm, x.dtype)(x), perm(x), rtol=0, atol=0)


@pytest.mark.parametrize("nblocks", [1, 2])
def test_layers_infer_like_they_train(nblocks: int, gen: torch.Generator) -> None:
    """BP / BPBP, real and complex, fixed and learned P: the compiled inference path equals
    the layer's dense matrix (float64 oracle of the same weights) at batch 1 and 37."""
    n = 64
    for complex_ in (False, True):
        for learned in (False, True):
            layer = BPLayer(n, nblocks, complex_, learned, generator=gen)
            with torch.no_grad():  # move the logits off their init so P is a real mixture
                for p in layer.perms:
                    p.logits.copy_(torch.randn(p.logits.shape, generator=gen))
            wide = BPLayer(n, nblocks, complex_, learned).double()
            wide.load_state_dict(layer.state_dict())
            w = wide.matrix()
            for batch in (1, 37):
                x = torch.randn(batch, n, generator=gen)
                with torch.inference_mode():
                    y = layer.eval()(x)
                exact = x.double() @ w.T
                err = ((y.double() - exact).abs().max() / exact.abs().max()).item()
                what = f"complex={complex_} learned={learned} batch={batch}"
                assert y.dtype == torch.float32 and err <= 1e-5, f"{what}: {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "c64", "c128"])
def test_training_chain_matches_the_torch_permutation(
    dtype: torch.dtype, gen: torch.Generator
) -> None:
    """relaxed_permute's values and gradients (x and logits) against Permutation.apply in
    float64 / complex128: shared, per level and top only; batch 1, one partial tile and
    several tiles with a rest; x with and without a gradient."""
    wide = torch.complex128 if dtype.is_complex else torch.float64
    tol = 1e-12 if dtype in (torch.float64, torch.complex128) else 2e-5
    for n in (4, 16, 256):
        for share, top_only in ((True, False), (False, False), (False, True)):
            perm = Permutation(n, share=share, generator=gen, top_only=top_only)
            if tol < 1e-6:
                perm = perm.double()  # probabilities in x's precision
            for batch in (1, 5, 37):
                x = torch.randn(batch, n, dtype=dtype, generator=gen)
                w = torch.randn(batch, n, dtype=wide, generator=gen)
                x64 = x.to(wide, copy=True).requires_grad_()
                logits64 = perm.logits.detach().double().requires_grad_()
                ref = perm.apply(x64, torch.sigmoid(logits64))
                want = torch.autograd.grad((ref * w).real.sum(), [x64, logits64])
                for x_grad in (True, False):
                    xin = x.clone().requires_grad_(x_grad)
                    perm.logits.grad = None
                    y = relaxed_permute(xin, perm.probs(), top_only)
                    (y * w.to(dtype)).real.sum().backward()
                    what = f"n={n} share={share} top_only={top_only} batch={batch}"
                    scale = want[1].abs().max().item() + 1e-30
                    assert (y.to(wide) - ref).abs().max() <= tol * 10, what
                    assert (
                        perm.logits.grad.double() - want[1]
                    ).abs().max() <= tol * scale * batch, what
                    if x_grad:
                        assert (xin.grad.to(wide) - want[0]).abs().max() <= tol * 10, what
                    else:
                        assert xin.grad is None, what


def test_training_chain_rejects_bad_input() -> None:
    perm = Permutation(8)
    with pytest.raises(ValueError, match="batch, n"):
        relaxed_permute(torch.randn(2, 2, 8), perm.probs(), False)
    with pytest.raises(ValueError, match="batch, n"):
        relaxed_permute(torch.randn(2, 8, dtype=torch.float16), perm.probs(), False)


def test_permute_route_names_each_path_and_each_path_gives_perm_x(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kernels.multiply chooses a learned permutation's path: the compiled chain with its
    backward when training, the inference plan without grad mode, torch for the rest."""
    from kernels.multiply import permute_route, relaxed_permutation

    perm = Permutation(64, share=True, generator=gen)
    x = torch.randn(9, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    cache = PermutationPlanCache()
    want = perm(x)
    assert permute_route(perm, x) == "cpu-relaxed"
    got = relaxed_permutation(perm, x, cache)
    assert got.grad_fn is not None and "Relaxed" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want)
    g, wrt = torch.randn_like(want), (x, perm.logits)
    torch.testing.assert_close(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g))
    with torch.no_grad():
        assert permute_route(perm, x) == "cpu-plan"
        torch.testing.assert_close(relaxed_permutation(perm, x, cache), want.detach())
        assert len(cache._plans) == 1  # the plan is kept for the next call
        assert permute_route(perm, x.half()) == "torch"
    assert permute_route(perm, x.to(torch.bfloat16)) == "torch"
    monkeypatch.setenv(compiled.BACKEND_ENV, "torch")
    assert permute_route(perm, x) == "torch"
    torch.testing.assert_close(relaxed_permutation(perm, x), want)
