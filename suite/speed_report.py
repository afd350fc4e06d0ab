"""Speed reports from the benchmark JSON alone: derived metrics, the paper's CPU figure, and
the cross-device comparison (one tidy table, one figure per case family).

A report file is pytest-benchmark's JSON for one device, post-processed by `postprocess`: every
benchmark's extra_info gains time_ms, gb_per_s, fraction_of_copy_bandwidth, speedup_over_dense
and speedup_over_fft; raw timings are dropped; "skipped" lists the cases that did not run.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from suite import paper  # noqa: E402
from suite.plotting import save_figure  # noqa: E402

KEYS = ("provider", "n", "batch", "dtype", "direction")
METRICS = (
    "time_ms",
    "gb_per_s",
    "fraction_of_copy_bandwidth",
    "speedup_over_dense",
    "speedup_over_fft",
)
DENSE_BASELINE = {"float32": "dense_fp32", "bfloat16": "dense_bf16"}
"""The dense provider a row's speed-up is measured against, by the row's dtype."""
FIGURE_LINES = (
    ("butterfly_cpu", "bp", "BP (compiled loop + gather)"),
    ("fft", "fft", "FFT (torch.fft.fft, complex input)"),
    ("dct", "dct", "DCT-II (Makhoul, one FFT)"),
)
"""(provider, key in suite.paper.SPEEDUP, label) of the paper's speed figure."""


