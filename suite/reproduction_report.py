"""reports/README.md from the tidy files alone: a paper-vs-measured verdict table, then one
section per stage (figures linked relative to reports/), then environment and data provenance.

Published numbers come from suite.paper only. Verdicts: recovery per cell by
report.recovery_verdicts; the accuracy gap (points) by compression_report.gap_verdict (the
best profile present; "provisional (...)" while its rows hit a cap or dense was still
improving, else compression_report.verdict); ratios
(speed-ups, parameter reduction) by `ratio_verdict`, the same rule on a log2 scale. A missing
stage reads "not run yet: <command>"; a claim without data is "not measured (<why>)".
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from suite import compression_report, paper, report, results, speed_report
from suite.plotting import short_sci

GAP_TOLERANCE: float = inspect.signature(compression_report.verdict).parameters["tolerance"].default
"""Accuracy points either side of the paper's gap that still count as reproduced."""
SPEED_FACTOR = 2.0
"""A speed-up within 2x of the paper's either way is reproduced (other hardware, other year)."""
PARAMS_FACTOR = 1.25
"""A parameter reduction within 1.25x of the paper's is reproduced."""
CPU_CELL = dict(device="cpu", batch=1, dtype="float32", direction="forward")
GPU_CELL = dict(device="cuda", batch=256, dtype="float32", direction="forward_backward")
"""The set-ups of the paper's speed figure and of its GPU claim (suite.paper texts)."""
CPU_CLAIM_NS = (paper.COMPRESSION_N, max(paper.SPEED_SIZES))
"""The speed figure's N of the compression layer (the abstract's 4X, docs/protocol.md section 3)
and its largest N."""
DENSE = speed_report.DENSE_BASELINE["float32"]
RUN = {"recover": "`dvc repro recover`", "compress": "`dvc repro compress-report`",
       "data": "`dvc repro data`", "compare": "`suite compare`",
       "cpu": "`dvc repro -f speed` (or `suite speed --device cpu`)",
       "cuda": "`suite speed --device cuda` on a GPU machine"}  # fmt: skip


def ratio_verdict(measured: float | None, published: float, factor: float) -> str:
    """compression_report.verdict on log2: within `factor` of published either way is
    reproduced, better by more is exceeded, worse by more is not reproduced."""
    if measured is None or not measured > 0 or not math.isfinite(measured):
        return "not reproduced"
    return compression_report.verdict(math.log2(measured), math.log2(published), math.log2(factor))


@dataclass(frozen=True)
class Claim:
    """One row of the verdict table."""

    claim: str
    paper: str
    measured: str
    source: str
    verdict: str


@dataclass
class Inputs:
    """Every tidy file the README reads; None (or empty) where its stage has not run."""

    root: Path
    recovery: pd.DataFrame | None = None
    recovery_env: dict[str, Any] | None = None
    recovery_metrics: dict[str, Any] | None = None
    compression: pd.DataFrame | None = None
    compression_metrics: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare: pd.DataFrame | None = None


def load(reports_dir: Path) -> Inputs:
    """Read whatever tidy files exist under reports_dir."""
    r = Path(reports_dir)

    def read(name: str, cols: tuple[str, ...] = ()) -> Any:
        if not (r / name).is_file():
            return None
        return results.read_table(r / name, cols) if cols else json.loads((r / name).read_text())

    recovery = read("recovery.csv", results.RECOVERY_COLUMNS)
    return Inputs(
        r, None if recovery is None else report.paper_convention(recovery),
        read("recovery_environment.json"),
        read("recovery_metrics.json"), read("compression.csv", results.COMPRESSION_COLUMNS),
        read("compression_metrics.json"), read("data_provenance.json"),
        {p.stem: json.loads(p.read_text()) for p in sorted((r / "speed").glob("*.json"))},
        read("speed_compare.csv", speed_report.KEYS))  # fmt: skip


def _reports(inp: Inputs, kind: str) -> dict[str, dict[str, Any]]:
    """The speed reports that measured `kind` ('cpu' or 'cuda')."""
    where = {s: r.get("suite", {}).get("device") or r.get("machine_info", {}).get("device")
             for s, r in inp.speed.items()}  # fmt: skip
    return {s: r for s, r in inp.speed.items() if where[s] == kind}


def _speedups(rep: dict[str, Any], slug: str, cell: dict[str, Any]) -> dict[tuple, float]:
    """(provider, n) -> speed-up over dense for the benchmarks of one cell set-up."""
    df = speed_report.table(rep, slug)
    df = df[(df[list(cell)] == pd.Series(cell)).all(axis=1) & df.speedup_over_dense.notna()]
    cells = zip(df.provider, df.n, df.speedup_over_dense, strict=True)
    return {(p, int(n)): float(s) for p, n, s in cells}


def recovery_claims(inp: Inputs) -> list[Claim]:
    """A row per paper target (the DFT row carries the abstract's FFT claim), then the headline."""
    df, abstract = inp.recovery, paper.ABSTRACT_CLAIMS["fft_recovery_max_n"]
    p_hits, p_total = paper.paper_recovered_count()
    names = {t: f"recovery: {t} ({paper.paper_model(t)})" for t in paper.TARGETS}
    names["dft"] = f"recovery: {abstract.text} (dft, bp)"
    headline = (paper.HEADLINE_RECOVERED.text, f"{p_hits} of {p_total}")
    if df is None:
        why = f"not measured (not run yet: {RUN['recover']})"
        rows = [(names[t], report.paper_outcome(t)) for t in paper.TARGETS] + [headline]
        return [Claim(c, p, "—", "—", why) for c, p in rows]
    env = inp.recovery_env or {}
    src = ", ".join(
        f"recovery.csv ({p}); {env['device'] if env.get('env_id') == e else f'env {e}'}"
        for p, e in sorted({(str(a), str(b)) for a, b in zip(df.profile, df.env_id, strict=True)})
    )
    verdicts = report.recovery_verdicts(df).set_index("target")
    cells = report.best_cells(df.assign(n=df.n.astype(int)), paper.LEARNED_METHODS)
    out, agg = [], []
    for t in paper.TARGETS:
        mine, v = cells[cells.target == t].sort_values("n"), verdicts.loc[t]
        outcome = report.paper_outcome(t)
        if v.verdict == "not run":
            out.append(Claim(names[t], outcome, "—", src, "not measured (not run)"))
            continue
        ns, hits = mine.n.tolist(), int((mine.rmse <= paper.RMSE_THRESHOLD).sum())
        lo, hi = short_sci(mine.rmse.min(), 2), short_sci(mine.rmse.max(), 2)
        measured = f"{hits} of {len(ns)} N recovered (N={_span(ns[0], ns[-1])}); RMSE " + (
            _span(lo, hi) + (f"; {v.detail}" if v.verdict != "reproduced" else ""))  # fmt: skip
        verdict = str(v.verdict)
        if t == "dft" and int(abstract.value) not in ns and verdict != "not reproduced":
            verdict = f"not measured (N={int(abstract.value)} not run)"
        agg += [verdict] if t in paper.STRUCTURED_TARGETS else []
        out.append(Claim(names[t], outcome, measured, src, verdict))
    s = cells[cells.target.isin(paper.STRUCTURED_TARGETS)]
    hits = int((s.rmse <= paper.RMSE_THRESHOLD).sum())
    measured = f"{hits} of {len(s)} measured cells ({p_total - len(s)} of {p_total} not run)"
    verdict = next((x for x in ("not reproduced", "exceeded") if x in agg), "reproduced")
    verdict = verdict if agg else "not measured (no structured target run)"
    return [*out, Claim(*headline, measured, src, verdict)]


def compression_claims(inp: Inputs) -> list[Claim]:
    """The abstract's three: accuracy gain, parameter reduction, inference speed-up."""
    c, df = paper.ABSTRACT_CLAIMS, inp.compression
    keys = ("accuracy_gain_points", "parameter_reduction", "inference_speedup")
    unit = {k: f"{c[k].value:g} {c[k].unit}".replace(" x", "x") for k in keys}
    head = {k: (f"compression: {c[k].text}", unit[k]) for k in keys}
    h = compression_report.headline(df) if df is not None else {}
    # compress-report knows the configured methods: a profile it found partial stays provisional
    m = inp.compression_metrics or {}
    missing = [r for r in m.get("provisional_reasons", []) if "not run yet" in r]
    partial = f"provisional ({'; '.join(missing)})" if missing else None
    if partial and m.get("profile") == h.get("profile"):
        h["gap_verdict"] = partial
    else:
        partial = None
    if "gap_points" not in h:
        why = f"not run yet: {RUN['compress']}" if df is None else str(h["claim"])
        return [Claim(*head[k], "—", "—", f"not measured ({why})") for k in keys]  # fmt: skip
    profiles = sorted(map(str, df.profile.unique()))
    others = f" of {', '.join(profiles)}" if len(profiles) > 1 else ""
    src = (
        f"compression.csv (profile {h['profile']}{others}); "
        f"{', '.join(sorted(map(str, df.device.unique())))}, {df.latency_threads.iloc[0]} thread(s)"
    )
    vs = f"{h['best_butterfly']} vs dense"
    speed = (f"{h['hidden_speedup_b1']:g}x (hidden layer, batch 1, {vs}; batch 256: "
             f"{h['hidden_speedup_b256']:g}x; whole net: {h['net_speedup_b1']:g}x / "
             f"{h['net_speedup_b256']:g}x)")  # fmt: skip
    measured: dict[str, tuple[float, str, Callable[[float, float], str]]] = {
        keys[0]: (h["gap_points"], f"{compression_report.gap_text(h)}; {vs}: "
                  f"{h['best_butterfly_test_accuracy']}% vs {h['dense_test_accuracy']}%, "
                  f"best butterfly chosen on validation accuracy",
                  lambda m, p: h["gap_verdict"]),
        keys[1]: (h["param_ratio"], f"{h['param_ratio']:g}x (compression factor, {vs})",
                  lambda m, p: ratio_verdict(m, p, PARAMS_FACTOR)),
        keys[2]: (h["hidden_speedup_b1"], speed,
                  lambda m, p: ratio_verdict(m, p, SPEED_FACTOR)),
    }  # fmt: skip
    return [  # while a candidate has not run, the best butterfly, so every claim, may change
        Claim(*head[k], text, src, partial or rule(value, c[k].value))
        for k, (value, text, rule) in measured.items()
    ]


def speed_claims(inp: Inputs, kind: str) -> list[Claim]:
    """BP over dense on one CPU thread ('cpu'), or the GPU kernel over nn.Linear ('cuda')."""
    if kind == "cpu":
        cell, prov = CPU_CELL, "butterfly_cpu"
        published = {n: paper.paper_speedup("bp", n) or math.nan for n in CPU_CLAIM_NS}
        text = f"CPU speed: BP over dense at N={{}} ({paper.SPEED_SETUP})"
    else:
        cell, prov = GPU_CELL, "butterfly_triton"
        published = {n: g.value for n, g in paper.GPU_SPEEDUP.items()}
        text = f"GPU speed at N={{}}: {next(iter(paper.GPU_SPEEDUP.values())).text}"
    reports = _reports(inp, kind)
    if not reports:
        why = f"not measured (no {kind.upper()} speed report; run {RUN[kind]})"
        return [Claim(text.format(n), f"{p:g}x", "—", "—", why) for n, p in published.items()]
    out = []
    for slug, rep in reports.items():
        mi, ups = rep.get("machine_info", {}), _speedups(rep, slug, cell)
        src = f"speed/{slug}.json; {mi.get('cpu_model' if kind == 'cpu' else 'gpu_name')}"
        for n, p in published.items():
            s = ups.get((prov, n))
            if s is None:
                skip = [x.get("reason") for x in rep.get("skipped", [])
                        if {**x, **cell, "provider": prov, "n": n} == x]  # fmt: skip
                why = f"skipped: {skip[0]}" if skip else f"N={n} not in this grid"
                out.append(Claim(text.format(n), f"{p:g}x", "—", src, f"not measured ({why})"))
                continue
            threads = f", {mi.get('threads', '?')} thread(s)" if kind == "cpu" else ""
            out.append(Claim(text.format(n), f"{p:g}x", f"{s:.2f}x ({prov} vs {DENSE}{threads})",
                             src, ratio_verdict(s, p, SPEED_FACTOR)))  # fmt: skip
    return out


def claims(inp: Inputs) -> list[Claim]:
    """Every row of the verdict table, in the paper's order."""
    rows = recovery_claims(inp) + compression_claims(inp)
    return rows + speed_claims(inp, "cpu") + speed_claims(inp, "cuda")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    body = ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *body]


