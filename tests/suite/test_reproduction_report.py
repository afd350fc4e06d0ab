"""reports/README.md from fixture tables: verdicts first, links, missing stages, provenance.

Every number below is TEST DATA written into tmp_path with the stages' own writers; none is a
measurement. The published numbers are read from suite.paper.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from suite import compression_report, paper, report, reproduction_report, results, speed_report
from suite.cli import main
from suite.stage_report import stale_compare

REC_ENV, REC_COMMIT = "rec0env1a2b3", "a1" * 20
CMP_ENV, CMP_COMMIT = "cmp0env4c5d6", "b2" * 20
CPU_ENV, CPU_COMMIT = "spd0env7e8f9", "c3" * 20
GPU_ENV, GPU_COMMIT = "gpu0env0a1b2", "d4" * 20
DATA_SHA = "e8" * 32
HEADER = "| claim | paper | measured | data / device | verdict |"


# fmt: off
def _recovery(root: Path, sizes: dict[str, list[int]] | None = None, figure: bool = True) -> None:
    """recovery.csv (+ environment, metrics, figure) as `suite recover` writes them."""
    rmse = {"dft": 3e-5, "dct": 2e-3, "hadamard": 2e-6, "legendre": 2e-2}
    sizes = sizes or {"dft": [8, 64, 1024], "dct": [8, 16], "hadamard": [8], "legendre": [8]}
    cells = [(t, n, paper.paper_model(t), 1e-6 if (t, n) == ("dct", 8) else rmse[t])
             for t, ns in sizes.items() for n in ns]
    cells += [("dft", 8, m, 0.2) for m in paper.BASELINE_METHODS]
    base = dict(trials=4, steps=300, seconds=1.5, profile="quick", run_id="run-rec",
                env_id=REC_ENV, commit=REC_COMMIT)
    rows = [{**base, "target": t, "n": n, "method": m, "model": m, "rmse": r,
             "recovered": r <= paper.RMSE_THRESHOLD, "budget_capped": t == "legendre"}
            for t, n, m, r in cells]
    df = pd.DataFrame(rows, columns=list(results.RECOVERY_COLUMNS))
    results.write_table(df, root / "recovery.csv", results.RECOVERY_COLUMNS)
    fp = {"env_id": REC_ENV, "commit": REC_COMMIT, "device": "cpu-fixture-xeon", "gpu": None,
          "cpu": "Fixture Xeon", "torch": "2.13.0+cpu", "triton": "3.7.1"}
    results.atomic_write_json(root / "recovery_environment.json", fp)
    metrics = {"cells": 7, "recovered": 4, "seconds": 12.0, "profile": "quick"}
    results.atomic_write_json(root / "recovery_metrics.json", metrics)
    if figure:
        report.recovery_figure(df, root / "figures" / "recovery.png")


def _compression(root: Path, **flags: dict) -> None:
    """compression.csv, metrics and figure as `suite compress-report` writes them; flags:
    per-method overrides of the stopping columns."""
    methods = {  # method: (hidden params, test accuracies over seeds, hidden-layer b1 ms)
        "dense": (1024 * 1024, [46.0, 46.2], 0.40),
        "bpbp_complex": (16384, [50.4, 50.8], 0.04),  # gap 4.5 points, 10x faster
        "lowrank_r4": (8192, [33.0], 0.02),
    }
    base = dict(projected_val_accuracy=None, lr=1e-3, epochs=20, best_epoch=15, diverged=False,
                budget_capped=False, stopped_by="patience", still_improving=False, seconds=60.0,
                latency_threads=1, n_train=42500, n_val=7500, n_test=10000,
                data_source="image-folder:cifar10-jpeg.tar.gz", data_sha256=DATA_SHA,
                device="cpu-fixture-epyc", profile="quick", env_id=CMP_ENV, commit=CMP_COMMIT)
    rows = [{**base, "method": m, "seed": s, "hidden_params": p, "total_params": p + 10250,
             "compression_factor": paper.compression_factor(p), "val_accuracy": acc - 0.5,
             "test_accuracy": acc, "latency_hidden_b1_ms": ms, "latency_hidden_b256_ms": ms * 20,
             "latency_net_b1_ms": ms + 0.05, "latency_net_b256_ms": ms * 20 + 1,
             "run_id": f"run-{m}", **flags.get(m, {})}
            for m, (p, accs, ms) in methods.items() for s, acc in enumerate(accs)]
    df = pd.DataFrame(rows)
    results.write_table(df, root / "compression.csv", results.COMPRESSION_COLUMNS)
    metrics = {"profile": "quick", **compression_report.headline(df)}
    results.atomic_write_json(root / "compression_metrics.json", metrics)
    compression_report.figure(df, root / "figures" / "compression.png")


def _bench(provider: str, n: int, median: float, device: str = "cpu", batch: int = 1,
           direction: str = "forward") -> dict:
    info = dict(provider=provider, device=device, n=n, batch=batch, dtype="float32",
                direction=direction, bytes=8.0 * batch * n, flops=10.0 * batch * n, threads=1)
    return {"name": f"test_speed[{provider}-{n}]", "extra_info": info,
            "stats": {"median": median, "rounds": 5, "data": [median] * 5}}


def _speed(root: Path, kind: str) -> None:
    """reports/speed/<slug>.json through speed_report.postprocess, as `suite speed` writes it."""
    if kind == "cpu":
        slug, env, commit, gpu = "cpu-fixture-epyc", CPU_ENV, CPU_COMMIT, None
        b = [_bench("dense_fp32", 64, 4e-6), _bench("butterfly_cpu", 64, 8e-6),
             _bench("dense_fp32", 1024, 2e-4), _bench("butterfly_cpu", 1024, 1e-4),  # 2.0x
             _bench("dense_fp32", 8192, 2e-2)]
        skips = [dict(provider="butterfly_cpu", device="cpu", n=8192, batch=1, dtype="float32",
                      direction="forward", reason="n above the profile's cap", nodeid="x")]
    else:
        slug, env, commit, gpu = "nvidia-fixture-h100", GPU_ENV, GPU_COMMIT, "NVIDIA Fixture H100"
        cell = dict(device="cuda", batch=256, direction="forward_backward")
        b = [_bench("dense_fp32", 1024, 1.3e-3, **cell),
             _bench("butterfly_triton", 1024, 1e-3, **cell),  # 1.3x
             _bench("dense_fp32", 4096, 1.2e-2, **cell),
             _bench("butterfly_triton", 4096, 1e-3, **cell)]  # 12x
        skips = []
    machine = dict(cpu_model="Fixture EPYC", threads=1, gpu_name=gpu, device=kind,
                   device_slug=slug, env_id=env, commit=commit, torch_version="2.13.0",
                   triton_version="3.7.1", copy_bandwidth_gb_s=10.0)
    env_fp = {"env_id": env, "commit": commit, "device": slug, "cpu": "Fixture EPYC", "gpu": gpu,
              "torch": "2.13.0", "triton": "3.7.1"}
    ctx = {"device": kind, "device_slug": slug, "profile": "quick", "environment": env_fp}
    out = speed_report.postprocess({"machine_info": machine, "benchmarks": b}, skips, ctx)
    results.atomic_write_json(root / "speed" / f"{slug}.json", out)
    if kind == "cpu":
        df = speed_report.table(out)
        speed_report.cpu_figure(df, root / "figures" / "speed_cpu.png", "Fixture EPYC", 1)


def _provenance(root: Path) -> None:
    classes = ("airplane", "cat", "ship")
    counts = {s: {c: k for c in classes} for s, k in (("train", 5), ("test", 2))}
    results.atomic_write_json(root / "data_provenance.json", dict(
        source_kind="image-folder", source_name="cifar10-jpeg.tar.gz", source_sha256=DATA_SHA,
        arrays_sha256="f0" * 32, official_md5_match=None, n_train=15, n_test=6, counts=counts))
# fmt: on


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reports/ folder with every stage's files, figures included (written once)."""
    root = tmp_path_factory.mktemp("reports")
    _recovery(root)
    _compression(root)
    _speed(root, "cpu")
    _speed(root, "cuda")
    _provenance(root)
    long = speed_report.load_reports(root / "speed")
    results.write_table(
        speed_report.compare_table(long), root / "speed_compare.csv", speed_report.KEYS
    )
    speed_report.compare_figures(long, root / "figures")
    return root


