"""`suite <stage>`: read params, call a task, write results atomically, log to MLflow."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from suite import (
    dashboard,
    environment,
    params,
    report,
    results,
    stage_compress,
    stage_data,
    stage_report,
    stage_speed,
    tracking,
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_env(args: argparse.Namespace) -> int:
    print(json.dumps(environment.fingerprint(), indent=2, sort_keys=True))
    return 0


def _recover_params(args: argparse.Namespace):
    from tasks.recovery import RecoverParams

    return params.load_stage(args.params, "recover", RecoverParams, args.profile)


def cmd_recover(args: argparse.Namespace) -> int:
    if args.matrix is not None:
        return _recover_matrix(args)
    from tasks.recovery import run_grid

    profile, p = _recover_params(args)
    if args.only:
        p = p.restricted(_parse_cells(args.only))
    fp = environment.fingerprint()
    out_csv, out_fig = Path(args.table), Path(args.figure)
    factors_dir = Path(args.factors)
    work = Path(tempfile.mkdtemp(prefix="recover-", dir=_scratch()))
    uri = tracking.configure(Path.cwd())
    tags = environment.run_tags(fp, "recover", profile)
    rows: list[dict[str, Any]] = []
    run_name = f"recover-{profile}{'-only' if args.only else ''}-{fp['commit'][:8]}"
    _log(f"[recover] profile={profile} tracking={uri} work={work}")
    t0 = time.time()
    run_params = {"profile": profile, **_plain(p), "env": fp}
    with tracking.stage_run("recover", run_name, run_params, tags) as run:
        for rec in run_grid(p, work, log=_log):
            factors = rec.pop("factors")
            best = rec.pop("best_params")
            rec.update(
                recovered=bool(rec["rmse"] <= 1e-4),
                profile=profile,
                run_id=run.run_id,
                env_id=fp["env_id"],
                commit=fp["commit"],
            )
            child_params = {k: rec[k] for k in ("target", "n", "method", "model", "trials")}
            child_params.update({f"best.{k}": v for k, v in best.items()})
            metrics = {
                "rmse": rec["rmse"],
                "seconds": rec["seconds"],
                "steps": rec["steps"],
                "recovered": float(rec["recovered"]),
            }
            run.child(
                f"{rec['target']}-{rec['n']}-{rec['method']}",
                child_params,
                {k: v for k, v in metrics.items() if math.isfinite(v)},
                {"target": rec["target"], "method": rec["method"]},
                [factors] if factors else [],
            )
            rows.append(rec)
        df = pd.DataFrame(rows, columns=list(results.RECOVERY_COLUMNS))
        results.write_table(df, out_csv, results.RECOVERY_COLUMNS)
        report.recovery_figure(df, out_fig)
        results.atomic_write_text(Path(args.summary), report.recovery_markdown(df))
        learned = df[df.method.isin(["bp", "bpp", "bpbp"])]
        metrics = {
            "cells": int(len(learned)),
            "recovered": int(learned.recovered.sum()),
            "seconds": round(time.time() - t0, 1),
            "profile": profile,
        }
        results.atomic_write_json(Path(args.metrics), metrics)
        results.atomic_write_json(Path(args.environment), fp)
        run.log_metrics({k: v for k, v in metrics.items() if k != "profile"})
        for path in (out_csv, out_fig, Path(args.environment)):
            run.log_artifact(path)
    _replace_dir(work / "factors", factors_dir)
    shutil.rmtree(work, ignore_errors=True)
    _log(
        f"[recover] {metrics['recovered']}/{metrics['cells']} learned cells recovered "
        f"in {metrics['seconds']:.0f}s -> {out_csv}, {out_fig}"
    )
    return 0


def _recover_matrix(args: argparse.Namespace) -> int:
    """Learn a fast factorization of a user matrix; writes DIR/result.json and DIR/factors.pt."""
    from kernels.butterfly import save_factors
    from tasks.recovery import learn_cell, trial_pool
    from tasks.targets import load_matrix

    target = load_matrix(args.matrix)
    if args.out is None:
        raise params.ParamsError("--matrix needs --out DIR")
    profile, p = _recover_params(args)
    sp = p.search_params
    n = target.shape[0]
    if n not in sp.trials or n not in sp.cell_seconds:
        raise params.ParamsError(
            f"profile {profile} has no trials/cell_seconds for n={n} (recover.search)"
        )
    models = ["bp", "bpp", "bpbp"] if args.model == "auto" else [args.model]
    work = Path(tempfile.mkdtemp(prefix="recover-", dir=_scratch()))
    best = None
    t0 = time.time()
    with trial_pool(sp.workers) or contextlib.nullcontext() as pool:
        for model in models:
            _log(f"[recover] {args.matrix} n={n}: trying {model}")
            res, fitted = learn_cell(target, "matrix", model, sp, work, p.storage, _log, pool)
            _log(f"[recover] {model}: rmse={res.rmse:.3e}")
            if fitted is not None and (best is None or res.rmse < best[0].rmse):
                best = (res, fitted)
            if res.rmse <= 1e-4:
                break
    if best is None:
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError("no trial finished within the budget; raise recover.search.cell_seconds")
    res, fitted = best
    out = Path(args.out)
    stage = Path(
        tempfile.mkdtemp(prefix=".recover-", dir=out.parent if out.parent.exists() else None)
    )
    save_factors(fitted, stage / "factors.pt", {"matrix": str(args.matrix), "rmse": res.rmse})
    summary = {
        "rmse": res.rmse,
        "mse": res.mse,
        "n": n,
        "model": res.model,
        "recovered": res.rmse <= 1e-4,
        "seconds": round(time.time() - t0, 2),
        "trials": res.trials,
        "steps": res.steps,
        "profile": profile,
        "best_params": res.best_params,
        "factors": "factors.pt",
        "complex_input": target.is_complex(),
        "environment": environment.fingerprint(),
    }
    results.atomic_write_json(stage / "result.json", summary)
    _replace_dir(stage, out)
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"rmse {res.rmse:.3e} ({'recovered' if res.rmse <= 1e-4 else 'not recovered'}) "
        f"model {res.model} in {summary['seconds']:.1f}s -> {out}/result.json"
    )
    return 0


def cmd_recover_worker(args: argparse.Namespace) -> int:
    """Join a running cell's study from another process or machine (shared storage)."""
    from tasks.recovery import run_worker

    run_worker(args.storage, args.work_dir, args.study, args.worker)
    return 0


