"""Compression report from reports/compression.csv alone: figure, markdown, headline metrics.

The claim under test (abstract): the best butterfly layer beats the unconstrained layer by
3.9 points with 40X fewer parameters (the paper's compression factor) and 4X faster inference.

Honesty rules of the headline: it uses the best profile present (paper > quick > smoke) and
says which; the best butterfly is chosen on validation accuracy; the gap is the mean over
seeds of the paired (same seed) test-accuracy difference with a 95% t-interval; and the gap's
verdict is "provisional (...)" when a row it rests on hit a runaway cap, the dense baseline
stopped while still improving, fewer than two seeds pair up (no interval), the rows do not
record how training stopped, or the lr search chose dense's or the best butterfly's lr at an
edge of its grid (the search did not bracket that method's best lr).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from scipy import stats  # noqa: E402

from suite import paper  # noqa: E402
from suite.plotting import place_labels, require, save_figure  # noqa: E402

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
PROFILE_RANK = {"paper": 3, "quick": 2, "full": 2, "smoke": 1}  # full: quick compress
"""Which profile's rows a claim uses when several are present: the highest rank."""
CAPS = ("epoch_cap", "time_cap")


def family(method: str) -> str:
    """The plotting family of a method name (first matching rule of FAMILIES)."""
    if "_to_" in method:
        return FAMILIES[-1][1]
    for key, label in FAMILIES:
        if method.startswith(key) or (key == "learned" and method.endswith("_learned")):
            return label
    return method


