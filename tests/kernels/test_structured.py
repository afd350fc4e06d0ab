"""The structured hidden layers of the compression experiment (kernels.structured).

Every layer: forward(x) == x @ matrix().T, gradients through both routes agree, parameter
counts match the closed forms; plus each family's defining property. Fresh random inputs each
run (the seed is printed, so pytest shows it with a failure); float64 for exact comparisons.
"""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from kernels.factorize import relative_error
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_dense, butterfly_multiply_reference
from kernels.structured import (
    METHODS,
    ButterflyUntied,
    LDRTridiagonal,
    StructuredLayer,
    fwht,
    hadamard_matrix,
    make_layer,
    param_formula,
)
from kernels.structured.circulant import f_circulant_matrix
from kernels.structured.krylov import krylov_tridiagonal, tridiagonal_matrix

F64 = torch.float64


def _layer(method: str, n: int, gen: torch.Generator, jitter: float = 0.05) -> StructuredLayer:
    """A float64 layer whose parameters are moved off their init (which can be special:
    shift operators, orthogonal blocks) by i.i.d. noise of relative size `jitter`."""
    layer = make_layer(method, n, gen).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(jitter * (p.abs().mean() + 0.1) * torch.randn(p.shape, generator=gen, dtype=F64))
    return layer


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = float(b.detach().abs().max()) + 1e-300
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("method", METHODS)
def test_forward_is_matrix_with_gradients(method: str, n: int, gen: torch.Generator) -> None:
    layer = _layer(method, n, gen)
    x = torch.randn(6, n, dtype=F64, generator=gen, requires_grad=True)
    y = layer(x)
    expected = x @ layer.matrix().T
    assert y.shape == (6, n) and y.dtype == F64 and not y.is_complex()
    _assert_close(y, expected)
    g = torch.randn(y.shape, dtype=F64, generator=gen)
    inputs = [*layer.parameters(), x]
    fast = torch.autograd.grad((y * g).sum(), inputs)
    dense = torch.autograd.grad((expected * g).sum(), inputs)
    for (name, _), a, b in zip([*layer.named_parameters(), ("x", x)], fast, dense, strict=True):
        assert b.abs().max() > 0, f"{name} gets no gradient"
        _assert_close(a, b)


@pytest.mark.parametrize("method", ["circulant", "fastfood", "monarch", "lowrank_r2", "ldr_td_r1"])
def test_forward_is_matrix_at_1024(method: str, gen: torch.Generator) -> None:
    layer = _layer(method, 1024, gen, jitter=0.01)
    x = torch.randn(4, 1024, dtype=F64, generator=gen)
    with torch.no_grad():
        _assert_close(layer(x), x @ layer.matrix().T, rtol=1e-8)


@pytest.mark.parametrize("n", [8, 16, 64, 1024])
def test_parameter_counts(n: int) -> None:
    for method in METHODS:
        layer = make_layer(method, n)
        numel = sum(p.numel() for p in layer.parameters())
        assert layer.hidden_params == param_formula(method, n) == numel, method


def test_paper_budgets_at_1024() -> None:
    n = 1024
    expected = {
        "dense": n * n,
        "lowrank_r4": 8 * n,
        "circulant": n,
        "fastfood": 3 * n,
        "toeplitz_r4": 8 * n,
        "ldr_td_r1": 2 * n + 6 * n - 4,
        "bpbp_real": 8 * (n - 1),
        "bpbp_complex": 16 * (n - 1),
        "bp_complex_learned": 8 * (n - 1) + 3,
        "bpbp_complex_learned": 16 * (n - 1) + 6,
        "monarch": 16 * n,
        "monarch_sqrt": 2 * n * 32,
        "butterfly_untied": 2 * n * 10,
    }
    assert {m: param_formula(m, n) for m in expected} == expected


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 128, 1024])
def test_fwht_is_sylvester_hadamard(n: int, gen: torch.Generator) -> None:
    h = torch.tensor(scipy.linalg.hadamard(n), dtype=F64)
    assert torch.equal(hadamard_matrix(n, F64), h)
    x = torch.randn(2, 3, n, dtype=F64, generator=gen)
    _assert_close(fwht(x, normalized=False), x @ h, rtol=1e-12)
    _assert_close(fwht(x), x @ h / n**0.5, rtol=1e-12)
    _assert_close(fwht(fwht(x)), x, rtol=1e-12)  # normalised: orthogonal and symmetric


def test_circulant_matrix_is_circulant(gen: torch.Generator) -> None:
    layer = _layer("circulant", 64, gen)
    m = layer.matrix().detach()
    assert torch.equal(m[:, 0], layer.c.detach())
    assert torch.equal(torch.roll(m, (1, 1), (0, 1)), m)