def _parse_cells(text: str) -> list[tuple[str, int]]:
    """'dft:1024,dct:512' -> [('dft', 1024), ('dct', 512)]."""
    cells = []
    for item in filter(None, text.split(",")):
        target, _, n = item.partition(":")
        if not n.isdigit():
            raise ValueError(f"--only takes TARGET:N[,TARGET:N...], got {item!r}")
        cells.append((target.strip(), int(n)))
    return cells


def _scratch() -> Path:
    path = Path.cwd() / ".suite-tmp"
    path.mkdir(exist_ok=True)
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing the old one only once the new one is whole."""
    if not src.exists():
        src.mkdir(parents=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    shutil.move(str(src), str(dst))
    shutil.rmtree(old, ignore_errors=True)


def _plain(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(obj)
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="suite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    env = sub.add_parser("env", help="print the hardware and software fingerprint")
    env.set_defaults(func=cmd_env)
    rec = sub.add_parser("recover", help="transform recovery (PAPER.md section 2)")
    rec.add_argument("--params", default="params.yaml")
    rec.add_argument("--profile", choices=params.PROFILES, help="override params.yaml's profile")
    rec.add_argument(
        "--matrix", help="a user matrix (.npy/.txt/.csv) to factorize instead of the grid"
    )
    rec.add_argument("--out", help="with --matrix: output folder for result.json and factors.pt")
    rec.add_argument("--model", default="auto", choices=["auto", "bp", "bpp", "bpbp"])
    rec.add_argument("--only", help="run only these cells of the profile, e.g. dft:1024,dct:1024")
    rec.add_argument("--table", default="reports/recovery.csv")
    rec.add_argument("--figure", default="reports/figures/recovery.png")
    rec.add_argument("--summary", default="reports/recovery.md")
    rec.add_argument("--metrics", default="reports/recovery_metrics.json")
    rec.add_argument(
        "--environment",
        default="reports/recovery_environment.json",
        help="the fingerprint (commit, versions, CPU/GPU) every row's env_id points to",
    )
    rec.add_argument("--factors", default="outputs/recover/factors")
    rec.set_defaults(func=cmd_recover)
    wrk = sub.add_parser("recover-worker", help="join a recovery cell's study (shared storage)")
    wrk.add_argument("--storage", required=True, help="Optuna storage URL shared by all workers")
    wrk.add_argument("--study", required=True)
    wrk.add_argument("--work-dir", default=".suite-tmp/worker")
    wrk.add_argument("--worker", type=int, default=0)
    wrk.set_defaults(func=cmd_recover_worker)
    stage_data.add_parsers(sub)
    dashboard.add_parsers(sub)
    stage_compress.add_parsers(sub)
    stage_speed.add_parsers(sub)
    stage_report.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as exc:
        if os.environ.get("SUITE_DEBUG"):
            raise
        print(f"suite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"suite {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
