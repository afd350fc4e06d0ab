"""The fast learned matrix (kernels/bp_matrix.py) against the slow definition, and batched trials.

The slow definition is ButterflyStack.forward on the identity (the butterfly multiply and the
relaxed permutations of kernels/permutation.py, row by row), in float64, values and gradients.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kernels import bp_matrix, butterfly
from kernels.butterfly import ButterflyStack, save_factors


def _gen(seed: int | None = None) -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    return torch.Generator().manual_seed(seed)


def _slow(stack: ButterflyStack) -> torch.Tensor:
    return stack(torch.eye(stack.n, dtype=torch.float64)).transpose(0, 1)


def _grads(stack: ButterflyStack, mat: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in stack.parameters() if p.requires_grad]
    loss = (mat * r).real.sum() if mat.is_complex() else (mat * r.real).sum()
    return list(torch.autograd.grad(loss, params))


@pytest.fixture(params=["small", "fused", "composite", "compiled"])
def level_path(request, monkeypatch) -> str:
    """Force the dense small-n pieces, or every relaxed level through the torch autograd
    Function, through the plain-ops variant, or through the compiled kernels where available
    (kernels/cpu/columns.py)."""
    small, fused, compiled = {
        "small": (1 << 20, 0, False),
        "fused": (2, 0, False),
        "composite": (2, 1 << 60, False),
        "compiled": (2, 0, True),
    }[request.param]
    monkeypatch.setattr(bp_matrix, "SMALL_N", small)
    monkeypatch.setattr(bp_matrix, "SMALL_N_TORCH", small)
    monkeypatch.setattr(bp_matrix, "FUSED_MIN_ENTRIES", fused)
    monkeypatch.setattr(bp_matrix, "COMPILED", compiled)
    return request.param


def _join(monkeypatch, push: bool, block: int) -> None:
    """Join bpbp's blocks by the push (with this block) or the dense product, at every n, with
    or without the compiled levels."""
    for suffix in ("", "_TORCH"):
        monkeypatch.setattr(butterfly, "BPBP_DENSE_MAX_N" + suffix, 2 if push else 1 << 20)
        monkeypatch.setattr(butterfly, "BPBP_PUSH_BLOCK" + suffix, block)


def test_butterfly_and_permutation_match_the_oracle(level_path) -> None:
    """B of a tied twiddle against kernels/reference.py; P against kernels/permutation.py."""
    from kernels.permutation import permute
    from kernels.reference import butterfly_dense

    g = _gen()
    for n in (2, 4, 16, 32):
        tw = torch.randn(n - 1, 2, 2, dtype=torch.complex128, generator=g)
        want = butterfly_dense(tw.unsqueeze(0))
        torch.testing.assert_close(bp_matrix.tied_bp_matrix(tw, None), want)
        if n >= 4:
            probs = torch.rand(log2(n) - 1, 3, dtype=torch.float64, generator=g)
            eye = torch.eye(n, dtype=torch.float64)
            torch.testing.assert_close(bp_matrix.dense_permutation(probs, n), permute(eye, probs).T)
            torch.testing.assert_close(
                bp_matrix.tied_bp_matrix(tw, probs), want @ permute(eye, probs).T.to(want.dtype)
            )


def log2(n: int) -> int:
    return n.bit_length() - 1


@pytest.mark.parametrize("push", [False, True], ids=["dense", "push"])
@pytest.mark.parametrize("real_output", [False, True])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(
    "model,extra_perm", [("bp", "one"), ("bpp", "one"), ("bpp", "per_level"), ("bpbp", "one")]
)
@pytest.mark.parametrize("n", [4, 32])
def test_matrix_is_forward_on_identity(
    n, model, extra_perm, share, real_output, push, level_path, monkeypatch
) -> None:
    """Values and every parameter's gradient, relaxed, then with some and all P rounded."""
    if push and model != "bpbp":
        pytest.skip("push only joins the blocks of bpbp")
    _join(monkeypatch, push, 4)  # push: 3 levels of each kind at n=32
    g = _gen()
    stack = ButterflyStack(
        n, model, share_logits=share, real_output=real_output, extra_perm=extra_perm, generator=g
    ).double()
    r = torch.randn(n, n, dtype=torch.complex128, generator=g)
    for rounding in range(len(stack.permutations()) + 1):
        if rounding:
            stack.permutations()[rounding - 1].round_()
        fast, slow = stack.matrix(), _slow(stack)
        assert fast.shape == (n, n) and fast.is_complex() == (not real_output)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
        for a, b in zip(_grads(stack, fast, r), _grads(stack, slow, r), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", ["bp", "bpp", "bpbp"])
def test_matrix_at_512_uses_the_big_paths(model: str) -> None:
    """n = 512: fused top levels and (bpbp) the push join, against the slow definition."""
    g = _gen()
    stack = ButterflyStack(512, model, share_logits=False, generator=g).double()
    r = torch.randn(512, 512, dtype=torch.complex128, generator=g)
    fast, slow = stack.matrix(), _slow(stack)
    torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-11)
    for a, b in zip(_grads(stack, fast, r), _grads(stack, slow, r), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_bp_level_gradcheck(complex_: bool, lead: tuple[int, ...]) -> None:
    """The autograd Function's hand-written backward against finite differences."""
    g = _gen()
    dtype = torch.complex128 if complex_ else torch.float64
    for s in (1, 2, 4):
        mat = torch.randn(*lead, s, s, dtype=dtype, generator=g, requires_grad=True)
        t = torch.randn(*lead, s, 2, 2, dtype=dtype, generator=g, requires_grad=True)
        p = torch.rand(*lead, 3, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(bp_matrix._BPLevel.apply, (mat, t, p))


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_column_level_gradcheck(complex_: bool, lead: tuple[int, ...]) -> None:
    g = _gen()
    dtype = torch.complex128 if complex_ else torch.float64
    x = torch.randn(*lead, 3, 2, 4, dtype=dtype, generator=g, requires_grad=True)
    p = torch.rand(*lead, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(bp_matrix._ColumnLevel.apply, (x, p))


def test_fp32_error_within_twice_the_old_recursion() -> None:
    """float32: the fast matrix's error against fp64 is at most about the plain recursion's."""
    g = _gen()
    stack = ButterflyStack(256, "bpp", generator=g)
    exact = copy.deepcopy(stack).double().matrix()
    with torch.no_grad():
        fast = stack.matrix()
        twiddle = stack.butterflies[0].twiddle_tensor()[0]
        plain = bp_matrix.permute_columns(
            _plain_recursion(twiddle, stack.perms[0].probs()), stack.extra_perm.probs(), True
        )
    err_fast = (fast.to(exact.dtype) - exact).abs().max()
    err_plain = (plain.to(exact.dtype) - exact).abs().max()
    assert err_fast <= 2 * err_plain + 1e-7


def _plain_recursion(twiddle: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The commit-60984eb recursion (cat, then a full-size permute_level_transpose)."""
    from kernels.permutation import permute_level_transpose

    n = twiddle.shape[0] + 1
    m = n.bit_length() - 1
    mat = twiddle[0]
    for level in range(1, m):
        s = 1 << level
        t = twiddle[s - 1 : 2 * s - 1]
        top = torch.cat([t[:, 0, 0, None] * mat, t[:, 0, 1, None] * mat], dim=1)
        bot = torch.cat([t[:, 1, 0, None] * mat, t[:, 1, 1, None] * mat], dim=1)
        p = probs[(m - level - 1) if probs.shape[0] > 1 else 0]
        mat = permute_level_transpose(torch.cat([top, bot]), p.to(mat.real.dtype), 2 * s)
    return mat


MODEL_CASES = [
    ("bp", "one", True),
    ("bpp", "one", False),
    ("bpp", "per_level", True),
    ("bpbp", "one", False),
]


@pytest.mark.parametrize("model,extra_perm,share", MODEL_CASES)
@pytest.mark.parametrize("init", ["randn", "ortho"])
def test_trial_t_is_the_stack_of_generator_t(model, extra_perm, share, init) -> None:
    """Same draws, same order: trial t == an unbatched stack from a generator seeded like g_t."""
    seeds = [int.from_bytes(os.urandom(4), "little") for _ in range(3)]
    kw = dict(share_logits=share, init=init, extra_perm=extra_perm, real_output=model != "bp")
    batched = ButterflyStack(16, model, trials=3, generator=[_gen(s) for s in seeds], **kw)
    for t, seed in enumerate(seeds):
        one = ButterflyStack(16, model, generator=_gen(seed), **kw)
        want, got = one.state_dict(), batched.trial(t).state_dict()
        assert list(got) == list(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
            assert torch.equal(batched.state_dict()[k][t] if want[k].dim() else got[k], want[k])
        torch.testing.assert_close(batched.matrix()[t], one.matrix(), rtol=1e-5, atol=1e-6)


def test_one_generator_is_drawn_trial_after_trial() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    batched = ButterflyStack(8, "bpbp", trials=2, generator=_gen(seed))
    g = _gen(seed)
    ones = [ButterflyStack(8, "bpbp", generator=g) for _ in range(2)]
    for t, one in enumerate(ones):
        for k, v in one.state_dict().items():
            assert torch.equal(batched.trial(t).state_dict()[k], v), k


def test_unbatched_state_dict_keys_unchanged() -> None:
    """Saved factors and other users rely on these exact keys and shapes."""
    stack = ButterflyStack(8, "bpp", share_logits=False, extra_perm="per_level")
    shapes = {k: tuple(v.shape) for k, v in stack.state_dict().items()}
    assert shapes == {
        "extra_perm.logits": (2, 3),
        "extra_perm.hard": (),
        "perms.0.logits": (2, 3),
        "perms.0.hard": (),
        "butterflies.0.twiddle": (1, 7, 2, 2, 2),
    }
    batched = ButterflyStack(8, "bpp", share_logits=False, extra_perm="per_level", trials=4)
    assert {k: tuple(v.shape) for k, v in batched.state_dict().items()} == {
        k: (4, *s) if s else s for k, s in shapes.items()
    }


@pytest.mark.parametrize("model,extra_perm,share", MODEL_CASES)
@pytest.mark.parametrize("push", [False, True])
def test_batched_values_and_gradients_are_per_trial(
    model, extra_perm, share, push, level_path, monkeypatch
) -> None:
    """float64: matrix()[t] and the gradients of a summed per-trial loss equal trial t's own."""
    _join(monkeypatch, push, 8)
    kw = dict(share_logits=share, extra_perm=extra_perm, real_output=model == "bpp")
    batched = ButterflyStack(32, model, trials=3, generator=[_gen() for _ in range(3)], **kw)
    batched = batched.double()
    batched.perms[0].round_() if model == "bpbp" else None  # mixed hard and relaxed
    target = torch.randn(3, 32, 32, dtype=torch.complex128, generator=_gen())
    target = target.real if model == "bpp" else target
    mats = batched.matrix()
    loss = (mats - target).abs().square().mean(dim=(-2, -1)).sum()
    grads = dict(
        zip(
            batched.state_dict(keep_vars=True),
            torch.autograd.grad(loss, [p for p in batched.parameters() if p.requires_grad]),
            strict=False,
        )
    )
    names = [k for k, v in batched.state_dict(keep_vars=True).items() if v.requires_grad]
    grads = dict(zip(names, grads.values(), strict=True))
    for t in range(3):
        one = batched.trial(t)
        assert one.butterflies[0].twiddle.dtype == torch.float64
        mat = one.matrix()
        torch.testing.assert_close(mats[t], mat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mats[t], _slow(one), rtol=1e-12, atol=1e-12)
        (mat - target[t]).abs().square().mean().backward()
        one_named = dict(one.named_parameters())
        for k, g in grads.items():
            torch.testing.assert_close(g[t], one_named[k].grad, rtol=1e-10, atol=1e-13)


def test_batched_forward_round_save() -> None:
    batched = ButterflyStack(16, "bpp", trials=2, generator=[_gen(), _gen()], real_output=True)
    x = torch.randn(5, 16, dtype=torch.float32)
    y = batched(x)
    assert y.shape == (2, 5, 16) and not y.is_complex()
    for t in range(2):
        torch.testing.assert_close(y[t], batched.trial(t)(x), rtol=1e-5, atol=1e-5)
    batched.round_permutations_()
    one = batched.trial(1)
    assert all(bool(p.hard) and not p.logits.requires_grad for p in one.permutations())
    torch.testing.assert_close(batched.matrix()[1], one.matrix(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="save one trial"):
        save_factors(batched, "unused.pt")


def test_batched_argument_errors() -> None:
    with pytest.raises(ValueError, match="needs as many generators"):
        ButterflyStack(8, "bp", trials=3, generator=[_gen(), _gen()])
    with pytest.raises(ValueError, match="needs trials"):
        ButterflyStack(8, "bp", generator=[_gen()])
    with pytest.raises(ValueError, match="tied"):
        ButterflyStack(8, "bp", tied=False, trials=2)
    with pytest.raises(ValueError, match="batched"):
        ButterflyStack(8, "bp").trial(0)