def _clean(obj: Any) -> Any:
    """NaN and infinities -> None, recursively (reports are strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _key(e: Mapping[str, Any], provider: str | None = None) -> tuple:
    return (e["device"], provider or e["provider"], e["n"], e["batch"], e["dtype"], e["direction"])


def postprocess(
    raw: Mapping[str, Any], skipped: Iterable[Mapping[str, Any]], context: Mapping[str, Any]
) -> dict[str, Any]:
    """Fill the derived metrics of every benchmark from its median; add skips and context.

    gb_per_s = bytes / median; fraction_of_copy_bandwidth = gb_per_s / the machine's copy
    GB/s; speedup_over_dense = median of the dense provider of the same device, n, batch,
    dtype (DENSE_BASELINE) and direction / this median; speedup_over_fft likewise with fft.
    """
    out = copy.deepcopy(dict(raw))
    benches = out.setdefault("benchmarks", [])
    bandwidth = out.get("machine_info", {}).get("copy_bandwidth_gb_s")
    medians = {_key(b["extra_info"]): b["stats"]["median"] for b in benches}
    for b in benches:
        b["stats"].pop("data", None)  # every round's time: large, and not needed downstream
        e, t = b["extra_info"], b["stats"]["median"]
        if not t or t <= 0:
            raise ValueError(f"benchmark {b.get('name')} has no positive median time")
        e["time_ms"] = t * 1e3
        e["gb_per_s"] = e["bytes"] / t / 1e9
        e["gflop_per_s"] = e["flops"] / t / 1e9
        e["fraction_of_copy_bandwidth"] = e["gb_per_s"] / bandwidth if bandwidth else None
        dense_name = DENSE_BASELINE.get(e["dtype"])
        dense = medians.get(_key(e, dense_name)) if dense_name else None
        e["dense_baseline"] = dense_name
        e["speedup_over_dense"] = dense / t if dense else None
        fft = medians.get(_key(e, "fft"))
        e["speedup_over_fft"] = fft / t if fft else None
    seen = {s.get("nodeid"): dict(s) for s in out.get("skipped", [])}
    seen.update({s.get("nodeid"): dict(s) for s in skipped})
    out["skipped"] = list(seen.values())
    out["suite"] = dict(context)
    return _clean(out)


def table(report: Mapping[str, Any], device_slug: str | None = None) -> pd.DataFrame:
    """One row per benchmark of a report: KEYS, device, device_slug, threads, metrics."""
    slug = device_slug or report.get("suite", {}).get("device_slug") or "unknown"
    cols = [*KEYS, "device", "threads", "bytes", "flops", "gflop_per_s", *METRICS]
    rows = [
        {**{c: b["extra_info"].get(c) for c in cols}, "device_slug": slug}
        for b in report.get("benchmarks", [])
    ]
    return pd.DataFrame(rows, columns=[*cols, "device_slug"])


def cpu_figure(df: pd.DataFrame | None, path: Path, device: str, threads: int | None) -> None:
    """The paper's speed figure: speed-up over dense of BP, FFT, DCT at batch 1, float32.

    Ours: solid lines, filled markers; the paper's (suite.paper.SPEEDUP): dashed, hollow.
    Without CPU rows the figure says so (the stage's output exists on every machine).
    """
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = pd.DataFrame() if df is None else df[
        (df.device == "cpu") & (df.batch == 1) & (df.dtype == "float32")
        & (df.direction == "forward") & df.n.isin(paper.SPEED_SIZES)
    ]  # fmt: skip
    palette = sns.color_palette("deep", len(FIGURE_LINES))
    for (provider, key, label), colour in zip(FIGURE_LINES, palette, strict=True):
        ours = rows[rows.provider == provider].sort_values("n") if len(rows) else rows
        if len(ours) and ours.speedup_over_dense.notna().any():
            ax.plot(ours.n, ours.speedup_over_dense, "-o", color=colour, label=f"{label}, ours")
        published = paper.SPEEDUP[key]
        ax.plot(list(published), list(published.values()), "--o", color=colour,
                markerfacecolor="none", label=f"{label.split(' (')[0]}, paper")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="N", ylabel="speed-up over dense (x)")
    ax.set_xticks(list(paper.SPEED_SIZES), [str(n) for n in paper.SPEED_SIZES])
    ax.minorticks_off()
    if rows.empty:
        ax.text(0.5, 0.5, "no CPU measurement on this machine:\nrun `suite speed --device cpu`",
                transform=ax.transAxes, ha="center", va="center")  # fmt: skip
    t = "?" if threads is None else str(threads)
    ax.set_title(f"Speed-up over dense, batch 1, float32, {t} thread(s)\n{device}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


# --- cross-device comparison ---------------------------------------------------------------


def load_reports(folder: Path) -> pd.DataFrame:
    """Every reports/speed/*.json as one long table (a device_slug column per file)."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no speed reports in {folder} (run `suite speed` first)")
    frames = []
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable speed report ({exc})") from None
        if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), list):
            raise ValueError(f"{path}: not a speed report (no 'benchmarks' list)")
        slug = report.get("suite", {}).get("device_slug") or path.stem
        frames.append(table(report, slug))
    return pd.concat(frames, ignore_index=True)


def rows_from_runs(runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Long rows from MLflow speed child runs: {"tags": {...}, "history": {metric: {n: v}}}.

    The tags name the cell (provider, batch, dtype, direction, device); each history is the
    metric over step = n, as `suite speed` logs it.
    """
    rows = []
    for run in runs:
        tags, history = run["tags"], run["history"]
        for n in sorted({int(s) for h in history.values() for s in h}):
            row = {k: tags.get(k) for k in ("provider", "dtype", "direction")}
            row.update(n=n, batch=int(tags["batch"]), device_slug=tags.get("device"))
            row.update({m: history.get(m, {}).get(n) for m in METRICS})
            rows.append(row)
    return pd.DataFrame(rows, columns=[*KEYS, "device_slug", *METRICS])


def compare_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows (provider, n, batch, dtype, direction); a column group per device: '<device>:<m>'."""
    wide = long.pivot_table(index=list(KEYS), columns="device_slug", values=list(METRICS),
                            aggfunc="first", dropna=False)  # fmt: skip
    devices = sorted(long.device_slug.unique())
    wide = wide.reindex(columns=[(m, d) for d in devices for m in METRICS])
    wide.columns = [f"{d}:{m}" for m, d in wide.columns]
    wide = wide.dropna(how="all")
    return wide.reset_index().sort_values(list(KEYS), ignore_index=True)


def compare_figures(long: pd.DataFrame, folder: Path) -> list[Path]:
    """One log-log time-vs-n figure per family (batch, dtype, direction): device x provider."""
    sns.set_theme(style="whitegrid", context="paper")
    paths = []
    for (batch, dtype, direction), fam in long.groupby(["batch", "dtype", "direction"]):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        sns.lineplot(data=fam.sort_values("n"), x="n", y="time_ms", hue="provider",
                     style="device_slug", markers=True, ax=ax)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="N", ylabel="median time per call (ms)")
        ax.set_title(f"batch {batch}, {dtype}, {direction}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = Path(folder) / f"speed_compare_b{batch}_{dtype}_{direction}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths
