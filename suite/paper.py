"""The published numbers of Dao et al. 2019 (docs/protocol.md), as data: the one place they live.

Every number carries a `source` note; numbers that docs/protocol.md marks unverified (they come
from third-party transcriptions of the paper's tables) carry `unverified=True`. Accessors
return None for cells the paper did not publish, so callers can say "not in paper".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tasks.recovery.params import RECOVERED_RMSE

ABSTRACT = "paper abstract (arXiv 1903.05895)"
RESULT_FILES = (
    "authors' result files, HazyResearch/butterfly learning_transforms (docs/protocol.md §2)"
)
PROTOCOL = "authors' code, HazyResearch/butterfly learning_transforms (docs/protocol.md §2)"
TRANSCRIPTION = "third-party transcription of the paper's compression table (docs/protocol.md §3)"
SPEED_FIGURE = "paper's speed figure (docs/protocol.md §4)"
LATER_WORK = "Le et al. ICASSP 2022 / Zheng et al. SIMODS 2023 (docs/protocol.md §5)"


@dataclass(frozen=True)
class Number:
    """One published scalar with its unit and where it comes from."""

    value: float
    unit: str
    text: str
    source: str
    unverified: bool = False


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


# --- 1. Abstract claims --------------------------------------------------------------------

ABSTRACT_CLAIMS: Mapping[str, Number] = _frozen(
    {
        "fft_recovery_max_n": Number(
            1024,
            "N",
            "recovers the Cooley-Tukey FFT to machine precision for N up to 1024",
            ABSTRACT,
        ),
        "accuracy_gain_points": Number(
            3.9,
            "accuracy points",
            "single-hidden-layer CIFAR-10: beats the unconstrained layer by 3.9 points",
            ABSTRACT,
        ),
        "inference_speedup": Number(
            4.0, "x", "4X faster inference than the unconstrained layer", ABSTRACT
        ),
        "parameter_reduction": Number(
            40.0, "x", "40X fewer parameters than the unconstrained layer", ABSTRACT
        ),
    }
)


def abstract_claim(key: str) -> Number:
    """One abstract claim by key (see ABSTRACT_CLAIMS); KeyError naming the allowed keys."""
    try:
        return ABSTRACT_CLAIMS[key]
    except KeyError:
        raise KeyError(f"unknown claim {key!r}; allowed: {sorted(ABSTRACT_CLAIMS)}") from None


# --- 2. Transform recovery (paper Section 4.1) ---------------------------------------------

TARGETS: tuple[str, ...] = (
    "dft",
    "dct",
    "dst",
    "convolution",
    "hadamard",
    "hartley",
    "legendre",
    "randn",
)
"""The 8 targets in the paper's (figure) order."""
STRUCTURED_TARGETS: tuple[str, ...] = TARGETS[:6]
"""The six rows with fast algorithms: the headline counts their cells."""
SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
TRIALS_PER_N: Mapping[int, int] = _frozen(
    dict(zip(SIZES, (20, 20, 40, 60, 80, 160, 160, 320), strict=True))
)
RMSE_THRESHOLD: float = RECOVERED_RMSE
"""The "machine precision" line: RMSE <= 1e-4, i.e. MSE <= 1e-8 (defined once, in tasks)."""
MSE_THRESHOLD: float = RECOVERED_RMSE**2
LEARNED_METHODS: tuple[str, ...] = ("bp", "bpp", "bpbp")
BASELINE_METHODS: tuple[str, ...] = ("sparse", "lowrank", "sparse_lowrank")
BASELINE_RMSE_RANGE: tuple[float, float] = (1e-2, 1.0)
"""Sparse, low-rank and sparse+low-rank (budget 2 N log2 N) all sit between 1e-2 and 1."""

_STRUCTURED_RANGE = (9e-7, 8e-5)


@dataclass(frozen=True)
class RecoveryTarget:
    """The paper's model and published outcome for one target, per N in SIZES."""

    name: str
    model: str
    recovered: tuple[int, ...]
    """The N at which the paper reached RMSE <= 1e-4; the other SIZES were not recovered."""
    rmse_range: tuple[float, float] | None
    """Published (min, max) RMSE over all N; None where not published as a range."""
    rmse_at: Mapping[int, float] = field(default_factory=lambda: _frozen({}))
    """Published single-cell RMSE values."""
    source: str = RESULT_FILES
    unverified: bool = False