def _shift(n: int, f: float) -> torch.Tensor:
    """Z_f: down-shift with f in the top-right corner."""
    z = torch.diag(torch.ones(n - 1, dtype=F64), -1)
    z[0, n - 1] = f
    return z


def _rank(m: torch.Tensor) -> int:
    s = torch.linalg.svdvals(m)
    return int((s > 1e-10 * s[0]).sum())


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_toeplitz_like_has_displacement_rank_r(rank: int, gen: torch.Generator) -> None:
    """Z_1 W - W Z_{-1} has rank r (<= 2r of the brief: each term contributes one)."""
    n = 64
    m = _layer(f"toeplitz_r{rank}", n, gen).matrix().detach()
    assert _rank(_shift(n, 1.0) @ m - m @ _shift(n, -1.0)) == rank
    assert _rank(m) == n  # yet W itself is full rank


def test_f_circulant_is_krylov(gen: torch.Generator) -> None:
    v = torch.randn(16, dtype=F64, generator=gen)
    for f in (1.0, -1.0, 0.5):
        z, cols = _shift(16, f), [v]
        for _ in range(15):
            cols.append(z @ cols[-1])
        _assert_close(f_circulant_matrix(v, f), torch.stack(cols, dim=1), rtol=1e-14)


@pytest.mark.parametrize("rank", [1, 3])
def test_ldr_td_starts_toeplitz_like(rank: int, gen: torch.Generator) -> None:
    """At init A = B' = Z_0, so W - Z_0 W Z_0^T = G H^T exactly (Stein displacement rank r)."""
    layer = LDRTridiagonal(32, rank, gen).double()
    m = layer.matrix().detach()
    z = _shift(32, 0.0)
    _assert_close(m - z @ m @ z.T, layer.g.detach().T @ layer.h.detach(), rtol=1e-12)


