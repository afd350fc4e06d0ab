"""`suite recover`: the transform-recovery grid (or one user matrix), and `suite recover-worker`.

The grid writes one tidy table (reports/<name>.csv), its metrics and the environment; the
figure and the summary are the `recover-report` stage (suite/stage_recover_report.py), so a
plot edit never re-runs the search. Finished cells are kept under .suite-tmp/recover-cells/,
keyed by the cell's params and the code that computes it, so a killed run resumes there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from suite import environment, params, results, tracking
from suite.stage import code_digest, log, params_parser, scratch

REPO = Path(__file__).resolve().parents[1]
CODE = ("kernels/*.py", "kernels/cpu/*.py", "tasks/targets.py", "tasks/recovery/*.py")
LEARNED = ("bp", "bpp", "bpbp")


def recover_params(args: argparse.Namespace):
    from tasks.recovery import RecoverParams

    return params.load_stage(params_path(args.params), "recover", RecoverParams, args.profile)


def params_path(given: str | None) -> Path:
    """--params, else ./params.yaml, else the suite's own params.yaml (its built-in defaults),
    so `suite recover --matrix` runs from any folder."""
    if given is not None:
        return Path(given)
    here = Path("params.yaml")
    if here.is_file() or not (REPO / "params.yaml").is_file():
        return here
    return REPO / "params.yaml"


def _cell_key(p: Any, name: str, n: int, model: str, code: str) -> str:
    """What a cell's result depends on: its own slice of the search (SearchParams.cell_slice), the
    baselines, the cell and the code. Profiles that agree on a cell share its kept result."""
    search = p.search_for(name, n).cell_slice(n, model)
    discrete = None if p.discrete is None else asdict(p.discrete)
    cell = {"search": search, "baselines": p.baselines, "cell": [name, n, model]}
    blob = json.dumps({**cell, "discrete": discrete}, sort_keys=True)
    return hashlib.sha256(f"{blob}/{code}".encode()).hexdigest()[:16]


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per finished cell with the time left: the caps of the cells still to run,
    scaled by the fraction of its cap a finished cell has used so far."""

    def __init__(self, caps: list[float]):
        self.caps, self.done, self.used, self.t0, self.hits = caps, 0, 0.0, time.time(), 0

    def step(self, seconds: float, recovered: bool, label: str) -> str:
        self.used += min(seconds / self.caps[self.done], 1.0)
        self.done += 1
        self.hits += int(recovered)
        rest = self.caps[self.done :]
        share = self.used / self.done
        elapsed = time.time() - self.t0
        return (
            f"[recover] {self.done}/{len(self.caps)} cells, {self.hits} recovered, "
            f"{_fmt(elapsed)} elapsed, about {_fmt(share * sum(rest))} left "
            f"(at most {_fmt(sum(rest))}) | {label}"
        )


def _row(rec: Any, **ctx: Any) -> dict[str, Any]:
    """A CellRecord as a table row: the schema's columns it has, plus solved_by and its hp."""
    row = {k: getattr(rec, k) for k in (*results.RECOVERY_COLUMNS, "solved_by") if hasattr(rec, k)}
    row["recovered"] = rec.recovered
    row["best_params"] = json.dumps(rec.best_params, sort_keys=True)
    return {**row, **ctx}


def _factors_folder(name: str) -> str:
    """factors for the default run (the DVC output), factors_<suffix> for recovery_<suffix>."""
    return "factors" if name == "recovery" else "factors_" + name.removeprefix("recovery_")