def _verdicts(text: str) -> list[list[str]]:
    """The first table's rows, split into cells; it must be the verdict table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[start] == HEADER
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _verdict(rows: list[list[str]], needle: str) -> str:
    hits = [r[4] for r in rows if needle in r[0]]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def test_verdict_table_comes_first_with_a_row_per_claim(full: Path) -> None:
    text = reproduction_report.build_readme(full)
    lines = text.splitlines()
    assert lines.index(HEADER) < min(i for i, x in enumerate(lines) if x.startswith("## "))
    rows = _verdicts(text)
    expected = (
        len(paper.TARGETS) + 1 + 3 + len(reproduction_report.CPU_CLAIM_NS) + len(paper.GPU_SPEEDUP)
    )
    assert len(rows) == expected and all(len(r) == 5 for r in rows)
    assert [r[0] for r in rows].count(
        f"recovery: {paper.ABSTRACT_CLAIMS['fft_recovery_max_n'].text} (dft, bp)"
    ) == 1
    for claim in paper.ABSTRACT_CLAIMS.values():
        assert sum(claim.text in r[0] for r in rows) == 1
    assert text == reproduction_report.build_readme(full)  # deterministic


def test_verdicts_follow_the_shared_rules(full: Path) -> None:
    rows = _verdicts(reproduction_report.build_readme(full))
    c = paper.ABSTRACT_CLAIMS
    assert _verdict(rows, "(dft, bp)") == "reproduced"
    assert _verdict(rows, "dct (bpp)") == "not reproduced"
    assert _verdict(rows, "hadamard (bp)") == "reproduced"
    assert _verdict(rows, "legendre (bp)") == "provisional"  # its miss came at the budget cap
    assert _verdict(rows, "dst (bpp)") == "not measured (not run)"
    assert _verdict(rows, paper.HEADLINE_RECOVERED.text) == "not reproduced"
    gap = next(r for r in rows if c["accuracy_gain_points"].text in r[0])
    assert "+4.50 points" in gap[2] and gap[4] == "reproduced"  # 4.5 vs 3.9, 1-point tolerance
    assert "paired over 2 seeds" in gap[2] and "profile quick" in gap[3]
    assert _verdict(rows, c["parameter_reduction"].text) == "reproduced"  # ~39.7x vs 40x
    assert _verdict(rows, c["inference_speedup"].text) == "exceeded"  # 10x vs 4x
    n1, n2 = reproduction_report.CPU_CLAIM_NS
    cpu = next(r for r in rows if f"BP over dense at N={n1} " in r[0])
    assert cpu[2].startswith("2.00x") and cpu[4] == "not reproduced"  # 2.0 vs 4.4
    assert cpu[1] == f"{paper.paper_speedup('bp', n1):g}x" and "cpu-fixture-epyc" in cpu[3]
    assert _verdict(rows, f"BP over dense at N={n2} ") == (
        "not measured (skipped: n above the profile's cap)"
    )
    g1, g2 = paper.GPU_SPEEDUP
    assert _verdict(rows, f"GPU speed at N={g1}:") == "reproduced"  # 1.3 vs 1.2
    assert _verdict(rows, f"GPU speed at N={g2}:") == "exceeded"  # 12 vs 4.6


def test_a_capped_baseline_makes_the_gap_provisional(tmp_path: Path) -> None:
    improving = {"stopped_by": "epoch_cap", "budget_capped": True, "still_improving": True}
    _compression(tmp_path, dense=improving)
    rows = _verdicts(reproduction_report.build_readme(tmp_path))
    c = paper.ABSTRACT_CLAIMS
    gap = _verdict(rows, c["accuracy_gain_points"].text)
    assert gap.startswith("provisional (dense stopped by a cap while still improving")
    speed = next(r for r in rows if c["inference_speedup"].text in r[0])
    assert "whole net" in speed[2] and "batch 256" in speed[2]


def test_a_partial_profile_keeps_every_compression_claim_provisional(tmp_path: Path) -> None:
    """compress-report found butterfly candidates not run yet (compression_metrics.json): the
    best butterfly may change, so none of the three claims gets a final verdict."""
    _compression(tmp_path)
    metrics = json.loads((tmp_path / "compression_metrics.json").read_text())
    reason = "butterfly candidate(s) not run yet: bp_complex"
    results.atomic_write_json(
        tmp_path / "compression_metrics.json", {**metrics, "provisional_reasons": [reason]}
    )
    rows = _verdicts(reproduction_report.build_readme(tmp_path))
    for key in ("accuracy_gain_points", "parameter_reduction", "inference_speedup"):
        assert _verdict(rows, paper.ABSTRACT_CLAIMS[key].text) == f"provisional ({reason})"
    _compression(tmp_path)  # the same table, complete: final verdicts again
    rows = _verdicts(reproduction_report.build_readme(tmp_path))
    assert not _verdict(rows, paper.ABSTRACT_CLAIMS["parameter_reduction"].text).startswith(
        "provisional"
    )


def test_the_rules_themselves() -> None:
    bp = paper.paper_speedup("bp", paper.COMPRESSION_N)
    f = reproduction_report.SPEED_FACTOR
    assert reproduction_report.ratio_verdict(2.0, bp, f) == "not reproduced"
    assert reproduction_report.ratio_verdict(bp / f, bp, f) == "reproduced"
    assert reproduction_report.ratio_verdict(bp * f * 1.01, bp, f) == "exceeded"
    assert reproduction_report.ratio_verdict(None, bp, f) == "not reproduced"
    gap = paper.ABSTRACT_CLAIMS["accuracy_gain_points"].value
    tol = reproduction_report.GAP_TOLERANCE
    assert compression_report.verdict(gap + tol + 0.1, gap) == "exceeded"
    assert compression_report.verdict(gap - tol - 0.1, gap) == "not reproduced"


def test_image_links_point_to_existing_files(full: Path) -> None:
    text = reproduction_report.build_readme(full)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"figures/recovery.png", "figures/compression.png", "figures/speed_cpu.png"} <= set(
        links
    )
    assert any(x.startswith("figures/speed_compare_") for x in links)
    for link in links:
        assert not Path(link).is_absolute() and not link.startswith("reports/")
        assert (full / link).is_file(), link


def test_missing_stages_say_not_run_yet(tmp_path: Path) -> None:
    text = reproduction_report.build_readme(tmp_path)
    for cmd in reproduction_report.RUN.values():
        assert f"not run yet: {cmd}" in text
    assert "![" not in text
    rows = _verdicts(text)
    assert rows and all(r[4].startswith("not measured (") for r in rows)


def test_partial_recovery_without_figure(tmp_path: Path) -> None:
    _recovery(tmp_path, sizes={"dft": [8, 16]}, figure=False)
    text = reproduction_report.build_readme(tmp_path)
    assert "![" not in text and "(figure `figures/recovery.png` not written)" in text
    n = int(paper.ABSTRACT_CLAIMS["fft_recovery_max_n"].value)
    assert _verdict(_verdicts(text), "(dft, bp)") == f"not measured (N={n} not run)"
    assert f"not run yet: {reproduction_report.RUN['compress']}" in text


def test_provenance_lists_every_source(full: Path) -> None:
    text = reproduction_report.build_readme(full)
    prov = text[text.index("## Environment and data provenance") :]
    for env, commit in (
        (REC_ENV, REC_COMMIT),
        (CMP_ENV, CMP_COMMIT),
        (CPU_ENV, CPU_COMMIT),
        (GPU_ENV, GPU_COMMIT),
    ):
        assert env in prov and commit[:12] in prov
    for src in (
        "recovery.csv",
        "compression.csv",
        "speed/cpu-fixture-epyc.json",
        "speed/nvidia-fixture-h100.json",
        "NVIDIA Fixture H100",
        "2.13.0+cpu",
        DATA_SHA,
    ):
        assert src in prov, src
    assert "data_sha256 matches this source" in prov


def test_no_paper_number_is_hard_coded() -> None:
    """Published values (claims, speed-ups, accuracies, thresholds, claim N) come from paper."""
    published = {c.value for c in paper.ABSTRACT_CLAIMS.values()}
    published |= {v for m in paper.SPEEDUP.values() for v in m.values()}
    published |= {g.value for g in paper.GPU_SPEEDUP.values()} | set(paper.GPU_SPEEDUP)
    published |= {r.accuracy for r in paper.COMPRESSION.values()}
    published |= {r.compression_factor for r in paper.COMPRESSION.values()}
    published |= {paper.RMSE_THRESHOLD, paper.MSE_THRESHOLD, paper.HEADLINE_RECOVERED.value}
    published |= {paper.HEADLINE_CELLS, paper.COMPRESSION_N, max(paper.SPEED_SIZES)}
    published -= {0, 1}  # the unconstrained layer's CF of 1 is not a result to hard-code
    tree = ast.parse(Path(reproduction_report.__file__).read_text())
    numbers = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, int | float)
        and not isinstance(n.value, bool)
    }
    assert not numbers & published, numbers & published


def test_suite_report_writes_the_readme(full: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "README.md"
    assert main(["report", "--reports-dir", str(full), "--out", str(out)]) == 0
    assert out.read_text() == reproduction_report.build_readme(full)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"{len(_verdicts(out.read_text()))} claims" in line


def test_suite_report_bad_table_is_one_line_and_no_file(tmp_path: Path, capsys) -> None:
    pd.DataFrame({"target": ["dft"]}).to_csv(tmp_path / "recovery.csv", index=False)
    assert main(["report", "--reports-dir", str(tmp_path)]) == 2
    assert "missing required column" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["recovery.csv"]'


def test_stale_comparison_is_noted(full: Path, tmp_path: Path) -> None:
    speed = full / "speed" / "cpu-fixture-epyc.json"
    assert stale_compare(full) == []
    t = (full / "speed_compare.csv").stat().st_mtime
    os.utime(speed, (t + 10, t + 10))
    try:
        assert stale_compare(full) == [speed.name]
    finally:
        os.utime(speed, (t - 10, t - 10))


def test_the_report_carries_the_readmes_deviations_table(tmp_path: Path) -> None:
    """One table, two places: the report copies the README's, markers excluded."""
    from suite.reproduction_report import deviations

    real = deviations(Path(__file__).resolve().parents[2] / "README.md")
    assert real and "extra_perm" in real[2] and "polish_iters" in real[2]
    assert "<!--" not in "\n".join(real)
    readme = tmp_path / "README.md"
    start, end = "<!-- deviations:start -->", "<!-- deviations:end -->"
    readme.write_text(f"# x\n{start}\n| a | b |\n|---|---|\n{end}\n")
    assert deviations(readme)[2] == "| a | b |\n|---|---|"
    readme.write_text("# no table\n")
    assert deviations(readme) == [] and deviations(tmp_path / "missing.md") == []
