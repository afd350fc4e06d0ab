"""The published numbers in suite.paper match docs/protocol.md."""

from __future__ import annotations

import dataclasses

import pytest

from suite import paper


def test_recovery_grid_and_protocol() -> None:
    assert paper.TARGETS == (
        "dft",
        "dct",
        "dst",
        "convolution",
        "hadamard",
        "hartley",
        "legendre",
        "randn",
    )
    assert paper.SIZES == (8, 16, 32, 64, 128, 256, 512, 1024)
    assert [paper.TRIALS_PER_N[n] for n in paper.SIZES] == [20, 20, 40, 60, 80, 160, 160, 320]
    assert paper.RMSE_THRESHOLD == 1e-4 and paper.MSE_THRESHOLD == 1e-8
    assert paper.RMSE_THRESHOLD**2 == pytest.approx(paper.MSE_THRESHOLD)


@pytest.mark.parametrize(
    ("target", "model"),
    [
        ("dft", "bp"),
        ("hadamard", "bp"),
        ("hartley", "bp"),
        ("legendre", "bp"),
        ("randn", "bp"),
        ("dct", "bpp"),
        ("dst", "bpp"),
        ("convolution", "bpbp"),
    ],
)
def test_models(target: str, model: str) -> None:
    assert paper.paper_model(target) == model


def test_paper_recovered() -> None:
    assert paper.paper_recovered("convolution", 1024) is False
    assert paper.paper_recovered("convolution", 512) is True
    assert paper.paper_recovered("legendre", 8) is False
    assert paper.paper_recovered("randn", 64) is False
    for t in ("dft", "dct", "dst", "hadamard", "hartley"):
        assert all(paper.paper_recovered(t, n) is True for n in paper.SIZES)
    assert paper.paper_recovered("dft", 2048) is None
    assert paper.paper_recovered("my_matrix", 64) is None


def test_rmse_ranges() -> None:
    assert paper.paper_rmse_range("dft") == (9e-7, 8e-5)
    assert paper.paper_rmse_range("legendre") == (1.6e-3, 3.4e-2)
    assert paper.paper_rmse_range("randn") == (3e-2, 1.6e-1)
    assert paper.paper_rmse_range("convolution") is None
    assert paper.paper_rmse("convolution", 1024) == 1.9e-2
    assert paper.paper_rmse_range("dft", method="lowrank") == (1e-2, 1.0)
    assert paper.paper_rmse_range("nope") is None


def test_headline_is_consistent_with_cells() -> None:
    assert paper.paper_recovered_count() == (47, 48)
    assert paper.HEADLINE_RECOVERED.value == 47 and paper.HEADLINE_CELLS == 48


def test_compression_table() -> None:
    un, bp = paper.compression_row("unconstrained"), paper.compression_row("bpbp_complex")
    assert un is not None and bp is not None
    assert (un.accuracy, bp.accuracy, bp.compression_factor) == (46.03, 49.93, 39.4)
    gain = paper.abstract_claim("accuracy_gain_points").value
    assert bp.accuracy - un.accuracy == pytest.approx(gain, abs=0.005)
    assert {m for m, r in paper.COMPRESSION.items() if r.unverified} == {
        "fastfood",
        "circulant",
        "lowrank",
    }
    n = paper.COMPRESSION_N
    assert paper.compression_factor(n) == pytest.approx(93.0, abs=0.05)  # circulant
    assert paper.compression_factor(3 * n) == pytest.approx(78.7, abs=0.05)  # Fastfood
    assert paper.compression_factor(8 * n) == pytest.approx(56.9, abs=0.05)  # r = 4
    assert paper.compression_factor(16 * n) == pytest.approx(39.4, abs=0.05)  # BPBP complex
    assert paper.compression_row("nope") is None


def test_speed_and_claims() -> None:
    assert paper.paper_speedup("bp", 1024) == 4.40
    assert paper.paper_speedup("fft", 8192) == 461
    assert paper.paper_speedup("dct", 64) == 0.44
    assert paper.paper_speedup("bp", 32) is None
    assert paper.paper_gpu_speedup(1024) == 1.2 and paper.paper_gpu_speedup(4096) == 4.6
    assert paper.abstract_claim("inference_speedup").value == 4.0
    assert paper.abstract_claim("parameter_reduction").value == 40.0
    with pytest.raises(KeyError, match="allowed"):
        paper.abstract_claim("nope")


def test_data_is_frozen_and_sourced() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.RECOVERY["dft"].model = "bpbp"  # type: ignore[misc]
    with pytest.raises(TypeError):
        paper.RECOVERY["dft"] = paper.RECOVERY["randn"]  # type: ignore[index]
    rows = [
        *paper.RECOVERY.values(),
        *paper.COMPRESSION.values(),
        *paper.ABSTRACT_CLAIMS.values(),
        *paper.GPU_SPEEDUP.values(),
    ]
    assert all(r.source for r in rows)
