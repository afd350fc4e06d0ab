"""tasks.targets: each target against an independent construction; user-matrix loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from suite import paper
from tasks.targets import TARGETS, check_matrix, load_matrix, rmse, target_matrix

SIZES = (8, 64)


def _t(name: str, n: int) -> np.ndarray:
    m = target_matrix(name, n)
    assert m.shape == (n, n)
    return m.numpy()


def _x(n: int, complex_: bool = False) -> np.ndarray:
    x = np.random.randn(n, 5)
    return x + 1j * np.random.randn(n, 5) if complex_ else x


def test_all_targets_known() -> None:
    """The registry holds exactly the paper's 8 targets (suite.paper is the published list)."""
    assert set(TARGETS) == set(paper.TARGETS)


@pytest.mark.parametrize("n", SIZES)
def test_dtypes(n: int) -> None:
    for name in TARGETS:
        want = torch.complex128 if name == "dft" else torch.float64
        assert target_matrix(name, n).dtype == want, name


@pytest.mark.parametrize("n", SIZES)
def test_dft(n: int) -> None:
    f = _t("dft", n)
    eye = torch.eye(n, dtype=torch.complex128)
    np.testing.assert_allclose(f, torch.fft.fft(eye, norm="ortho").numpy(), atol=1e-12)
    x = _x(n, complex_=True)  # F x is the (orthonormal) forward DFT of each column
    np.testing.assert_allclose(f @ x, np.fft.fft(x, axis=0, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(f @ f.conj().T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_dct(n: int) -> None:
    m = _t("dct", n)
    np.testing.assert_allclose(
        m, scipy.fft.dct(np.eye(n), type=2, axis=0) / math.sqrt(n), atol=1e-12
    )
    x = _x(n)
    np.testing.assert_allclose(m @ x, scipy.fft.dct(x, type=2, axis=0) / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_dst(n: int) -> None:
    m = _t("dst", n)
    np.testing.assert_allclose(
        m, scipy.fft.dst(np.eye(n), type=2, axis=0) / math.sqrt(n), atol=1e-12
    )
    x = _x(n)
    np.testing.assert_allclose(m @ x, scipy.fft.dst(x, type=2, axis=0) / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_convolution(n: int) -> None:
    c_mat = _t("convolution", n)
    c = np.random.RandomState(0).randn(n) / math.sqrt(n)
    np.testing.assert_allclose(c_mat[:, 0], c, atol=0)
    for k in range(n):  # circulant: every column is the first one rolled down by k
        np.testing.assert_array_equal(c_mat[:, k], np.roll(c, k))
    x = _x(n)
    circ = np.fft.ifft(np.fft.fft(c)[:, None] * np.fft.fft(x, axis=0), axis=0).real
    np.testing.assert_allclose(c_mat @ x, circ, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard(n: int) -> None:
    h = _t("hadamard", n)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), np.full((n, n), 1 / math.sqrt(n)), atol=1e-15)
    np.testing.assert_array_equal(np.sign(h[0]), np.ones(n))  # Sylvester: first row all +


@pytest.mark.parametrize("n", SIZES)
def test_hartley(n: int) -> None:
    h = _t("hartley", n)
    np.testing.assert_allclose(h, h.T, atol=1e-13)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)
    x = _x(n)  # the Hartley transform is Re(F x) - Im(F x) for real x, F the unitary DFT
    fx = np.fft.fft(x, axis=0, norm="ortho")
    np.testing.assert_allclose(h @ x, fx.real - fx.imag, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_legendre(n: int) -> None:
    m = _t("legendre", n)
    x = np.linspace(-1, 1, n + 2)[1:-1]
    s = math.sqrt(n)
    np.testing.assert_allclose(m[0], np.ones(n) / s, atol=1e-14)
    np.testing.assert_allclose(m[1], x / s, atol=1e-14)
    np.testing.assert_allclose(m[2], (3 * x**2 - 1) / 2 / s, atol=1e-14)
    # Bonnet's recursion (k+1) P_{k+1} = (2k+1) x P_k - k P_{k-1} holds for every row
    for k in range(1, n - 1):
        np.testing.assert_allclose(
            (k + 1) * m[k + 1], (2 * k + 1) * x * m[k] - k * m[k - 1], atol=1e-9
        )


@pytest.mark.parametrize("n", SIZES)
def test_randn(n: int) -> None:
    want = np.random.RandomState(0).randn(n, n) / math.sqrt(n)
    np.testing.assert_array_equal(_t("randn", n), want)


def test_target_matrix_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="'fourier'"):
        target_matrix("fourier", 8)


@pytest.mark.parametrize("n", [12, 0, -8])
def test_target_matrix_rejects_non_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match=rf"power of two.*{n}"):
        target_matrix("dft", n)


@pytest.mark.parametrize("complex_", [False, True])
def test_load_matrix_npy_round_trip(tmp_path, complex_: bool) -> None:
    a = np.random.randn(16, 16)
    if complex_:
        a = a + 1j * np.random.randn(16, 16)
    path = tmp_path / "m.npy"
    np.save(path, a)
    m = load_matrix(path)
    assert m.dtype == (torch.complex128 if complex_ else torch.float64)
    np.testing.assert_array_equal(m.numpy(), a)


def test_load_matrix_text_and_csv(tmp_path) -> None:
    a = np.random.randn(8, 8)
    np.savetxt(tmp_path / "m.txt", a, fmt="%.17g")
    np.savetxt(tmp_path / "m.csv", a, delimiter=",", fmt="%.17g")
    np.testing.assert_array_equal(load_matrix(tmp_path / "m.txt").numpy(), a)
    np.testing.assert_array_equal(load_matrix(str(tmp_path / "m.csv")).numpy(), a)


def test_check_matrix_casts_integers() -> None:
    a = np.random.randint(-5, 5, size=(4, 4))
    m = check_matrix(a, "ints")
    assert m.dtype == torch.float64
    np.testing.assert_array_equal(m.numpy(), a)


def _nan(n: int) -> np.ndarray:
    a = np.random.randn(n, n)
    a[np.random.randint(n), np.random.randint(n)] = np.nan
    return a


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.random.randn(8, 16), r"square.*\(8, 16\)"),
        (np.random.randn(8), "square"),
        (np.random.randn(12, 12), "power of two.*12"),
        (np.random.randn(2, 2), "power of two.*2"),
        (_nan(8), "NaN"),
        (np.full((8, 8), np.inf), "infinite"),
        (np.random.randn(8, 8) > 0, "numeric.*bool"),
        (np.random.randn(8, 8).astype(object), "numeric.*object"),
        (np.full((8, 8), "x"), "numeric"),
    ],
)
def test_check_matrix_errors(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        check_matrix(array, "SRC")
    assert str(info.value).startswith("SRC: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.random.randn(12, 12), "power of two.*12"),
        (np.random.randn(8, 16), "square"),
        (_nan(16), "NaN"),
        (np.random.randn(8, 8) > 0, "numeric.*bool"),
        (np.random.randn(8, 8).astype(object), "(?i)object"),
    ],
)
def test_load_matrix_npy_errors(tmp_path, array: np.ndarray, pattern: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError, match=pattern) as info:
        load_matrix(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_matrix_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="not found") as info:
        load_matrix(tmp_path / "nope.npy")
    assert "nope.npy" in str(info.value)


