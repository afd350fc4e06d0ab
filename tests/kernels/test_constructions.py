"""Exact butterfly constructions against numpy/scipy, tasks/targets.py and the reference oracle."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from kernels import load_factors, save_factors
from kernels.constructions import (
    NAMES,
    HardPermutation,
    absorb_input_kron_diagonal,
    absorb_output_diagonal,
    dft_twiddle,
    exact_permutations,
    exact_stack,
    kron_diagonal,
    paper_filter,
)
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_dense, butterfly_multiply_reference
from tasks import targets

SIZES = [4, 8, 64, 1024]
TOL = dict(rtol=0.0, atol=1e-10)

# y = f(x) for x (batch, n) as numpy, each the transform exactly as tasks/targets.py scales it
NUMPY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "dft": lambda x: np.fft.fft(x, norm="ortho"),
    "idft": lambda x: np.fft.ifft(x, norm="ortho"),
    "hadamard": lambda x: x @ scipy.linalg.hadamard(x.shape[-1]).T / math.sqrt(x.shape[-1]),
    "dct": lambda x: scipy.fft.dct(x, type=2) / math.sqrt(x.shape[-1]),
    "dst": lambda x: scipy.fft.dst(x, type=2) / math.sqrt(x.shape[-1]),
}


def _target(name: str, n: int) -> torch.Tensor:
    """The matrix of tasks/targets.py (idft: the conjugate of its unitary dft)."""
    if name == "idft":
        return targets.target_matrix("dft", n).conj()
    return targets.target_matrix(name, n)


def _check_stack(stack: torch.nn.Module, f: Callable[[np.ndarray], np.ndarray], gen) -> None:
    """stack.matrix() and stack(x) on fresh random x both equal the numpy transform f."""
    n = stack.n
    expected_matrix = torch.from_numpy(f(np.eye(n)).T.copy())
    torch.testing.assert_close(stack.matrix(), expected_matrix, **TOL)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(stack(x), torch.from_numpy(f(x.numpy())), **TOL)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(NUMPY))
def test_exact_stack_is_the_numpy_transform(name: str, n: int, gen: torch.Generator) -> None:
    stack = exact_stack(name, n)
    assert stack.butterflies[0].twiddle.dtype == torch.float64
    _check_stack(stack, NUMPY[name], gen)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("normalized", [True, False])
def test_convolution_with_a_random_filter(n: int, normalized: bool, gen: torch.Generator) -> None:
    c = torch.randn(n, dtype=torch.float64, generator=gen).numpy()
    scale = 1 / math.sqrt(n) if normalized else 1.0
    stack = exact_stack("convolution", n, c=c, normalized=normalized)
    torch.testing.assert_close(
        stack.matrix(), torch.from_numpy(scipy.linalg.circulant(c) * scale), **TOL
    )
    _check_stack(stack, lambda x: np.fft.ifft(np.fft.fft(c) * np.fft.fft(x)).real * scale, gen)


def test_convolution_with_a_complex_filter_is_complex(gen: torch.Generator) -> None:
    n = 16
    c = torch.randn(n, dtype=torch.complex128, generator=gen)
    stack = exact_stack("convolution", n, c=c, normalized=False)
    assert not stack.real_output
    expected = torch.from_numpy(scipy.linalg.circulant(c.numpy()))
    torch.testing.assert_close(stack.matrix(), expected, **TOL)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["dft", "idft", "hadamard", "dct", "dst", "convolution"])
def test_exact_stack_is_the_target(name: str, n: int, gen: torch.Generator) -> None:
    """Against tasks/targets.py (convolution: its seeded filter), matrix and forward."""
    stack = exact_stack(name, n)
    target = _target(name, n)
    matrix = stack.matrix().detach()
    assert matrix.dtype == target.dtype
    torch.testing.assert_close(matrix, target, **TOL)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(stack(x), x.to(target.dtype) @ target.T, **TOL)
    assert targets.rmse(matrix, target) < 1e-13


def test_paper_filter_is_the_targets_filter() -> None:
    n = 32
    expected = torch.from_numpy(targets.convolution(n)[:, 0] * math.sqrt(n))
    torch.testing.assert_close(paper_filter(n), expected, rtol=0.0, atol=1e-14)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("normalized", [False, True])
def test_dft_twiddle_with_bit_reversal_is_the_fft(
    n: int, inverse: bool, normalized: bool, gen: torch.Generator
) -> None:
    """Through the oracle: B (x[bitrev]) = np.fft.fft / ifft of x (norm ortho or backward)."""
    tw = dft_twiddle(n, inverse=inverse, normalized=normalized)
    assert tw.shape == (1, n - 1, 2, 2) and tw.dtype == torch.complex128
    x = torch.randn(4, n, dtype=torch.complex128, generator=gen)
    y = butterfly_multiply_reference(tw, x[:, bit_reversal(n)])
    fft = np.fft.ifft if inverse else np.fft.fft
    expected = fft(x.numpy(), norm="ortho" if normalized else "backward")
    torch.testing.assert_close(y, torch.from_numpy(expected), **TOL)


@pytest.mark.parametrize("n", [4, 32])
def test_absorbed_diagonals_are_diagonal_factors(n: int, gen: torch.Generator) -> None:
    """diag(d) B and B diag(kron(c)) against the oracle's dense product of factors."""
    m = n.bit_length() - 1
    tw = torch.randn(1, n - 1, 2, 2, dtype=torch.complex128, generator=gen)
    d = torch.randn(n, dtype=torch.complex128, generator=gen)
    c = torch.randn(m, dtype=torch.complex128, generator=gen)
    dense = butterfly_dense(tw)
    torch.testing.assert_close(
        butterfly_dense(absorb_output_diagonal(tw, d)), torch.diag(d) @ dense, **TOL
    )
    kron = torch.ones(1, dtype=torch.complex128)
    for b in range(m - 1, -1, -1):  # diag(1, c_{m-1}) (x) ... (x) diag(1, c_0)
        kron = torch.kron(kron, torch.stack([torch.ones((), dtype=c.dtype), c[b]]))
    torch.testing.assert_close(kron_diagonal(c), kron, **TOL)
    torch.testing.assert_close(
        butterfly_dense(absorb_input_kron_diagonal(tw, c)), dense @ torch.diag(kron), **TOL
    )


