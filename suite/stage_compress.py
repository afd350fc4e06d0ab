"""`suite compress-train`, `suite compress --method M` (one DVC stage per method) and
`suite compress-report`.

compress-train: every method's training runs in one pool of `workers` processes (kept runs,
tasks.compression.train_all) -> outputs/compress-train.json (chosen lrs, wall time, runs).

compress: params + outputs/cifar10 -> outputs/compress/<method>/ (rows.csv, curves.csv,
seed<k>.pt, environment.json), written whole or not at all; an MLflow parent run per call with
a child run per seed holding the learning curve, the CIFAR-10 dataset input (digest = the data
checksum) and the best-validation net as an MLflow 3 logged model with its metrics linked.
compress-report: every method's rows.csv -> reports/compression.csv, .md, metrics and the
accuracy-against-parameters figure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from kernels.atomic import clean_stale, sibling
from suite import compression_report, environment, paper, params, results, tracking
from suite.stage import code_digest, log, params_parser, scratch

if TYPE_CHECKING:
    from tasks.compression import RunCache

CURVE_COLUMNS = ("method", "seed", "lr", "epoch", "train_loss", "val_accuracy", "seconds")
PROTOCOL_COLUMNS = ("stopped_by", "still_improving", "patience", "max_epochs", "lr_search")
"""Written beside results.COMPRESSION_COLUMNS: how each run ended and what the lr search saw."""
MODEL_TYPE = "cifar10-hidden-layer-net"


def compress_params(path: str, profile: str | None):
    from tasks.compression import CompressParams

    return params.load_stage(path, "compress", CompressParams, profile)


TRAINING_CODE = ("kernels/**/*.py", "tasks/compression.py", "tasks/cifar10.py")
"""What a training run's numbers depend on besides data and params: the compress stage's code
deps in dvc.yaml."""


def run_cache(prov: dict[str, Any]) -> RunCache:
    """Finished runs kept under .suite-tmp/compress-runs (tasks.compression.RunCache), keyed by
    their knobs, lr, seed, the data's checksum and the digest of TRAINING_CODE. Not a DVC dep:
    a kept run stands for the run it keys (same records with or without it, tested); delete the
    folder to train everything again."""
    from tasks.compression import RunCache

    context = {"arrays_sha256": prov["arrays_sha256"], "code": code_digest(TRAINING_CODE)}
    return RunCache(scratch() / "compress-runs", context)


def _row(rec: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in rec.items() if k not in ("curve", "state", "net", "lr_candidates")}
    row["compression_factor"] = paper.compression_factor(int(rec["hidden_params"]))
    return {**row, **extra}


def dataset_ref(prov: dict[str, Any]) -> tracking.DatasetRef:
    """The CIFAR-10 source as an MLflow dataset input: the DVC-tracked file under data/."""
    return tracking.DatasetRef(
        name=f"cifar10-{prov['source_kind']}",
        checksum=prov["source_sha256"],
        source=f"data/{prov['source_name']}",
        profile={k: prov.get(k) for k in ("n_train", "n_test", "arrays_sha256", "source_kind")},
    )


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers (flags as 0/1) of a row, minus its keys."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and k not in ("seed", "run_id") and math.isfinite(float(v))
    }


def cmd_compress_train(args: argparse.Namespace) -> int:
    """Every method's training runs in one pool of `workers` processes, kept for the
    compress@<method> stages (tasks.compression.train_all); writes a small manifest."""
    from tasks import cifar10
    from tasks.compression import train_all

    profile, p = compress_params(args.params, args.profile)
    arrays, prov = cifar10.load(Path(args.data))
    kept = run_cache(prov)
    log(f"[compress-train] profile={profile}: {len(p.methods)} methods -> {kept.folder}")
    summary = train_all(arrays, p, log, kept)
    fp = environment.fingerprint()
    manifest = {"profile": profile, "methods": p.methods, **summary, **kept.context,
                "device": fp["device"], "commit": fp["commit"], "env_id": fp["env_id"]}  # fmt: skip
    results.atomic_write_json(Path(args.out), manifest)
    log(
        f"[compress-train] {summary['runs']} runs ({summary['runs_reused']} kept) in "
        f"{summary['wall_seconds'] / 60:.1f} min on {p.workers} worker(s) -> {args.out}"
    )
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from tasks import cifar10
    from tasks.compression import N_CLASSES, N_FEATURES, run_method

    profile, p = compress_params(args.params, args.profile)
    if args.method not in p.methods:
        raise params.ParamsError(
            f"method {args.method!r} is not in compress.methods ({', '.join(p.methods)})"
        )
    arrays, prov = cifar10.load(Path(args.data))
    fp = environment.fingerprint()
    out = Path(args.out or f"outputs/compress/{args.method}")
    clean_stale(out)  # the work folders of killed runs
    work = sibling(out, "tmp")
    uri = tracking.configure(Path.cwd())
    tags = environment.run_tags(
        fp,
        "compress",
        profile,
        method=args.method,
        data_sha256=prov["source_sha256"],
        data_source=prov["source_kind"],
    )
    run_name = f"compress-{args.method}-{profile}-{fp['commit'][:8]}"
    log(f"[compress] {args.method} profile={profile} tracking={uri}")
    rows, curves = [], []
    data = dataset_ref(prov)
    try:
        with tracking.stage_run(
            "compress", run_name, {"profile": profile, **asdict(p)}, tags
        ) as run:
            run.log_dataset(run.run_id, data)
            for rec in run_method(args.method, arrays, p, log, run_cache(prov)):
                row = _row(
                    rec,
                    {
                        "latency_threads": p.latency_threads,
                        "data_source": f"{prov['source_kind']}:{prov['source_name']}",
                        "data_sha256": prov["source_sha256"],
                        "device": fp["device"],
                        "profile": profile,
                        "run_id": run.run_id,
                        "env_id": fp["env_id"],
                        "commit": fp["commit"],
                    },
                )
                ckpt = work / f"seed{rec['seed']}.pt"
                torch.save({"method": args.method, "state": rec["state"]}, ckpt)
                for c in rec["curve"]:
                    curves.append(
                        {"method": args.method, "seed": rec["seed"], "lr": rec["lr"], **c}
                    )
                name = f"{args.method}-seed{rec['seed']}"
                run.child(
                    name,
                    {
                        "method": args.method,
                        "seed": rec["seed"],
                        "lr": rec["lr"],
                        "lr_candidates": rec["lr_candidates"],
                        "lr_search": rec["lr_search"],
                        "profile": profile,
                    },
                    _metrics(row),
                    {"method": args.method, "seed": str(rec["seed"]),
                     "stopped_by": rec["stopped_by"]},
                    [ckpt],
                    [
                        {
                            "step": c["epoch"],
                            "train_loss": c["train_loss"],
                            "val_accuracy": c["val_accuracy"],
                        }
                        for c in rec["curve"]
                    ],
                    datasets=[data],
                    models={name: rec["net"]},
                    model_type=MODEL_TYPE,
                    io_shapes=((-1, N_FEATURES), (-1, N_CLASSES)),
                )  # fmt: skip
                rows.append(row)
            df = pd.DataFrame(rows)
            cols = (*results.COMPRESSION_COLUMNS, *PROTOCOL_COLUMNS)
            results.write_table(df, work / "rows.csv", cols)
            results.write_table(pd.DataFrame(curves), work / "curves.csv", CURVE_COLUMNS)
            results.atomic_write_json(work / "environment.json", fp)
            run.log_metrics(
                {
                    "test_accuracy": df.test_accuracy.mean(),
                    "hidden_params": df.hidden_params.iloc[0],
                }
            )
        results.replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = df.test_accuracy
    log(
        f"[compress] {args.method}: test {best.mean():.2f}% over {len(df)} seed(s), "
        f"{int(df.hidden_params.iloc[0])} hidden params -> {out}"
    )
    return 0


def collect(
    runs: Path, methods: list[str], profile: str, allow_missing: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The rows and curves of the configured methods, and the methods without rows of
    `profile`; such a method (no rows, or rows of another profile: a folder left from an
    earlier run) is an error unless allow_missing (a report of a run still in progress).

    Curves get their run's profile (from the method's rows).
    """
    rows, curves, missing = [], [], []
    for method in methods:
        folder = runs / method
        if allow_missing and not (folder / "rows.csv").is_file():
            missing.append(method)
            continue
        r = results.read_table(folder / "rows.csv", results.COMPRESSION_COLUMNS)
        if set(r.profile) != {profile}:
            if allow_missing:
                missing.append(method)
                continue
            raise ValueError(
                f"{folder / 'rows.csv'} holds rows of profile {sorted(set(r.profile))}, not "
                f"{profile!r}: run compress@{method} with profile {profile}"
            )
        c = results.read_table(folder / "curves.csv", CURVE_COLUMNS)
        rows.append(r)
        curves.append(c.assign(profile=r.profile.iloc[0]))
    if not rows:
        raise FileNotFoundError(f"no method of compress.methods has rows under {runs}")
    return pd.concat(rows, ignore_index=True), pd.concat(curves, ignore_index=True), missing