def _with_protocol(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before the stopping protocol lack its columns: mark them unknown."""
    out = df.copy()
    if "stopped_by" not in out:
        out["stopped_by"] = "unknown"
    if "still_improving" not in out:
        out["still_improving"] = pd.NA
    if "lr_search" not in out:
        out["lr_search"] = ""
    out["stopped_by"] = out.stopped_by.fillna("unknown").astype(str)
    return out


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: mean and std over seeds of accuracy and latency, in table order."""
    require(df, ["method", "seed", "test_accuracy", "hidden_params"], "compression table")
    df = _with_protocol(df)
    order = list(dict.fromkeys(df.method))
    agg = df.groupby("method", sort=False).agg(
        seeds=("seed", "count"),
        hidden_params=("hidden_params", "first"),
        total_params=("total_params", "first"),
        compression_factor=("compression_factor", "first"),
        test_mean=("test_accuracy", "mean"),
        test_std=("test_accuracy", "std"),
        val_mean=("val_accuracy", "mean"),
        lr=("lr", "first"),
        lr_search=("lr_search", "first"),
        epochs=("epochs", "mean"),
        best_epoch=("best_epoch", "mean"),
        capped=("budget_capped", "any"),
        stops=("stopped_by", lambda x: ", ".join(sorted(set(x)))),
        improving=("still_improving", lambda x: bool(x.fillna(False).astype(bool).any())),
        seconds=("seconds", "mean"),
        hidden_b1_ms=("latency_hidden_b1_ms", "median"),
        hidden_b256_ms=("latency_hidden_b256_ms", "median"),
        net_b1_ms=("latency_net_b1_ms", "median"),
        net_b256_ms=("latency_net_b256_ms", "median"),
    )
    return agg.loc[order].reset_index()


BUTTERFLY = r"^bp(bp)?_(real|complex)"
"""The butterfly layers the claim chooses from (fixed or learned permutation)."""


def _butterflies(s: pd.DataFrame) -> pd.DataFrame:
    return s[s.method.str.match(BUTTERFLY)]


def best_profile(df: pd.DataFrame) -> str:
    """The highest-ranked profile whose rows hold dense and at least one butterfly."""
    ok = [
        str(p)
        for p, g in df.groupby("profile")
        if (g.method == "dense").any() and g.method.str.match(BUTTERFLY).any()
    ]
    return max(ok, key=lambda p: PROFILE_RANK.get(p, 0)) if ok else ""


def profile_rows(df: pd.DataFrame, profile: str | None = None) -> pd.DataFrame:
    """The rows of `profile` (default: best_profile, else the whole table)."""
    if "profile" not in df:
        return df
    profile = profile or best_profile(df)
    return df[df.profile == profile] if profile else df


def profiles(df: pd.DataFrame) -> list[str]:
    """The profiles in the table, best first."""
    if "profile" not in df:
        return [""]
    return sorted({str(p) for p in df.profile}, key=lambda p: -PROFILE_RANK.get(p, 0))


def paired_gap(bfly: pd.DataFrame, dense: pd.DataFrame) -> dict[str, Any]:
    """Mean over shared seeds of (butterfly - dense) test accuracy, its sd and 95% t-interval
    (None below two seeds)."""
    b = bfly.groupby("seed").test_accuracy.mean()
    d = dense.groupby("seed").test_accuracy.mean()
    diffs = [float(b[k] - d[k]) for k in sorted(set(b.index) & set(d.index))]
    if not diffs:
        return {"gap_points": float(b.mean() - d.mean()), "gap_seeds": 0}
    out: dict[str, Any] = {"gap_points": statistics.fmean(diffs), "gap_seeds": len(diffs)}
    out.update(gap_sd=None, gap_ci95_low=None, gap_ci95_high=None)
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
        out.update(gap_sd=sd, gap_ci95_low=out["gap_points"] - half,
                   gap_ci95_high=out["gap_points"] + half)  # fmt: skip
    return out


def lr_edge(lr: float, lr_search: object) -> str:
    """"lowest" / "highest" when `lr` is the smallest / largest of several searched candidates
    ("0.001:50.67 0.003:51.35 ..." as in the rows' lr_search), else ""."""
    if not isinstance(lr_search, str) or " " not in lr_search.strip():
        return ""
    grid = [float(x.split(":")[0]) for x in lr_search.split()]
    if math.isclose(lr, min(grid)):
        return "lowest"
    return "highest" if math.isclose(lr, max(grid)) else ""


def _lr_reasons(s: pd.DataFrame, best: str) -> list[str]:
    """The claim's methods (dense, best butterfly) whose chosen lr sits at an edge of its grid."""
    out = []
    for method in ("dense", best):
        r = s[s.method == method].iloc[0]
        edge = lr_edge(float(r.lr), r.lr_search)
        if edge:
            out.append(f"{method}'s lr {r.lr:g} is the {edge} of its search grid")
    return out


def _cap_reasons(rows: pd.DataFrame, best: str) -> list[str]:
    """Why a gap computed from these rows (dense and every butterfly candidate) cannot be
    final yet; empty if it can."""
    reasons = []
    if (rows.stopped_by == "unknown").any():
        reasons.append("rows do not record how training stopped")
    dense = rows[rows.method == "dense"]
    if dense.still_improving.fillna(False).astype(bool).any():
        reasons.append("dense stopped by a cap while still improving")
    capped = rows[rows.budget_capped.astype(bool) | rows.stopped_by.str.contains("cap")]
    for method, who in (("dense", "dense"), (best, f"best butterfly {best}")):
        k = int((capped.method == method).sum())
        if k:
            n = int((rows.method == method).sum())
            reasons.append(f"{who} hit a cap in {k} of {n} seed(s)")
    others = sorted(set(capped.method) - {"dense", best})
    if others:
        reasons.append(f"{len(others)} other butterfly candidate(s) hit a cap: {', '.join(others)}")
    return reasons


Partial = tuple[str, list[str]]
"""(profile, methods of its configuration that have no rows yet): a run still in progress."""


def headline(df: pd.DataFrame, partial: Partial | None = None) -> dict[str, Any]:
    """The abstract's three numbers as measured, on the best available profile, with the
    gap's spread over seeds, speed-ups of the hidden layer and the whole net at batch 1 and
    256, and the gap's verdict (provisional when its rows are not final, or when `partial`
    says that butterfly candidates of that profile have not run yet)."""
    profile = best_profile(df) if "profile" in df else ""
    if not profile:
        return {"claim": "needs the dense and at least one butterfly method"}
    rows = _with_protocol(df[df.profile == profile])
    s = summary(rows)
    dense, bfly = s[s.method == "dense"], _butterflies(s)
    d, b = dense.iloc[0], bfly.loc[bfly.val_mean.idxmax()]
    gap = paired_gap(rows[rows.method == b.method], rows[rows.method == "dense"])
    used = rows[rows.method.isin(["dense", *bfly.method])]
    reasons = _cap_reasons(used, str(b.method)) + _lr_reasons(s, str(b.method))
    if gap["gap_seeds"] < 2:
        reasons.append(f"{gap['gap_seeds']} paired seed(s): no interval")
    if partial and partial[0] == profile:
        absent = [m for m in partial[1] if re.match(BUTTERFLY, m)]
        if absent:
            reasons.append(f"butterfly candidate(s) not run yet: {', '.join(absent)}")
    r2 = {k: (None if v is None else round(float(v), 2)) for k, v in gap.items()}
    out = {
        "profile": profile,
        "best_butterfly": b.method,
        "selected_on": "validation accuracy",
        "best_butterfly_test_accuracy": round(float(b.test_mean), 2),
        "dense_test_accuracy": round(float(d.test_mean), 2),
        **r2,
        "gap_seeds": int(gap["gap_seeds"]),
        "paper_gap_points": PAPER_GAP,
        "param_ratio": round(float(b.compression_factor / d.compression_factor), 1),
        "paper_param_ratio": PAPER_PARAM_RATIO,
        **{
            f"{w}_speedup_b{n}": round(float(d[f"{w}_b{n}_ms"] / b[f"{w}_b{n}_ms"]), 2)
            for w in ("hidden", "net")
            for n in (1, 256)
        },  # fmt: skip
        "paper_speedup": PAPER_SPEEDUP,
        "seeds": int(b.seeds),
        "provisional_reasons": reasons,
    }
    out["gap_verdict"] = gap_verdict(out["gap_points"], reasons)
    return out


def gap_verdict(gap: float, reasons: list[str]) -> str:
    """verdict() of the gap, or "provisional (reasons)" when its rows are not final."""
    return f"provisional ({'; '.join(reasons)})" if reasons else verdict(gap, PAPER_GAP)


def gap_text(h: dict[str, Any]) -> str:
    """'+1.23 points (95% CI +0.5 .. +2.0 over 3 seeds)' or '... (1 seed: no interval)'."""
    if h.get("gap_ci95_low") is None:
        return f"{h['gap_points']:+.2f} points ({h['gap_seeds']} seed(s): no interval)"
    return (f"{h['gap_points']:+.2f} points (95% CI {h['gap_ci95_low']:+.2f} .. "
            f"{h['gap_ci95_high']:+.2f}, paired over {h['gap_seeds']} seeds)")  # fmt: skip


def figure(df: pd.DataFrame, path: Path) -> None:
    """Test accuracy against hidden-layer parameters (paper's points overlaid) and latency,
    for the best profile present."""
    df = profile_rows(df)
    s = summary(df)
    s["family"] = s.method.map(family)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), sharey=True)
    palette = dict(
        zip([f[1] for f in FAMILIES], sns.color_palette("tab10", len(FAMILIES)), strict=True)
    )
    labels: dict[plt.Axes, list] = {ax: [] for ax in axes}
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
            labels[ax] += [(r.method, r[xcol], r.test_mean, {}) for _, r in g.iterrows()]
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
        labels[axes[0]].append(
            (f"paper: {row.label.split(',')[0]}", p_hidden, row.accuracy, {"color": "dimgray"})
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
    for ax, items in labels.items():  # once the layout is final: labels are placed in pixels
        place_labels(ax, items)
    save_figure(fig, path)


def _threads(df: pd.DataFrame) -> str:
    t = df.latency_threads.iloc[0] if "latency_threads" in df else "?"
    dev = df.device.iloc[0] if "device" in df else "?"
    return f"{dev}, {t} thread(s)"


def _fmt(x: float, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _epochs(r: pd.Series) -> str:
    """'best/total' epochs with the stop marker: * a cap, ** a cap while still improving."""
    mark = "**" if r.improving else "*" if r.capped or "cap" in r.stops else ""
    return f"{r.best_epoch:.0f}/{r.epochs:.0f}{mark}"


def side_by_side(df: pd.DataFrame) -> list[str]:
    """Test accuracy per method and profile beside the paper's (mean ± sd over seeds)."""
    names = profiles(df)
    tables = {p: summary(profile_rows(df, p)).set_index("method") for p in names}
    head = " | ".join(f"{p} profile test %" for p in names)
    lines = [
        f"| method | paper test % | {head} |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for method in dict.fromkeys(df.method):
        pr = paper.compression_row_for(method)
        cells = []
        for p in names:
            t = tables[p]
            if method not in t.index:
                cells.append("")
                continue
            r = t.loc[method]
            sd = "" if math.isnan(r.test_std) else f" ± {r.test_std:.2f}"
            cells.append(f"{r.test_mean:.2f}{sd} ({int(r.seeds)})")
        lines.append(
            f"| {method} | {_fmt(pr.accuracy if pr else math.nan, '.2f')} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def markdown(df: pd.DataFrame, partial: Partial | None = None) -> str:
    """One table per profile (best first; several: a side-by-side accuracy table first), then
    the headline claim on the best profile with its verdict. `partial`: see headline."""
    names = profiles(df)
    lines: list[str] = []
    if partial and partial[1]:
        lines += [f"Profile `{partial[0]}` is partial: not run yet: {', '.join(partial[1])}.", ""]
    if len(names) > 1:
        lines += ["Test accuracy by profile (seeds in parentheses):", ""]
        lines += side_by_side(df) + [""]
    for p in names:
        if len(names) > 1:
            lines += [f"Profile `{p}`:", ""]
        lines += profile_table(profile_rows(df, p)) + [""]
    lines += _headline_lines(df, partial)
    return "\n".join(lines) + "\n"


def profile_table(df: pd.DataFrame) -> list[str]:
    """The measured table of one profile's rows beside the paper's numbers, and its notes."""
    s = summary(df)
    dense_ms = s.loc[s.method == "dense", "hidden_b1_ms"]
    dense_ms = float(dense_ms.iloc[0]) if len(dense_ms) else math.nan
    lines = [
        "| method | hidden params | CF | test % (mean ± sd) | seeds | paper test % | paper CF "
        "| lr (search: val %) | hidden ms b=1 | hidden ms b=256 | net ms b=1 "
        "| speed-up vs dense b=1 | best/epochs | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for _, r in s.iterrows():
        pr = paper.compression_row_for(r.method)
        sd = "" if math.isnan(r.test_std) else f" ± {r.test_std:.2f}"
        search = f" ({r.lr_search})" if isinstance(r.lr_search, str) and " " in r.lr_search else ""
        search += {"lowest": " ↓", "highest": " ↑"}.get(lr_edge(float(r.lr), r.lr_search), "")
        lines.append(
            f"| {r.method} | {int(r.hidden_params):,} | {r.compression_factor:.1f} "
            f"| {r.test_mean:.2f}{sd} | {int(r.seeds)} "
            f"| {_fmt(pr.accuracy if pr else math.nan, '.2f')} "
            f"| {_fmt(pr.compression_factor if pr else math.nan, '.1f')} "
            f"| {r.lr:g}{search} "
            f"| {r.hidden_b1_ms:.3f} | {r.hidden_b256_ms:.2f} | {r.net_b1_ms:.3f} "
            f"| {_fmt(dense_ms / r.hidden_b1_ms, '.2f')} | {_epochs(r)} | {r.stops} |"
        )
    return lines + [
        "",
        "Early stopping on validation accuracy ends every run (`patience`); the epoch and time "
        "caps only guard against runaways. best/epochs: mean over seeds of the best-validation "
        "epoch and of the epochs run; * = a cap stopped the run, ** = it stopped it while the "
        "best validation epoch was within the last `patience` epochs (still improving). The "
        "lr column is the learning rate the validation search chose per method; ↓ / ↑: the "
        "lowest / highest candidate of its grid (the search did not bracket its best lr).",
        f"Latency: {_threads(df)}; data: {df.data_source.iloc[0]} "
        f"(sha256 {str(df.data_sha256.iloc[0])[:12]}).",
        stage_time(df),
    ]


def train_time(manifest: dict[str, Any]) -> str:
    """The compress-train line: the wall time of all the profile's training runs in its pool."""
    return (
        f"Training (`suite compress-train`, profile {manifest['profile']}): "
        f"{manifest['wall_seconds'] / 60:.1f} min wall for {manifest['runs']} runs of "
        f"{len(manifest['methods'])} methods on {manifest['workers']} worker(s) "
        f"({manifest['runs_reused']} kept runs reused), {manifest['device']}."
    )


def stage_time(df: pd.DataFrame) -> str:
    """The wall time of one profile's compress stages (column stage_seconds, one value per
    method), the runs they trained and those taken from kept runs (which cost ~nothing)."""
    per = df.groupby("method").first()
    if "stage_seconds" not in per:
        per = per.assign(stage_seconds=math.nan, stage_runs=math.nan, stage_runs_reused=math.nan)
    timed = per[per.stage_seconds.notna()]
    if timed.empty:
        return "Stage wall time: not recorded (rows written before it was)."
    untimed = sorted(set(per.index) - set(timed.index))
    text = (
        f"Stage wall time: {timed.stage_seconds.sum() / 60:.1f} min over {len(timed)} "
        f"method(s) (training, lr search and latency; slowest {timed.stage_seconds.idxmax()} "
        f"{timed.stage_seconds.max() / 60:.1f} min); {int(timed.stage_runs.sum())} runs, "
        f"{int(timed.stage_runs_reused.sum())} of them kept runs reused."
    )
    return text + (f" Not recorded for: {', '.join(untimed)}." if untimed else "")


def _headline_lines(df: pd.DataFrame, partial: Partial | None = None) -> list[str]:
    h = headline(df, partial)
    lines = []
    if "gap_points" in h:
        lines.append(
            f"Claim (abstract): the best butterfly beats unconstrained by {PAPER_GAP} points with "
            f"{PAPER_PARAM_RATIO:.0f}X fewer parameters and {PAPER_SPEEDUP:.0f}X faster inference. "
            f"Measured (profile {h['profile']}; best butterfly chosen on validation accuracy): "
            f"{h['best_butterfly']} {h['best_butterfly_test_accuracy']}% vs dense "
            f"{h['dense_test_accuracy']}%: gap {gap_text(h)}, {h['param_ratio']}X fewer "
            f"parameters (CF ratio); speed-up over dense, hidden layer "
            f"{h['hidden_speedup_b1']}X (batch 1) / {h['hidden_speedup_b256']}X (batch 256), "
            f"whole net {h['net_speedup_b1']}X / {h['net_speedup_b256']}X. "
            f"Verdict on the gap: {h['gap_verdict']}."
        )
    return lines


def verdict(measured: float, published: float, tolerance: float = 1.0) -> str:
    """reproduced (within tolerance points), exceeded, or not reproduced."""
    if measured > published + tolerance:
        return "exceeded"
    if measured >= published - tolerance:
        return "reproduced"
    return "not reproduced"
