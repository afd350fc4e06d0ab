"""`suite fetch-data` and `suite data`: the raw CIFAR-10 source -> canonical arrays.

fetch-data (outside DVC, run by `make repro`): the first usable source of params.yaml's
`data.sources` (or $CIFAR10_SOURCE) is copied or downloaded into data/, which data.dvc tracks,
and `dvc add data` records it. data (the DVC stage): data/<archive> -> outputs/cifar10/
(cifar10.npz + provenance.json) and a copy of the provenance under reports/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from suite import params, results
from suite.stage import log, params_parser

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def data_sources(path: str | Path) -> list[str]:
    """params.yaml's data.sources, checked: a non-empty list of strings."""
    raw = params.load_yaml(path)
    section = raw.get("data")
    if not isinstance(section, dict) or set(section) != {"sources"}:
        raise params.ParamsError("'data' must be a mapping with exactly one key, 'sources'")
    sources = section["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise params.ParamsError(f"'data.sources' must be a non-empty list of strings: {sources!r}")
    return sources


def find_archive(data_dir: Path) -> Path:
    """The single raw archive in data_dir; a one-line error when there is none or several."""
    found = (
        sorted(p for p in data_dir.glob("*") if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
        if data_dir.is_dir()
        else []
    )
    if not found:
        raise FileNotFoundError(
            f"no CIFAR-10 archive in {data_dir}/: run `suite fetch-data` (or `make repro`)"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{data_dir}/ holds several archives ({names}); keep exactly one")
    return found[0]


def _dvc_add(data_dir: Path) -> None:
    """Record data_dir in data.dvc (skipped outside a DVC repo or without dvc on PATH)."""
    if not Path(".dvc").is_dir() or shutil.which("dvc") is None:
        log("[fetch-data] not a DVC repo or no dvc on PATH: data.dvc not updated")
        return
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        ["dvc", "add", "--quiet", str(data_dir)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise ValueError(f"dvc add {data_dir} failed: {last[-1] if last else proc.returncode}")


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from tasks import cifar10

    source = cifar10.resolve_source(data_sources(args.params))
    log(f"[fetch-data] source: {source}")
    archive = cifar10.fetch(source, Path(args.data_dir))
    if not args.no_dvc_add:
        _dvc_add(Path(args.data_dir))
    print(f"{archive} ({cifar10.detect_kind(archive)})")
    return 0


def _progress():
    """A tqdm-backed (done, total) callback; silent when stderr is not a terminal."""
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="img", disable=not sys.stderr.isatty())
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def cmd_data(args: argparse.Namespace) -> int:
    from tasks import cifar10

    archive = find_archive(Path(args.data_dir))
    log(f"[data] {archive} -> {args.out}")
    prov = cifar10.prepare(archive, Path(args.out), progress=_progress())
    results.atomic_write_json(Path(args.provenance), prov)
    print(
        f"{prov['source_kind']} {prov['source_name']}: {prov['n_train']} train, "
        f"{prov['n_test']} test images -> {args.out} (sha256 {prov['source_sha256'][:12]})"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fetch = sub.add_parser(
        "fetch-data",
        help="copy or download the raw CIFAR-10 source into data/ (data.dvc)",
        parents=[params_parser(profile=False)],
    )
    fetch.add_argument("--data-dir", default="data")
    fetch.add_argument("--no-dvc-add", action="store_true", help="do not update data.dvc")
    fetch.set_defaults(func=cmd_fetch_data)
    data = sub.add_parser("data", help="raw CIFAR-10 archive -> canonical arrays + provenance")
    data.add_argument("--data-dir", default="data")
    data.add_argument("--out", default="outputs/cifar10")
    data.add_argument("--provenance", default="reports/data_provenance.json")
    data.set_defaults(func=cmd_data)