def not_run(df: pd.DataFrame, methods: list[str]) -> tuple[str, list[str]] | None:
    """(the claim's profile, the configured methods it has no rows for), or None: rows kept
    from another profile's unfinished run are partial too, whichever profile runs now."""
    profile = compression_report.best_profile(df)
    have = set(df.method[df.profile == profile]) if "profile" in df else set(df.method)
    missing = [m for m in methods if m not in have]
    return (profile, missing) if missing else None


def keep_other_profiles(new: pd.DataFrame, path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """`new` plus the rows of the other profiles already in the table at `path`.

    The quick and the paper profile write one table (DVC `persist`): a run replaces the rows
    of its own profile and keeps the others', so both stay side by side.
    """
    if not path.is_file():
        return new
    old = results.read_table(path, required)
    if "profile" not in old:
        return new
    others = old[~old.profile.isin(set(new.profile))]
    return pd.concat([others, new], ignore_index=True) if len(others) else new


def _train_manifest(path: Path, profile: str) -> dict[str, Any] | None:
    """compress-train's manifest if it describes this profile's run, else None."""
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("profile") == profile else None


def cmd_compress_report(args: argparse.Namespace) -> int:
    if args.figure_only:  # a figure edit: redraw from the committed table, no runs needed
        df = results.read_table(Path(args.table), results.COMPRESSION_COLUMNS)
        compression_report.figure(df, Path(args.figure))
        log(f"[compress-report] {args.table} -> {args.figure}")
        return 0
    profile, p = compress_params(args.params, args.profile)
    df, curves, missing = collect(Path(args.runs), p.methods, profile, args.allow_missing)
    if missing:
        log(f"[compress-report] partial: {len(missing)} method(s) not run yet: {missing}")
    df = keep_other_profiles(df, Path(args.table), results.COMPRESSION_COLUMNS)
    partial = not_run(df, p.methods)
    if partial and partial[0] != profile:
        log(f"[compress-report] profile {partial[0]} (the claim's) lacks {partial[1]}")
    curves = keep_other_profiles(curves, Path(args.curves), CURVE_COLUMNS)
    results.write_table(df, Path(args.table), results.COMPRESSION_COLUMNS)
    results.write_table(curves, Path(args.curves), (*CURVE_COLUMNS, "profile"))
    compression_report.figure(df, Path(args.figure))
    text = compression_report.markdown(df, partial)
    trained = _train_manifest(Path(args.train_manifest), profile)
    if trained:
        text += "\n" + compression_report.train_time(trained) + "\n"
    results.atomic_write_text(Path(args.summary), text)
    metrics = compression_report.headline(df, partial)
    if trained:
        metrics["train_wall_minutes"] = round(trained["wall_seconds"] / 60, 2)
    results.atomic_write_json(Path(args.metrics), {"profile": profile, **metrics})
    uri = tracking.configure(Path.cwd())
    fp = environment.fingerprint()
    tags = environment.run_tags(fp, "compress", profile)
    with tracking.stage_run(
        "compress", f"compress-report-{profile}", {"profile": profile}, tags
    ) as run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        run.set_tags({k: metrics[k] for k in ("gap_verdict", "best_butterfly") if k in metrics})
        for path in (args.table, args.figure, args.summary):
            run.log_artifact(path)
    log(f"[compress-report] {len(df)} rows -> {args.table}, {args.figure} ({uri})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    com = sub.add_parser(
        "compress",
        help="CIFAR-10 single-hidden-layer compression, one method",
        parents=[params_parser()],
    )
    com.add_argument("--method", required=True)
    com.add_argument("--data", default="outputs/cifar10")
    com.add_argument("--out", help="default: outputs/compress/<method>")
    com.set_defaults(func=cmd_compress)
    pre = sub.add_parser(
        "compress-train",
        help="every method's training runs in one pool (compress@<method> then loads them)",
        parents=[params_parser()],
    )
    pre.add_argument("--data", default="outputs/cifar10")
    pre.add_argument("--out", default="outputs/compress-train.json")
    pre.set_defaults(func=cmd_compress_train)
    rep = sub.add_parser(
        "compress-report",
        help="all methods' rows -> table, figure, metrics",
        parents=[params_parser()],
    )
    rep.add_argument("--runs", default="outputs/compress")
    rep.add_argument("--train-manifest", default="outputs/compress-train.json")
    rep.add_argument("--table", default="reports/compression.csv")
    rep.add_argument("--curves", default="reports/compression_curves.csv")
    rep.add_argument("--figure", default="reports/figures/compression.png")
    rep.add_argument("--summary", default="reports/compression.md")
    rep.add_argument("--metrics", default="reports/compression_metrics.json")
    rep.add_argument(
        "--figure-only",
        action="store_true",
        help="only redraw --figure from --table (no outputs/compress needed)",
    )
    rep.add_argument(
        "--allow-missing",
        action="store_true",
        help="report a run still in progress: methods without rows are listed, and a claim "
        "that misses butterfly candidates is provisional (never used by dvc.yaml)",
    )
    rep.set_defaults(func=cmd_compress_report)
