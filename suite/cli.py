"""`suite <stage>`: read params, call a task, write results atomically, log to MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from suite import (
    dashboard,
    environment,
    stage_compress,
    stage_data,
    stage_recover,
    stage_recover_report,
    stage_report,
    stage_speed,
    tracking,
)


def cmd_env(args: argparse.Namespace) -> int:
    print(json.dumps(environment.fingerprint(), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="suite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    env = sub.add_parser("env", help="print the hardware and software fingerprint")
    env.set_defaults(func=cmd_env)
    stage_recover.add_parsers(sub)
    stage_recover_report.add_parsers(sub)
    stage_data.add_parsers(sub)
    dashboard.add_parsers(sub)
    stage_compress.add_parsers(sub)
    stage_speed.add_parsers(sub)
    stage_report.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per cell
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
