"""What every stage's command shares: the --params/--profile parser, the stage logger, the
scratch folder and the digest of the code a kept result depends on."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from suite import params

REPO = Path(__file__).resolve().parents[1]


def scratch() -> Path:
    """./.suite-tmp (git-ignored): kept results and work folders of the stages."""
    path = Path.cwd() / ".suite-tmp"
    path.mkdir(exist_ok=True)
    return path


def code_digest(patterns: tuple[str, ...], root: Path = REPO) -> str:
    """sha256 of the files matching `patterns` (globs under root, paths and contents): a change
    there invalidates the results kept under that digest."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def log(msg: str) -> None:
    """One progress line on stderr, flushed (stdout stays for a command's result)."""
    print(msg, file=sys.stderr, flush=True)


def params_parser(
    profile: bool = True, default: str | None = "params.yaml"
) -> argparse.ArgumentParser:
    """The parent parser (argparse `parents=`) of a stage that reads params.yaml; default None
    lets the stage find one itself (recover: ./params.yaml, else the suite's own)."""
    parent = argparse.ArgumentParser(add_help=False)
    helptext = (
        "the params file"
        if default
        else "params file (default: ./params.yaml, else the suite's own)"
    )
    parent.add_argument("--params", default=default, help=helptext)
    if profile:
        parent.add_argument(
            "--profile", choices=params.PROFILES, help="override params.yaml's profile"
        )
    return parent
