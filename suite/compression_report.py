"""Compression report from reports/compression.csv alone: figure, markdown, headline metrics.

The claim under test (abstract): the best butterfly layer beats the unconstrained layer by
3.9 points with 40X fewer parameters (the paper's compression factor) and 4X faster inference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from suite import paper  # noqa: E402
from suite.report import _require, _save_figure  # noqa: E402

FAMILIES = (
    ("dense", "unconstrained"),
    ("lowrank", "low-rank"),
    ("circulant", "circulant"),
    ("fastfood", "Fastfood"),
    ("toeplitz", "Toeplitz-like"),
    ("ldr", "LDR-TD"),
    ("learned", "butterfly, learned P"),
    ("bp", "butterfly, bit-reversal P"),
    ("monarch", "Monarch"),
    ("to_", "dense -> projected -> fine-tuned"),
)
PAPER_GAP = paper.abstract_claim("accuracy_gain_points").value
PAPER_PARAM_RATIO = paper.abstract_claim("parameter_reduction").value
PAPER_SPEEDUP = paper.abstract_claim("inference_speedup").value


def family(method: str) -> str:
    """The plotting family of a method name (first matching rule of FAMILIES)."""
    if "_to_" in method:
        return FAMILIES[-1][1]
    for key, label in FAMILIES:
        if method.startswith(key) or (key == "learned" and method.endswith("_learned")):
            return label
    return method


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: mean and std over seeds of accuracy and latency, in table order."""
    _require(df, ["method", "seed", "test_accuracy", "hidden_params"], "compression table")
    order = list(dict.fromkeys(df.method))
    agg = df.groupby("method", sort=False).agg(
        seeds=("seed", "count"),
        hidden_params=("hidden_params", "first"),
        total_params=("total_params", "first"),
        compression_factor=("compression_factor", "first"),
        test_mean=("test_accuracy", "mean"),
        test_std=("test_accuracy", "std"),
        val_mean=("val_accuracy", "mean"),
        epochs=("epochs", "mean"),
        capped=("budget_capped", "any"),
        seconds=("seconds", "mean"),
        hidden_b1_ms=("latency_hidden_b1_ms", "median"),
        hidden_b256_ms=("latency_hidden_b256_ms", "median"),
        net_b1_ms=("latency_net_b1_ms", "median"),
        net_b256_ms=("latency_net_b256_ms", "median"),
    )
    return agg.loc[order].reset_index()


def _butterflies(s: pd.DataFrame) -> pd.DataFrame:
    return s[s.method.str.match(r"^bp(bp)?_(real|complex)")]


def headline(df: pd.DataFrame) -> dict[str, Any]:
    """The abstract's three numbers as measured: gap, parameter ratio, inference speed-up."""
    s = summary(df)
    dense, bfly = s[s.method == "dense"], _butterflies(s)
    if dense.empty or bfly.empty:
        return {"claim": "needs the dense and at least one butterfly method"}
    d, b = dense.iloc[0], bfly.loc[bfly.test_mean.idxmax()]
    return {
        "best_butterfly": b.method,
        "best_butterfly_test_accuracy": round(float(b.test_mean), 2),
        "dense_test_accuracy": round(float(d.test_mean), 2),
        "gap_points": round(float(b.test_mean - d.test_mean), 2),
        "paper_gap_points": PAPER_GAP,
        "param_ratio": round(float(b.compression_factor / d.compression_factor), 1),
        "paper_param_ratio": PAPER_PARAM_RATIO,
        "hidden_speedup_b1": round(float(d.hidden_b1_ms / b.hidden_b1_ms), 2),
        "hidden_speedup_b256": round(float(d.hidden_b256_ms / b.hidden_b256_ms), 2),
        "paper_speedup": PAPER_SPEEDUP,
        "seeds": int(b.seeds),
    }