@pytest.mark.parametrize("suffix", [".npz", ".mat", ".json"])
def test_load_matrix_unsupported_suffix(tmp_path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    path.write_text("1 2\n3 4\n")
    with pytest.raises(ValueError, match=r"unsupported file type.*\.npy") as info:
        load_matrix(path)
    assert str(path) in str(info.value)


def test_load_matrix_unreadable_text(tmp_path) -> None:
    path = tmp_path / "m.txt"
    path.write_text("a b\nc d\n")
    with pytest.raises(ValueError, match="cannot read matrix") as info:
        load_matrix(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("complex_", [False, True])
def test_rmse_is_frobenius_over_n(complex_: bool) -> None:
    n = 16
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    if complex_:
        a = a + 1j * torch.randn(n, n, dtype=torch.float64)
        b = b + 1j * torch.randn(n, n, dtype=torch.float64)
    want = np.sqrt((np.abs(a.numpy() - b.numpy()) ** 2).sum()) / n
    assert rmse(a, b) == pytest.approx(want, rel=1e-12)
    assert rmse(b, b) == 0.0


def test_rmse_float32_approx_against_complex_target() -> None:
    f = target_matrix("dft", 8)
    approx = f.to(torch.complex64)
    assert 0 < rmse(approx, f) < 1e-7
    assert rmse(f.real.float(), f) == pytest.approx(float(torch.linalg.norm(f.imag)) / 8, rel=1e-6)
