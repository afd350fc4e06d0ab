"""What every stage's command shares: the --params/--profile parser and the stage logger."""

from __future__ import annotations

import argparse
import sys

from suite import params


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