def figure(df: pd.DataFrame, path: Path) -> None:
    """Test accuracy against hidden-layer parameters (paper's points overlaid) and latency."""
    s = summary(df)
    s["family"] = s.method.map(family)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2), sharey=True)
    palette = dict(
        zip([f[1] for f in FAMILIES], sns.color_palette("tab10", len(FAMILIES)), strict=True)
    )
    for ax, xcol, xlabel in (
        (axes[0], "hidden_params", "hidden-layer parameters (log scale)"),
        (axes[1], "hidden_b1_ms", "hidden-layer inference latency, batch 1, ms (log scale)"),
    ):
        for fam, g in s.groupby("family", sort=False):
            ax.errorbar(
                g[xcol],
                g.test_mean,
                yerr=g.test_std.fillna(0),
                fmt="o",
                ms=7,
                color=palette.get(fam),
                label=fam,
                capsize=3,
            )
            for _, r in g.iterrows():
                ax.annotate(
                    r.method,
                    (r[xcol], r.test_mean),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
    for row in paper.COMPRESSION.values():
        p_hidden = paper.hidden_params_from_cf(row.compression_factor)
        axes[0].scatter(
            p_hidden,
            row.accuracy,
            marker="*",
            s=170,
            facecolor="none",
            edgecolor="black",
            linewidth=1.2,
            zorder=5,
        )
        axes[0].annotate(
            f"paper: {row.label}",
            (p_hidden, row.accuracy),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
            color="dimgray",
        )
    axes[0].scatter(
        [],
        [],
        marker="*",
        s=170,
        facecolor="none",
        edgecolor="black",
        label="paper (P from its CF)",
    )
    axes[0].set_ylabel("CIFAR-10 test accuracy, % (best-validation checkpoint)")
    axes[0].set_title("Accuracy against parameters")
    axes[1].set_title(f"Accuracy against latency ({_threads(df)})")
    axes[0].legend(fontsize=8, loc="lower right")
    src = str(df.data_source.iloc[0]) if "data_source" in df else "?"
    seeds = int(df.groupby("method").seed.count().max())
    fig.suptitle(
        f"Single hidden layer (1024 x 1024) on CIFAR-10 [{src}], {seeds} seed(s) per method, "
        f"profile {df.profile.iloc[0] if 'profile' in df else '?'}",
        fontsize=11,
    )
    fig.tight_layout()
    _save_figure(fig, path)


def _threads(df: pd.DataFrame) -> str:
    t = df.latency_threads.iloc[0] if "latency_threads" in df else "?"
    dev = df.device.iloc[0] if "device" in df else "?"
    return f"{dev}, {t} thread(s)"


def _fmt(x: float, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(df: pd.DataFrame) -> str:
    """The measured table beside the paper's, then the headline claim with its verdict."""
    s = summary(df)
    dense_ms = s.loc[s.method == "dense", "hidden_b1_ms"]
    dense_ms = float(dense_ms.iloc[0]) if len(dense_ms) else math.nan
    lines = [
        "| method | hidden params | CF | test % (mean ± sd) | seeds | paper test % | paper CF "
        "| hidden ms b=1 | hidden ms b=256 | net ms b=1 | speed-up vs dense b=1 | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, r in s.iterrows():
        pr = paper.compression_row_for(r.method)
        sd = "" if math.isnan(r.test_std) else f" ± {r.test_std:.2f}"
        cap = "*" if r.capped else ""
        lines.append(
            f"| {r.method} | {int(r.hidden_params):,} | {r.compression_factor:.1f} "
            f"| {r.test_mean:.2f}{sd} | {int(r.seeds)} "
            f"| {_fmt(pr.accuracy if pr else math.nan, '.2f')} "
            f"| {_fmt(pr.compression_factor if pr else math.nan, '.1f')} "
            f"| {r.hidden_b1_ms:.3f} | {r.hidden_b256_ms:.2f} | {r.net_b1_ms:.3f} "
            f"| {_fmt(dense_ms / r.hidden_b1_ms, '.2f')} | {r.epochs:.0f}{cap} |"
        )
    h = headline(df)
    lines += [
        "",
        "Epochs marked * stopped at the profile's wall-clock cap (`max_seconds`), not by early "
        "stopping.",
        f"Latency: {_threads(df)}; data: {df.data_source.iloc[0]} "
        f"(sha256 {str(df.data_sha256.iloc[0])[:12]}).",
        "",
    ]
    if "gap_points" in h:
        lines.append(
            f"Claim (abstract): the best butterfly beats unconstrained by {PAPER_GAP} points with "
            f"{PAPER_PARAM_RATIO:.0f}X fewer parameters and {PAPER_SPEEDUP:.0f}X faster inference. "
            f"Measured: best butterfly {h['best_butterfly']} {h['best_butterfly_test_accuracy']}% "
            f"vs dense {h['dense_test_accuracy']}%: gap {h['gap_points']:+.2f} points, "
            f"{h['param_ratio']}X fewer parameters (CF ratio), hidden-layer inference "
            f"{h['hidden_speedup_b1']}X (batch 1) / {h['hidden_speedup_b256']}X (batch 256) "
            f"the speed of dense. Verdict on the gap: {verdict(h['gap_points'], PAPER_GAP)}."
        )
    return "\n".join(lines) + "\n"


def verdict(measured: float, published: float, tolerance: float = 1.0) -> str:
    """reproduced (within tolerance points), exceeded, or not reproduced."""
    if measured > published + tolerance:
        return "exceeded"
    if measured >= published - tolerance:
        return "reproduced"
    return "not reproduced"
