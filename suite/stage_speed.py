"""`suite speed`: time providers x cases on this machine; `suite compare`: across machines.

speed: params.yaml `speed` (+ profiles.<p>.speed) -> pytest on tasks/speed in a subprocess
(never under xdist; benchmarking re-enabled over pyproject's --benchmark-disable) ->
reports/speed/<device-slug>.json (written whole or not at all), an MLflow parent run in the
experiment "speed" with one child run per (provider, batch, dtype, direction) whose metrics are
histories over step = n, and reports/figures/speed_cpu.png (the paper's figure).

Hardware is not a DVC dependency, so `dvc repro` on a new machine sees nothing changed and
reuses the old outputs. On new hardware force the stage: `dvc repro -f speed` (or run `suite
speed`). reports/speed is `persist: true, cache: false`: each machine adds its own
<device-slug>.json beside the others' and never overwrites them; `suite compare` reads them all.
--device picks what one run measures (auto: the GPU when there is one); a GPU machine's
host CPU is a second run, `suite speed --device cpu`, with its own file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from suite import environment, params, results, speed_report, tracking
from suite.stage import log, params_parser

SPEED_DIR = Path(__file__).resolve().parents[1] / "tasks" / "speed"
MACHINE_KEYS = ("cpu", "gpu", "driver", "cuda", "torch", "triton", "commit", "env_id")


class BenchmarkFailed(ValueError):
    """The benchmark process failed (a wrong kernel, a crash): nothing is written."""


def speed_params(path: str, profile: str | None, only: str | None = None):
    """(profile, SpeedParams), restricted to --only-providers when given."""
    from tasks.speed.cases import SpeedParams
    from tasks.speed.providers import PROVIDERS, check_params

    profile, p = params.load_stage(path, "speed", SpeedParams, profile)
    try:
        check_params(p)
    except ValueError as exc:
        raise params.ParamsError(f"speed (profile {profile}): {exc}") from None
    if only:

        names = [s.strip() for s in only.split(",") if s.strip()]
        bad = [s for s in names if s not in PROVIDERS]
        if bad or not names:
            raise params.ParamsError(
                f"--only-providers: unknown provider {bad[0] if bad else only!r} "
                f"(allowed: {', '.join(PROVIDERS)})"
            )
        p = replace(p, providers=names)
    return profile, p


def pytest_command(p: Any, bench_json: Path) -> list[str]:
    """The benchmark run: pytest-benchmark's timing knobs come from params."""
    return [
        sys.executable, "-m", "pytest", str(SPEED_DIR),
        "-p", "no:xdist", "-p", "no:cacheprovider", "-v", "-rs",
        "--benchmark-enable",  # overrides the --benchmark-disable of pyproject's addopts
        f"--benchmark-json={bench_json}",
        f"--benchmark-min-rounds={p.min_rounds}",
        f"--benchmark-max-time={p.max_time}",
        f"--benchmark-min-time={p.min_time}",
        f"--benchmark-warmup={'on' if p.warmup else 'off'}",
        "--benchmark-sort=fullname",
        "--benchmark-columns=median,iqr,rounds,iterations",
    ]  # fmt: skip


def run_pytest(cmd: list[str], env: dict[str, str]) -> int:
    """Run the benchmark process, streaming its lines to stderr as cases finish."""
    proc = subprocess.Popen(
        cmd, cwd=SPEED_DIR.parents[1], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line.rstrip("\n"))
    return proc.wait()


def measure(p: Any, device: str, machine: dict[str, Any]) -> tuple[dict, list[dict]]:
    """Run the grid; (pytest-benchmark's JSON, recorded skips). A failed run raises."""
    from tasks.speed.cases import GRID_ENV, SKIPS_ENV, Grid, dump_grid

    with tempfile.TemporaryDirectory(prefix="suite-speed-") as tmp:
        grid, bench, skips = (Path(tmp) / n for n in ("grid.json", "bench.json", "skips.json"))
        grid.write_text(dump_grid(Grid(p, device, machine)))
        env = {**os.environ, GRID_ENV: str(grid), SKIPS_ENV: str(skips),
               "OMP_NUM_THREADS": str(p.threads)}  # fmt: skip
        env.pop("PYTEST_ADDOPTS", None)  # e.g. "-n 4" from a shell would re-enable xdist
        rc = run_pytest(pytest_command(p, bench), env)
        if rc == 5:  # pytest: no tests collected
            raise BenchmarkFailed(f"the grid has no case on {device} (speed.batches, providers)")
        if rc != 0:
            raise BenchmarkFailed(f"benchmark run failed (pytest exit code {rc}); nothing written")
        raw = json.loads(bench.read_text()) if bench.exists() else {"benchmarks": []}
        skipped = json.loads(skips.read_text()) if skips.exists() else []
    # pytest-benchmark writes no JSON when every case was skipped: keep the facts we have
    names = {"cpu": "cpu_model", "gpu": "gpu_name", "driver": "gpu_driver", "cuda": "cuda_version",
             "torch": "torch_version", "triton": "triton_version"}  # fmt: skip
    fallback = {names.get(k, k): v for k, v in machine.items()}
    raw.setdefault("machine_info", {**fallback, "threads": p.threads, "device": device})
    return raw, skipped