def test_diagonals_of_the_wrong_size_are_errors() -> None:
    tw = dft_twiddle(8)
    with pytest.raises(ValueError, match=r"output diagonal must have shape \(8,\)"):
        absorb_output_diagonal(tw, torch.ones(4))
    with pytest.raises(ValueError, match=r"Kronecker factors must have shape \(3,\)"):
        absorb_input_kron_diagonal(tw, torch.ones(8))


EVENS_ODDS_REVERSED = {8: [0, 2, 4, 6, 7, 5, 3, 1]}


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("name", NAMES)
def test_permutations_are_hard_and_the_reported_ones(name: str, n: int) -> None:
    stack = exact_stack(name, n)
    reported = exact_permutations(name)
    perms = stack.permutations()
    assert len(perms) == len(reported)
    expected_on = {
        "hadamard": [(False,) * 3],
        "dft": [(True, False, False)],
        "idft": [(True, False, False)],
        "dct": [(True, False, True), (True, False, False)],
        "dst": [(True, False, True), (True, False, False)],
        "convolution": [(True, False, False)] * 2,
    }[name]
    assert [h.on for h in reported] == expected_on
    for perm, hard in zip(perms, reported, strict=True):
        assert bool(perm.hard) and not perm.logits.requires_grad
        assert perm.top_only == hard.top_only
        probs = perm.probs()
        assert set(probs.flatten().tolist()) <= {0.0, 1.0}
        assert probs.shape == (1, 3)
        assert [bool(p) for p in probs[0]] == list(hard.on)
        assert torch.equal(perm.indices(), hard.indices(n))
        x = torch.randn(2, n, dtype=torch.float64)
        assert torch.equal(perm(x), x[:, hard.indices(n)])  # hard: moved, never rounded
    indices = [h.indices(n) for h in reported]
    if name == "hadamard":
        assert torch.equal(indices[0], torch.arange(n))
    else:
        assert torch.equal(indices[-1], bit_reversal(n))
    if name in ("dct", "dst"):
        half = torch.arange(0, n, 2)
        assert torch.equal(indices[0], torch.cat([half, half.flip(0) + 1]))
        if n in EVENS_ODDS_REVERSED:
            assert indices[0].tolist() == EVENS_ODDS_REVERSED[n]


def test_the_permutations_matter(gen: torch.Generator) -> None:
    """A wrong hard P' (the identity) leaves the DCT far off: the checks above can fail."""
    n = 16
    stack = exact_stack("dct", n)
    with torch.no_grad():
        stack.extra_perm.logits.copy_(HardPermutation("P'", (False,) * 3, True).logits())
    assert targets.rmse(stack.matrix().detach(), targets.target_matrix("dct", n)) > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_exact_stack_is_a_stationary_point_of_the_fit(name: str) -> None:
    """The recovery loss (mean |M - T|^2) is ~0 with a ~0 gradient in every twiddle."""
    n = 16
    stack = exact_stack(name, n)
    target = _target(name, n)
    diff = stack.matrix() - target
    loss = (diff.abs() ** 2).mean()
    grads = torch.autograd.grad(loss, [b.twiddle for b in stack.butterflies])
    assert float(loss.detach()) < 1e-28
    assert max(float(g.abs().max()) for g in grads) < 1e-13


def test_forward_gradient_is_the_transpose(gen: torch.Generator) -> None:
    """d<r, M x>/dx = M^T r through the stack's forward (DST: both permutations and a real part)."""
    n = 32
    stack = exact_stack("dst", n)
    x = torch.randn(2, n, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(2, n, dtype=torch.float64, generator=gen)
    (gx,) = torch.autograd.grad((stack(x) * r).sum(), x)
    torch.testing.assert_close(gx, r @ targets.target_matrix("dst", n), **TOL)


def test_save_and_load_keep_the_hard_permutations(tmp_path: Path) -> None:
    stack = exact_stack("convolution", 16)
    save_factors(stack, tmp_path / "f.pt")
    loaded = load_factors(tmp_path / "f.pt")
    assert all(bool(p.hard) for p in loaded.permutations())
    # load_factors rebuilds the module in float32, so the float64 twiddles come back rounded
    assert loaded.butterflies[0].twiddle.dtype == torch.float32
    torch.testing.assert_close(
        loaded.matrix().double(), stack.matrix().detach(), rtol=0.0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("fft", 8), {}, "unknown construction 'fft'"),
        (("dft", 6), {}, "power of two, got 6"),
        (("dft", 2), {}, "n >= 4"),
        (("dct", 8), {"c": np.ones(8)}, "convolution' only"),
        (("convolution", 8), {"c": np.ones(4)}, r"shape \(8,\)"),
    ],
)
def test_bad_input_is_a_clear_error(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        exact_stack(*args, **kwargs)
