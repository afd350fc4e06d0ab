"""`suite report`: every stage's tidy files under reports/ -> reports/README.md.

The README opens with the paper-vs-measured verdict table (suite.reproduction_report), then a
section per stage; a stage that has not run says which command fills it. Offline and
deterministic: it reads files only (no MLflow, no clock), and writes one file atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from suite import reproduction_report, results


def stale_compare(reports_dir: Path) -> list[str]:
    """Speed reports newer than speed_compare.csv (`suite compare` is outside the DVC graph)."""
    table = reports_dir / "speed_compare.csv"
    if not table.is_file():
        return []
    newer = [p for p in sorted((reports_dir / "speed").glob("*.json"))
             if p.stat().st_mtime > table.stat().st_mtime]  # fmt: skip
    return [p.name for p in newer]


def cmd_report(args: argparse.Namespace) -> int:
    """Build the README from --reports-dir and write it to --out."""
    reports_dir = Path(args.reports_dir)
    out = Path(args.out) if args.out else reports_dir / "README.md"
    if not reports_dir.is_dir():
        raise FileNotFoundError(f"no reports folder at {reports_dir} (run `dvc repro` first)")
    inputs = reproduction_report.load(reports_dir)
    text = reproduction_report.render(inputs)
    results.atomic_write_text(out, text)
    counts = Counter(c.verdict.split(" (")[0] for c in reproduction_report.claims(inputs))
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    print(f"{out}: {sum(counts.values())} claims: {summary}", flush=True)
    stale = stale_compare(reports_dir)
    if stale:
        print(f"[report] note: speed_compare.csv predates {', '.join(stale)}; run `suite compare`"
              " and `suite report` again", file=sys.stderr)  # fmt: skip
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="reports/ -> reports/README.md (verdicts first)")
    rep.add_argument("--reports-dir", default="reports", help="where the stages' tidy files are")
    rep.add_argument("--out", help="default: <reports-dir>/README.md")
    rep.set_defaults(func=cmd_report)