def cmd_recover(args: argparse.Namespace) -> int:
    if args.matrix is not None:
        return _recover_matrix(args)
    from kernels.butterfly import save_factors
    from tasks.recovery import cells, recover_cell, trial_pool

    profile, p = recover_params(args)
    if args.only:
        p = p.restricted(_parse_cells(args.only))
    fp = environment.fingerprint()
    out = Path(args.reports)
    table = out / f"{args.name}.csv"
    # the default run's factors are the recover stage's DVC output; a named run keeps its own
    factors_dir = Path(args.factors or f"outputs/recover/{_factors_folder(args.name)}")
    kept = scratch() / "recover-cells"
    kept.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recover-", dir=scratch()))
    code = code_digest(CODE)
    uri = tracking.configure(Path.cwd())
    tags = environment.run_tags(fp, "recover", profile)
    run_name = f"{args.name}-{profile}{'-only' if args.only else ''}-{fp['commit'][:8]}"
    grid = cells(p)
    progress = Progress([p.search_for(t, n).seconds_for(n) for t, n, _ in grid])
    log(f"[recover] profile={profile} {len(grid)} cells tracking={uri} kept={kept}")
    rows: list[dict[str, Any]] = []
    kept_cells = 0
    t0 = time.time()
    ctx = {"profile": profile, "env_id": fp["env_id"], "commit": fp["commit"]}
    run_params = {"profile": profile, **asdict(p), "env": fp}
    with (
        tracking.stage_run("recover", run_name, run_params, tags) as run,
        trial_pool(p.search.workers) or contextlib.nullcontext() as pool,
    ):
        for name, n, model in grid:
            key = _cell_key(p, name, n, model, code)
            cell_json, cell_pt = kept / f"{name}-{n}-{model}.json", kept / f"{name}-{n}-{model}.pt"
            if cell_json.is_file():
                cached = json.loads(cell_json.read_text())
                if cached.get("key") == key:
                    cell_rows = cached["rows"]
                    kept_cells += 1
                    log(f"[recover] {name} n={n}: kept from an earlier run of this code")
                else:
                    cell_rows = None
            else:
                cell_rows = None
            if cell_rows is None:
                records = recover_cell(name, n, model, p, work, log, pool)
                if records[0].fitted is not None:
                    meta = {"target": name, "n": n, "rmse": records[0].rmse}
                    save_factors(records[0].fitted, cell_pt, meta)
                for r in records[1:]:  # the discrete row's factors: a fast algorithm too
                    if r.method == "discrete" and r.fitted is not None:
                        meta = {"target": name, "n": n, "rmse": r.rmse, "method": "discrete"}
                        save_factors(r.fitted, kept / f"{name}-{n}-discrete.pt", meta)
                cell_rows = [_row(r) for r in records]
                results.atomic_write_json(cell_json, {"key": key, "rows": _finite(cell_rows)})
            for r in cell_rows:
                r.update(ctx, run_id=run.run_id)
                metrics = {k: r[k] for k in ("rmse", "rmse_paper", "seconds", "steps")}
                metrics["recovered"] = float(r["recovered"])
                learned = r["method"] in LEARNED and cell_pt.is_file()
                finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
                child_id = run.child(
                    f"{name}-{n}-{r['method']}",
                    {k: r[k] for k in ("target", "n", "method", "model", "trials", "best_params")},
                    finite,
                    {"target": name, "method": r["method"]},
                    [cell_pt] if learned else [],
                )
                if learned:  # the learned factors as an MLflow logged model, found from the UI
                    run.log_factors_model(child_id, f"{name}-n{n}-{model}", cell_pt, metrics=finite)
                rows.append(r)
            first = cell_rows[0]
            log(
                progress.step(
                    first["seconds"] or 0.0,
                    bool(first["recovered"]),
                    f"{name} n={n} {model}: rmse {first['rmse_paper'] or math.nan:.2e} "
                    f"({first['trials']} trials, {first['seconds']:.0f}s"
                    f"{', capped' if first['budget_capped'] else ''})",
                )
            )
        df = pd.DataFrame(rows)
        extra = [c for c in df.columns if c not in results.RECOVERY_COLUMNS]
        df = df[[*results.RECOVERY_COLUMNS, *extra]]
        results.write_table(df, table, results.RECOVERY_COLUMNS)
        learned_df = df[df.method.isin(LEARNED)]
        metrics = {
            "cells": int(len(learned_df)),
            "recovered": int(learned_df.recovered.sum()),
            "seconds": round(time.time() - t0, 1),
            "cell_seconds": round(float(learned_df.seconds.sum()), 1),
            "kept_cells": kept_cells,  # finished by an earlier run: `seconds` excludes them
            "profile": profile,
        }
        results.atomic_write_json(out / f"{args.name}_metrics.json", metrics)
        results.atomic_write_json(out / f"{args.name}_environment.json", fp)
        run.log_metrics({k: v for k, v in metrics.items() if k != "profile"})
        run.log_artifact(table)
    stage = Path(tempfile.mkdtemp(prefix="factors-", dir=scratch()))
    for name, n, model in grid:
        for pt in (kept / f"{name}-{n}-{model}.pt", kept / f"{name}-{n}-discrete.pt"):
            if pt.is_file():
                shutil.copy2(pt, stage / pt.name)
    results.replace_dir(stage, factors_dir)
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"[recover] {metrics['recovered']}/{metrics['cells']} learned cells recovered "
        f"in {metrics['seconds']:.0f}s -> {table}"
    )
    return 0


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no NaN: a cell with no finished trial keeps its RMSE as null."""
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]


def _recover_matrix(args: argparse.Namespace) -> int:
    """Find a fast factorization of a user matrix; writes DIR/result.json and DIR/factors.pt.

    --method auto: the discrete row (hard permutations: bp and bpp in closed form, then the
    bpbp fit) until one recovers, then the learned search; discrete or learned: only that one.
    """
    from kernels.butterfly import save_factors
    from tasks.recovery import RECOVERED_RMSE, learn_cell, paper_rmse, trial_pool
    from tasks.recovery.discrete import discrete_search
    from tasks.recovery.grid import ours_rmse
    from tasks.recovery.params import DiscreteParams
    from tasks.targets import load_matrix, rmse

    target = load_matrix(args.matrix)
    if args.out is None:
        raise params.ParamsError("--matrix needs --out DIR")
    profile, p = recover_params(args)
    sp = p.search
    n = target.shape[0]
    learned = args.method in ("auto", "learned")
    if learned and (n not in sp.trials or n not in sp.cell_seconds):
        raise params.ParamsError(
            f"profile {profile} has no trials/cell_seconds for n={n} (recover.search); "
            "--method discrete needs none"
        )
    models = ["bp", "bpp", "bpbp"] if args.model == "auto" else [args.model]
    is_complex = target.is_complex()
    best: tuple[float, str, Any, dict[str, Any]] | None = None  # rmse, method, stack, info
    t0, c0 = time.time(), time.process_time()
    if args.method in ("auto", "discrete"):
        dp = p.discrete or DiscreteParams()
        res = discrete_search(
            target,
            models,
            dp,
            ours_rmse(RECOVERED_RMSE, is_complex),
            lambda m: log(f"[recover] {m}"),
        )
        value = paper_rmse(res.rmse, is_complex)
        info = {"model": res.model, "permutation": res.permutation, "candidates": res.candidates}
        best = (value, "discrete", res.stack, info)
    work = None
    if learned and (best is None or best[0] > RECOVERED_RMSE):
        work = Path(tempfile.mkdtemp(prefix="recover-", dir=scratch()))
        with trial_pool(sp.workers) or contextlib.nullcontext() as pool:
            for model in models:
                log(f"[recover] {args.matrix} n={n}: learned {model}")
                res, fitted = learn_cell(target, "matrix", model, sp, work, p.storage, log, pool)
                value = math.inf if fitted is None else rmse(fitted.matrix().detach(), target)
                value = paper_rmse(value, is_complex)
                log(f"[recover] learned {model}: rmse={value:.3e}")
                info = {
                    "model": model,
                    "trials": res.trials,
                    "steps": res.steps,
                    "best_params": res.best_params,
                }
                if fitted is not None and (best is None or value < best[0]):
                    best = (value, "learned", fitted, info)
                if value <= RECOVERED_RMSE:
                    break
    if best is None:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise ValueError("no trial finished within the budget; raise recover.search.cell_seconds")
    value, method, fitted, info = best
    out = Path(args.out)
    stage = Path(
        tempfile.mkdtemp(prefix=".recover-", dir=out.parent if out.parent.exists() else None)
    )
    save_factors(fitted, stage / "factors.pt", {"matrix": str(args.matrix), "rmse": value})
    summary = {
        "rmse": value,
        "mse": value**2,
        "n": n,
        "method": method,
        **info,
        "recovered": value <= RECOVERED_RMSE,
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "profile": profile,
        "factors": "factors.pt",
        "complex_input": is_complex,
        "environment": environment.fingerprint(),
    }
    results.atomic_write_json(stage / "result.json", summary)
    results.replace_dir(stage, out)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    perm = f" permutation {info['permutation']}" if "permutation" in info else ""
    print(
        f"rmse {value:.3e} ({'recovered' if summary['recovered'] else 'not recovered'}) "
        f"method {method} model {info['model']}{perm} in {summary['seconds']:.1f}s -> "
        f"{out}/result.json"
    )
    return 0


def cmd_recover_worker(args: argparse.Namespace) -> int:
    """Join cells' studies from another process or machine (shared storage): one named study,
    or every cell a coordinator opens until none has opened for --idle seconds."""
    from tasks.recovery import run_worker, serve

    if args.study:
        run_worker(args.storage, args.work_dir, args.study, args.worker)
    else:
        serve(args.storage, args.work_dir, args.worker, args.idle, log)
    return 0


def _parse_cells(text: str) -> list[tuple[str, int]]:
    """'dft:1024,dct:512' -> [('dft', 1024), ('dct', 512)]."""
    out = []
    for item in filter(None, text.split(",")):
        target, _, n = item.partition(":")
        if not n.isdigit():
            raise ValueError(f"--only takes TARGET:N[,TARGET:N...], got {item!r}")
        out.append((target.strip(), int(n)))
    return out


def add_parsers(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser(
        "recover",
        help="transform recovery: learn butterfly factorizations",
        parents=[params_parser(default=None)],
    )
    rec.add_argument(
        "--matrix", help="a user matrix (.npy/.txt/.csv) to factorize instead of the grid"
    )
    rec.add_argument("--out", help="with --matrix: output folder for result.json and factors.pt")
    rec.add_argument("--model", default="auto", choices=["auto", "bp", "bpp", "bpbp"])
    rec.add_argument(
        "--method",
        default="auto",
        choices=["auto", "discrete", "learned"],
        help="with --matrix: discrete (hard permutations, tasks/recovery/discrete.py), learned "
        "(the paper's search), or auto: discrete, then learned if it did not recover",
    )
    rec.add_argument("--only", help="run only these cells of the profile, e.g. dft:1024,dct:1024")
    rec.add_argument("--reports", default="reports", help="folder of the table and metrics")
    rec.add_argument(
        "--name",
        default="recovery",
        help="file stem: <reports>/<name>.csv, <name>_metrics.json, <name>_environment.json",
    )
    rec.add_argument(
        "--factors",
        help="folder of the learned factors (outputs/recover/factors, or factors_<suffix> for "
        "--name recovery_<suffix>, e.g. factors_full)",
    )
    rec.set_defaults(func=cmd_recover)
    wrk = sub.add_parser(
        "recover-worker", help="join the recovery cells of a shared storage (other machines)"
    )
    wrk.add_argument("--storage", required=True, help="Optuna storage URL shared by all workers")
    wrk.add_argument("--study", help="join only this study (default: every cell as it opens)")
    wrk.add_argument(
        "--idle", type=float, default=600.0, help="exit after this many seconds with no open cell"
    )
    wrk.add_argument("--work-dir", default=".suite-tmp/worker")
    wrk.add_argument("--worker", type=int, default=1, help="seeds this worker's sampler")
    wrk.set_defaults(func=cmd_recover_worker)