RECOVERY: Mapping[str, RecoveryTarget] = _frozen(
    {
        "dft": RecoveryTarget("dft", "bp", SIZES, _STRUCTURED_RANGE),
        "dct": RecoveryTarget("dct", "bpp", SIZES, _STRUCTURED_RANGE),
        "dst": RecoveryTarget("dst", "bpp", SIZES, _STRUCTURED_RANGE),
        "convolution": RecoveryTarget(
            "convolution", "bpbp", SIZES[:-1], None, _frozen({1024: 1.9e-2})
        ),
        "hadamard": RecoveryTarget("hadamard", "bp", SIZES, _STRUCTURED_RANGE),
        "hartley": RecoveryTarget("hartley", "bp", SIZES, _STRUCTURED_RANGE),
        "legendre": RecoveryTarget("legendre", "bp", (), (1.6e-3, 3.4e-2)),
        "randn": RecoveryTarget("randn", "bp", (), (3e-2, 1.6e-1)),
    }
)
"""Note: the (9e-7, 8e-5) range is published for dft, dct, dst, hadamard and hartley jointly."""

HEADLINE_RECOVERED = Number(
    47, "cells", "the paper recovers 47 of the 48 cells of the six structured rows", RESULT_FILES
)
HEADLINE_CELLS: int = 48


def paper_model(target: str) -> str | None:
    """The model the paper used for a target (bp, bpp, bpbp); None if not a paper target."""
    t = RECOVERY.get(target)
    return t.model if t else None


def paper_recovered(target: str, n: int) -> bool | None:
    """Did the paper recover `target` at size n (RMSE <= 1e-4)? None if not published."""
    t = RECOVERY.get(target)
    if t is None or n not in SIZES:
        return None
    return n in t.recovered


def paper_rmse_range(target: str, method: str | None = None) -> tuple[float, float] | None:
    """Published (min, max) RMSE of the learned model over N, or of a baseline `method`.

    None where the paper gives no range (convolution: < 1e-4 up to 512, see `paper_rmse`).
    """
    if target not in RECOVERY:
        return None
    if method is not None and method in BASELINE_METHODS:
        return BASELINE_RMSE_RANGE
    return RECOVERY[target].rmse_range


def paper_rmse(target: str, n: int) -> float | None:
    """A published single-cell RMSE (e.g. convolution at 1024: 1.9e-2); None otherwise."""
    t = RECOVERY.get(target)
    return t.rmse_at.get(n) if t else None


def paper_recovered_count() -> tuple[int, int]:
    """(recovered, total) structured cells, derived from RECOVERY: (47, 48)."""
    total = len(STRUCTURED_TARGETS) * len(SIZES)
    hits = sum(len(RECOVERY[t].recovered) for t in STRUCTURED_TARGETS)
    return hits, total


# --- 3. Compression of a single hidden layer on CIFAR-10 (paper Section 4.2) ---------------

COMPRESSION_N: int = 1024
COMPRESSION_CLASSES: int = 10


@dataclass(frozen=True)
class CompressionRow:
    """One row of the paper's CIFAR-10 single-hidden-layer table."""

    method: str
    label: str
    accuracy: float
    """Test accuracy in percent."""
    compression_factor: float
    """N^2 / (P_hidden + 10 N + 10)."""
    hidden_params: str
    """The hidden layer's parameter count, as published (a formula in N, r)."""
    source: str = TRANSCRIPTION
    unverified: bool = False


