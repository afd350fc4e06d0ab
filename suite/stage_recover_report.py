"""`suite recover-report`: the recovery table -> its figure and summary (no search re-run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from suite import report, results


def cmd_recover_report(args: argparse.Namespace) -> int:
    out = Path(args.reports)
    df = results.read_table(out / f"{args.name}.csv", results.RECOVERY_COLUMNS)
    figure = out / "figures" / f"{args.name}.png"
    report.recovery_figure(df, figure)
    results.atomic_write_text(out / f"{args.name}.md", report.recovery_markdown(df))
    print(f"[recover-report] {out / args.name}.csv -> {figure}, {out / args.name}.md")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("recover-report", help="recovery table -> figure and summary")
    rep.add_argument("--reports", default="reports", help="folder of <name>.csv")
    rep.add_argument("--name", default="recovery", help="file stem, e.g. recovery_full")
    rep.set_defaults(func=cmd_recover_report)