def _image(inp: Inputs, rel: str, alt: str) -> str:
    """A markdown image relative to reports/, only when the file exists."""
    return f"![{alt}]({rel})" if (inp.root / rel).is_file() else f"(figure `{rel}` not written)"


def _x(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _span(lo: object, hi: object) -> str:
    return str(lo) if lo == hi else f"{lo}..{hi}" if isinstance(lo, int) else f"{lo} .. {hi}"


def _speed_sections(inp: Inputs) -> list[str]:
    out = ["## Speed on CPU", ""]
    cpu, gpu = _reports(inp, "cpu"), _reports(inp, "cuda")
    if not cpu:
        out += [f"not run yet: {RUN['cpu']}", ""]
    else:
        out += [_image(inp, "figures/speed_cpu.png", "speed-up over dense on CPU"), "",
                "Ours solid, the paper's dashed (the last CPU `suite speed` run).", ""]  # fmt: skip
    lines = speed_report.FIGURE_LINES
    for slug, rep in cpu.items():
        ups = _speedups(rep, slug, CPU_CELL)
        ns = sorted(set(paper.SPEED_SIZES) | {n for _, n in ups})
        rows = [[str(n)] + [_x(v) for prov, key, _ in lines
                            for v in (ups.get((prov, n)), paper.paper_speedup(key, n))]
                for n in ns]  # fmt: skip
        head = ["N"] + [f"{key.upper()} {w}" for _, key, _ in lines for w in ("ours", "paper")]
        threads = rep.get("machine_info", {}).get("threads", "?")
        out += [f"Speed-up over dense, batch 1, float32, {threads} thread(s), `speed/{slug}.json`:",
                "", *_table(head, rows), ""]  # fmt: skip
    out += ["## GPU speed and the cross-device comparison", ""]
    out += [] if gpu else [f"GPU: not run yet: {RUN['cuda']}", ""]
    for slug, rep in gpu.items():
        ups = _speedups(rep, slug, GPU_CELL)
        provs = sorted({p for p, _ in ups} - {DENSE})
        rows = [[str(n)] + [_x(ups.get((p, n))) for p in provs] + [_x(paper.paper_gpu_speedup(n))]
                for n in sorted({n for _, n in ups})]  # fmt: skip
        gpu_name = rep.get("machine_info", {}).get("gpu_name")
        out += [f"Speed-up over {DENSE}, batch {GPU_CELL['batch']}, forward+backward, {gpu_name}, "
                f"`speed/{slug}.json`:", "", *_table(["N", *provs, "paper"], rows), ""]  # fmt: skip
    if inp.compare is None:
        return [*out, f"Cross-device comparison: not run yet: {RUN['compare']}", ""]
    devices = sorted({c.split(":")[0] for c in inp.compare.columns if ":" in c})
    out += [f"Cross-device comparison, `speed_compare.csv`: {len(inp.compare)} rows; devices: "
            f"{', '.join(devices)}.", ""]  # fmt: skip
    for p in sorted((inp.root / "figures").glob("speed_compare_*.png")):
        out += [_image(inp, f"figures/{p.name}", p.stem), ""]
    return out


def _provenance(inp: Inputs) -> list[str]:
    fps = [inp.recovery_env or {}] + [r.get("suite", {}).get("environment") or {}
                                      for r in inp.speed.values()]  # fmt: skip
    by_env = {str(f["env_id"]): f for f in fps if f.get("env_id")}
    rows = []
    for name, df in (("recovery.csv", inp.recovery), ("compression.csv", inp.compression)):
        for (env, commit), g in [] if df is None else df.groupby(["env_id", "commit"]):
            f = by_env.get(str(env), {})
            dev = ", ".join(sorted(map(str, g.device.unique()))) if "device" in g else None
            rows.append([name, str(commit)[:12], str(env), dev or f.get("device", "—"),
                         f.get("cpu", "—"), f.get("gpu") or "—", f.get("torch", "—"),
                         f.get("triton", "—")])  # fmt: skip
    for slug, rep in inp.speed.items():
        mi = rep.get("machine_info", {})
        keys = ("env_id", "device_slug", "cpu_model", "gpu_name", "torch_version", "triton_version")
        rows.append([f"speed/{slug}.json", str(mi.get("commit") or "—")[:12],
                     *(str(mi.get(k) or "—") for k in keys)])  # fmt: skip
    head = ["source file", "commit", "env_id", "device", "CPU", "GPU", "torch", "triton"]
    out = ["## Environment and data provenance", "", *_table(head, rows), "",
           "— = not in that file (compression rows carry env_id, commit, device, data_sha256; the"
           " full fingerprint is outputs/compress/<method>/environment.json).", "",
           "### Data (CIFAR-10)", ""]  # fmt: skip
    p = inp.provenance
    if p is None:
        return [*out, f"Data: not run yet: {RUN['data']}", ""]
    out += _table(["field", "value"], [
        ["source", f"{p.get('source_kind')}: {p.get('source_name')}"],
        ["source sha256", str(p.get("source_sha256"))],
        ["arrays sha256", str(p.get("arrays_sha256"))],
        ["official md5 match", str(p.get("official_md5_match")).replace("None", "—")],
        *[[f"{s} images", f"{sum(c.values())} in {len(c)} classes"]
          for s, c in p.get("counts", {}).items()],
    ])  # fmt: skip
    if inp.compression is not None:
        shas = sorted(set(map(str, inp.compression.data_sha256)))
        same = shas == [str(p.get("source_sha256"))]
        out += ["", "The compression rows' data_sha256 " + ("matches this source." if same
                else f"differs from this source: {', '.join(shas)}.")]  # fmt: skip
    return [*out, ""]


DEVIATIONS = ("<!-- deviations:start -->", "<!-- deviations:end -->")


def deviations(readme: Path) -> list[str]:
    """The deviations table of the project README (between the DEVIATIONS markers), so that
    the report and the README show one table; nothing when the README has none."""
    text = readme.read_text() if readme.is_file() else ""
    start, end = (text.find(m) for m in DEVIATIONS)
    if start < 0 or end < start:
        return []
    return ["### Deviations from the paper (from the project README)", "",
            text[start + len(DEVIATIONS[0]) : end].strip(), ""]  # fmt: skip


def render(inp: Inputs) -> str:
    """The whole README as markdown."""
    rows = [[c.claim, c.paper, c.measured, c.source, c.verdict] for c in claims(inp)]
    out = ["# Reproduction report: Dao et al., ICML 2019 (butterfly factorizations)", "",
           "Built by `suite report` from the tidy files in this folder alone.", "",
           *_table(["claim", "paper", "measured", "data / device", "verdict"], rows), "",
           f"Verdicts: recovery cell by cell (RMSE <= {short_sci(paper.RMSE_THRESHOLD)}); the "
           f"accuracy gap within {GAP_TOLERANCE:g} point(s), speed-ups within {SPEED_FACTOR:g}x "
           f"and the parameter reduction within {PARAMS_FACTOR:g}x of the paper's; more is "
           "exceeded.", "", "## Transform recovery", ""]  # fmt: skip
    if inp.recovery is None:
        out += [f"not run yet: {RUN['recover']}", ""]
    else:
        m = inp.recovery_metrics or {}
        out += [_image(inp, "figures/recovery.png", "recovery heatmap"), "",
                report.recovery_markdown(inp.recovery)]  # fmt: skip
        out += [f"Run: {m.get('recovered')} of {m.get('cells')} learned cells recovered in "
                f"{m.get('seconds')} s (profile {m.get('profile')}).", ""] if m else []  # fmt: skip
    out += deviations(inp.root.parent / "README.md")
    out += ["## CIFAR-10 compression (single hidden layer)", ""]
    if inp.compression is None:
        out += [f"not run yet: {RUN['compress']}", ""]
    else:
        profile = (inp.compression_metrics or {}).get("profile", "?")
        out += [_image(inp, "figures/compression.png", "accuracy against parameters"), "",
                f"Profile {profile}.", "",
                compression_report.markdown(inp.compression)]  # fmt: skip
    out += _speed_sections(inp) + _provenance(inp)
    return "\n".join(out).rstrip() + "\n"


def build_readme(reports_dir: Path) -> str:
    """reports/README.md's text from the tidy files under reports_dir (whatever exists)."""
    return render(load(reports_dir))