def _naive_krylov(
    sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """n - 1 dense matvecs, plain autograd: (n, r, n) like krylov_tridiagonal."""
    a = tridiagonal_matrix(sub, diag, sup)
    cols = [v]
    for _ in range(v.shape[1] - 1):
        cols.append(cols[-1] @ a.T)
    return torch.stack(cols)


@pytest.mark.parametrize(("n", "step"), [(7, 0), (8, 0), (12, 0), (64, 0), (64, 2), (256, 0)])
def test_krylov_matches_naive_recursion(n: int, step: int, gen: torch.Generator) -> None:
    """The blocked Krylov and its hand-written backward against n plain matvecs + autograd."""
    ops = [
        (0.4 * torch.randn(k, dtype=F64, generator=gen)).requires_grad_() for k in (n - 1, n, n - 1)
    ]
    v = torch.randn(3, n, dtype=F64, generator=gen, requires_grad=True)
    k = krylov_tridiagonal(*ops, v, step)
    ref = _naive_krylov(*ops, v)
    assert k.shape == (n, 3, n)
    _assert_close(k, ref, rtol=1e-10)
    g = torch.randn(k.shape, dtype=F64, generator=gen)
    for a, b in zip(
        torch.autograd.grad((k * g).sum(), [*ops, v]),
        torch.autograd.grad((ref * g).sum(), [*ops, v]),
        strict=True,
    ):
        _assert_close(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="divide"):
        krylov_tridiagonal(*ops, v, 5 if n % 5 else 3)


def test_krylov_gradcheck(gen: torch.Generator) -> None:
    # operators of norm < ~1.5: A^15 stays moderate, so finite differences are accurate
    ops = [(0.5 * torch.randn(k, dtype=F64, generator=gen)).requires_grad_() for k in (15, 16, 15)]
    v = torch.randn(2, 16, dtype=F64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: krylov_tridiagonal(*a, 4), (*ops, v))


@pytest.mark.parametrize("method", ["dense", "lowrank_r2", "circulant", "toeplitz_r2", "ldr_td_r1"])
def test_any_size_where_no_power_of_two_is_needed(method: str, gen: torch.Generator) -> None:
    for n, batch in ((12, 5), (7, 5), (12, 40)):  # batch > n: LDR-TD materialises W
        layer = _layer(method, n, gen)
        x = torch.randn(batch, n, dtype=F64, generator=gen)
        _assert_close(layer(x), x @ layer.matrix().T)
        assert layer.hidden_params == param_formula(method, n)


def test_fixed_permutation_is_bit_reversal() -> None:
    layer = make_layer("bp_real", 16).double()
    with torch.no_grad():
        layer.butterflies[0].twiddle.copy_(torch.eye(2, dtype=F64).expand(1, 15, 2, 2))
    assert torch.equal(layer.matrix(), torch.eye(16, dtype=F64)[bit_reversal(16)])


@pytest.mark.parametrize(
    "method", ["bp_real", "bpbp_real", "monarch", "monarch_sqrt", "butterfly_untied"]
)
def test_orthogonal_at_init(method: str, gen: torch.Generator) -> None:
    m = make_layer(method, 64, gen).matrix().detach().double()
    torch.testing.assert_close(m @ m.T, torch.eye(64, dtype=F64), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "method", ["lowrank_r1", "lowrank_r4", "circulant", "fastfood", "toeplitz_r1", "ldr_td_r1"]
)
def test_init_scale_is_unitary_like(method: str, gen: torch.Generator) -> None:
    """E ||W||_F^2 = n by construction; one draw at n = 1024 lands within a factor of 4."""
    with torch.no_grad():
        energy = float(make_layer(method, 1024, gen).matrix().double().norm() ** 2) / 1024
    assert 0.25 < energy < 4.0


@pytest.mark.parametrize("n", [8, 16, 64])
def test_butterfly_from_matrix_reproduces_a_butterfly(n: int, gen: torch.Generator) -> None:
    m = n.bit_length() - 1
    tw = torch.randn(1, m, n // 2, 2, 2, dtype=F64, generator=gen)
    w = butterfly_multiply_reference(tw, torch.eye(n, dtype=F64)).T
    if n <= 16:  # the explicit factor product, an independent route to the same matrix
        _assert_close(butterfly_dense(tw), w, rtol=1e-12)
    layer = ButterflyUntied.from_matrix(w)
    assert layer.butterfly.twiddle.dtype == F64
    layer.requires_grad_(False)
    assert relative_error(layer.matrix(), w) < 1e-10
    x = torch.randn(3, n, dtype=F64, generator=gen)
    assert relative_error(layer(x), x @ w.T) < 1e-10
    if n <= 16:
        _assert_close(layer.matrix(), butterfly_dense(layer.butterfly.twiddle), rtol=1e-10)


def test_bad_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*bpbp_complex"):
        make_layer("nope", 64)
    with pytest.raises(ValueError, match="nope"):
        param_formula("nope", 64)
    for method in ("bpbp_complex", "bp_real_learned", "fastfood", "monarch", "butterfly_untied"):
        with pytest.raises(ValueError, match="1000"):
            make_layer(method, 1000)
        with pytest.raises(ValueError, match="1000"):
            param_formula(method, 1000)
    for n in (0, 1, True, 8.0):
        with pytest.raises(ValueError):
            make_layer("dense", n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch, 8"):
        make_layer("circulant", 8)(torch.randn(3, 9))


@pytest.mark.parametrize(
    "method", ["bp_real", "bpbp_complex", "bp_real_learned", "bpbp_complex_learned"]
)
def test_bp_training_path_matches_the_materialised_path(method: str) -> None:
    """The factored training path (compiled butterflies and, for a learned P, the compiled
    relaxed chain with its own backward) gives the values and gradients of the materialised
    B_k P_k + GEMM path (torch ops), with P a real mixture, at a batch of several row tiles."""
    n, gen = 64, torch.Generator().manual_seed(5)
    layer = make_layer(method, n, gen).double()
    with torch.no_grad():
        for perm in getattr(layer, "perms", []):
            perm.logits.copy_(torch.randn(perm.logits.shape, generator=gen))
    x = torch.randn(37, n, dtype=torch.float64, generator=gen)
    g = torch.randn(37, n, dtype=torch.float64, generator=gen)
    (layer.materialised(x) * g).sum().backward()
    want = {k: p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    y = layer(x)
    (y * g).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(y, layer.materialised(x))
    for k, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, want[k], msg=k)


def test_ldr_td_inference_uses_a_cached_matrix_that_follows_updates() -> None:
    layer = make_layer("ldr_td_r1", 32, torch.Generator().manual_seed(2)).double()
    x = torch.randn(3, 32, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.matrix().T)
        next(layer.parameters()).add_(0.1)  # bumps the version: the cache must be rebuilt
        torch.testing.assert_close(layer(x), x @ layer.matrix().T)


@pytest.mark.parametrize("method", ["bp_real", "bp_complex", "bpbp_real", "bpbp_complex"])
def test_fixed_permutation_layers_train_through_the_compiled_butterfly(method: str) -> None:
    """float32 at a training-size batch (the compiled CPU kernels when a compiler is there):
    forward and every gradient match the dense product with the layer's own matrix."""
    n, gen = 256, torch.Generator().manual_seed(11)
    layer = make_layer(method, n, gen)
    x = torch.randn(96, n, generator=gen, requires_grad=True)
    g = torch.randn(96, n, generator=gen)
    y = layer(x)
    expected = x @ layer.matrix().T
    _assert_close(y, expected, rtol=1e-5)
    inputs = [*layer.parameters(), x]
    fast = torch.autograd.grad((y * g).sum(), inputs)
    dense = torch.autograd.grad((expected * g).sum(), inputs)
    for a, b in zip(fast, dense, strict=True):
        _assert_close(a, b, rtol=1e-4)