COMPRESSION: Mapping[str, CompressionRow] = _frozen(
    {
        r.method: r
        for r in (
            CompressionRow("unconstrained", "unconstrained", 46.03, 1.0, "1,048,576"),
            CompressionRow("bpbp_complex", "BPBP complex, fixed permutation", 49.93, 39.4, "~16N"),
            CompressionRow("bpbp_real", "BPBP real, fixed permutation", 48.69, 56.9, "~8N"),
            CompressionRow("ldr_td", "LDR-TD", 45.33, 56.9, "2rN + 6N - 4"),
            CompressionRow("toeplitz_like", "Toeplitz-like", 41.78, 56.9, "2rN (r = 4)"),
            CompressionRow("fastfood", "Fastfood", 39.64, 78.7, "3N", unverified=True),
            CompressionRow("circulant", "circulant", 34.28, 93.0, "N", unverified=True),
            CompressionRow("lowrank", "low-rank", 32.28, 56.9, "2rN (r = 4)", unverified=True),
        )
    }
)


def compression_row(method: str) -> CompressionRow | None:
    """The published row for a compression method; None if the paper has none."""
    return COMPRESSION.get(method)


PAPER_METHOD: Mapping[str, str] = _frozen(
    {
        "dense": "unconstrained",
        "bpbp_complex": "bpbp_complex",
        "bpbp_real": "bpbp_real",
        "ldr_td_r1": "ldr_td",
        "toeplitz_r4": "toeplitz_like",
        "fastfood": "fastfood",
        "circulant": "circulant",
        "lowrank_r4": "lowrank",
    }
)
"""Our method names (kernels.structured) -> the paper's row in COMPRESSION."""


def compression_row_for(method: str) -> CompressionRow | None:
    """The paper's row for one of our method names, or None if the paper has none."""
    key = PAPER_METHOD.get(method)
    return COMPRESSION.get(key) if key else None


def hidden_params_from_cf(
    cf: float, n: int = COMPRESSION_N, classes: int = COMPRESSION_CLASSES
) -> float:
    """Invert CF = N^2 / (P + classes N + classes) to P (the paper reports CF, not P)."""
    return n * n / cf - classes * n - classes


def compression_factor(
    hidden_params: int, n: int = COMPRESSION_N, classes: int = COMPRESSION_CLASSES
) -> float:
    """The paper's CF = N^2 / (P_hidden + classes * N + classes)."""
    return n * n / (hidden_params + classes * n + classes)


# --- 4. Speed (paper's speed figure) -------------------------------------------------------

SPEED_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
SPEED_SETUP = "batch 1, float32, one CPU thread; speed-up over a dense numpy matrix-vector"
SPEEDUP: Mapping[str, Mapping[int, float]] = _frozen(
    {
        m: _frozen(dict(zip(SPEED_SIZES, v, strict=True)))
        for m, v in {
            "fft": (0.67, 0.96, 3.15, 9.36, 22.1, 26.2, 215, 461),
            "dct": (0.44, 0.49, 1.59, 4.18, 10.7, 22.9, 131, 250),
            "bp": (0.19, 0.19, 0.57, 1.56, 4.40, 10.6, 65.8, 172),
        }.items()
    }
)
"""Speed-up over dense per method and N; source SPEED_FIGURE."""

GPU_SPEEDUP: Mapping[int, Number] = _frozen(
    {
        1024: Number(
            1.2,
            "x",
            "2019 GPU kernel vs nn.Linear, batch 256, forward+backward",
            PROTOCOL + "; GPU model not recorded",
        ),
        4096: Number(
            4.6,
            "x",
            "2019 GPU kernel vs nn.Linear, batch 256, forward+backward",
            PROTOCOL + "; GPU model not recorded",
        ),
    }
)


def paper_speedup(method: str, n: int) -> float | None:
    """Published CPU speed-up over dense for method (fft, dct, bp) at N; None if absent."""
    return SPEEDUP.get(method, {}).get(n)


def paper_gpu_speedup(n: int) -> float | None:
    """Published GPU speed-up of the 2019 kernel over nn.Linear at N; None if absent."""
    g = GPU_SPEEDUP.get(n)
    return g.value if g else None


# --- 5. Later methods (rows the suite adds) ------------------------------------------------

HIERARCHICAL_RELATIVE_ERROR = Number(
    1e-14,
    "relative error",
    "hierarchical butterfly factorization recovers DFT and Hadamard at N = 1024 to ~1e-14",
    LATER_WORK,
)