def _children(run: tracking.StageRun, df: pd.DataFrame, slug: str) -> None:
    """One child run per (provider, batch, dtype, direction): metrics over step = n."""
    cell = ["provider", "batch", "dtype", "direction"]
    for (provider, batch, dtype, direction), rows in df.groupby(cell, sort=False):
        history = [
            {"step": int(r.n), **{m: getattr(r, m) for m in speed_report.METRICS}}
            for r in rows.sort_values("n").itertuples()
        ]
        history = [{k: v for k, v in h.items() if not pd.isna(v)} for h in history]
        name = f"{provider}-b{batch}-{dtype}-{direction}"
        labels = {"provider": provider, "batch": int(batch), "dtype": dtype,
                  "direction": direction, "device": slug}  # fmt: skip
        run.child(name, {**labels, "threads": int(rows.threads.iloc[0])},
                  {"cases": len(rows)}, labels, history=history)  # fmt: skip


def cmd_speed(args: argparse.Namespace) -> int:
    from tasks.speed.cases import resolve_device

    profile, p = speed_params(args.params, args.profile, args.only_providers)
    device = resolve_device(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible (use auto or cpu)")
    fp = environment.fingerprint()
    slug = environment.device_slug(device)
    machine = {**{k: fp.get(k) for k in MACHINE_KEYS}, "device_slug": slug}
    uri = tracking.configure(Path.cwd())  # fail before the long run if the server is down
    log(f"[speed] profile={profile} device={device} ({slug}) providers={','.join(p.providers)}")
    raw, skipped = measure(p, device, machine)  # BenchmarkFailed: `suite`'s one-line error
    out = Path(args.out_dir) / f"{slug}.json"
    tags = environment.run_tags(fp, "speed", profile, device=slug, device_kind=device)
    run_name = f"speed-{slug}-{profile}-{fp['commit'][:8]}"
    with tracking.stage_run("speed", run_name, {"profile": profile, **asdict(p)}, tags) as run:
        context = {"profile": profile, "device": device, "device_slug": slug,
                   "run_id": run.run_id, "params": asdict(p), "environment": fp}  # fmt: skip
        report = speed_report.postprocess(raw, skipped, context)
        results.atomic_write_json(out, report)
        df = speed_report.table(report)
        _cpu_figure(df if device == "cpu" else None, Path(args.out_dir), Path(args.figure), p)
        _children(run, df, slug)
        bw = report.get("machine_info", {}).get("copy_bandwidth_gb_s")
        run.log_metrics({"benchmarks": len(df), "skipped": len(report["skipped"]),
                         "copy_bandwidth_gb_s": bw})  # fmt: skip
        run.log_artifact(out)
        run.log_artifact(args.figure)
    log(f"[speed] {len(df)} benchmarks, {len(report['skipped'])} skipped -> {out}, "
         f"{args.figure} ({uri})")  # fmt: skip
    return 0


def _cpu_figure(df: pd.DataFrame | None, out_dir: Path, figure: Path, p: Any) -> None:
    """From this run's CPU rows, or from this same host's CPU report when this run was a GPU's."""
    label = environment.cpu_model()
    threads: int | None = p.threads
    if df is None:
        own = out_dir / f"{environment.device_slug('cpu')}.json"
        report = json.loads(own.read_text()) if own.exists() else None
        df = speed_report.table(report) if report else None
        threads = report["suite"]["params"]["threads"] if report else None
    speed_report.cpu_figure(df, figure, label, threads)


def cmd_compare(args: argparse.Namespace) -> int:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    shared = uri.startswith(("http://", "https://"))
    folder = Path(args.speed_dir)
    if shared and not any(folder.glob("*.json")):  # every device on the server, none here
        long = pd.DataFrame(columns=[*speed_report.KEYS, "device_slug", *speed_report.METRICS])
    else:
        long = speed_report.load_reports(folder)
    if shared:
        # Other machines' runs on a shared server; a device with a local file keeps the file's
        # numbers. An unreachable server is the one-line TrackingUnavailable.
        tracking.configure(Path.cwd())
        remote = speed_report.rows_from_runs(tracking.speed_runs("speed"))
        remote = remote[~remote.device_slug.isin(long.device_slug.unique())]
        log(f"[compare] {uri}: {remote.device_slug.nunique()} more device(s)")
        long = pd.concat([long, remote], ignore_index=True)
    wide = speed_report.compare_table(long)
    results.write_table(wide, Path(args.out), speed_report.KEYS)
    figures = speed_report.compare_figures(long, Path(args.figures_dir))
    devices = ", ".join(sorted(long.device_slug.unique()))
    log(f"[compare] {len(wide)} rows x devices [{devices}] -> {args.out}, "
         f"{len(figures)} figure(s) in {args.figures_dir}")  # fmt: skip
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    spd = sub.add_parser(
        "speed",
        help="speed benchmarks on this machine (docs/protocol.md section 4)",
        parents=[params_parser()],
    )
    spd.add_argument("--out-dir", default="reports/speed")
    spd.add_argument("--figure", default="reports/figures/speed_cpu.png")
    spd.add_argument("--only-providers", help="a comma-separated subset, e.g. butterfly_cpu,fft")
    spd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="what to measure (auto: the GPU if present)")  # fmt: skip
    spd.set_defaults(func=cmd_speed)
    cmp = sub.add_parser("compare", help="every device's speed report -> one table and figures")
    cmp.add_argument("--speed-dir", default="reports/speed")
    cmp.add_argument("--out", default="reports/speed_compare.csv")
    cmp.add_argument("--figures-dir", default="reports/figures")
    cmp.set_defaults(func=cmd_compare)
