"""Measurements of the discrete row: the target grid, and `--matrix` on random exact members.

`python -m tasks.recovery_discrete_bench grid --sizes 8 16 ... 1024` runs the discrete row
(tasks/recovery/discrete.py, params.yaml's recover.discrete) on every target x N and writes
reports/recovery_discrete_grid.{csv,md}; `... members --models bp bpp --sizes 64 256 1024
--seeds 5` builds random exact members (`member`) and runs what `suite recover --matrix`
runs first (`discrete_search` over bp, bpp, bpbp) and writes reports/recovery_members.{csv,md}.
Rows are appended as they finish, so a stopped run keeps what it measured; `... summary`
writes the two tables as markdown (.md). Wall and CPU seconds of this process (one thread).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernels.butterfly import ButterflyStack
from tasks.recovery.discrete import discrete_search, fit_discrete
from tasks.recovery.params import RECOVERED_RMSE, DiscreteParams
from tasks.targets import TARGETS, target_matrix

if TYPE_CHECKING:
    import pandas as pd

MODEL_OF = {"dct": "bpp", "dst": "bpp", "convolution": "bpbp"}  # the others: bp (params.yaml)
GRID = ("target", "n", "model", "rmse_paper", "recovered", "seconds", "cpu_seconds", "found")
MEMBERS = (
    *("model", "n", "complex", "seed", "found_model", "rmse_paper", "recovered"),
    *("seconds", "cpu_seconds", "found"),
)


def member(n: int, model: str, complex_: bool, seed: int, per_level: bool = True) -> torch.Tensor:
    """A random exact member: Haar-unitary (real: orthogonal) tied twiddles, a random hard
    choice at every level (per_level; else one shared triple) of every permutation."""
    g = torch.Generator().manual_seed(seed)
    stack = ButterflyStack(
        n, model, complex=complex_, tied=True, share_logits=not per_level, init="ortho",
        generator=g,
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in stack.permutations():
            on = torch.rand(p.logits.shape, generator=g, dtype=torch.float64) < 0.5
            p.logits.copy_(torch.where(on, 10.0, -10.0))
        stack.round_permutations_()
        return stack.matrix().detach()


def _paper(value: float, complex_: bool) -> float:
    return value / math.sqrt(2) if complex_ else value


class _Table:
    """A CSV appended row by row (header once)."""

    def __init__(self, path: Path, columns: tuple[str, ...], fresh: bool):
        self.path, self.columns = path, columns
        if fresh or not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(columns)

    def add(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in self.columns])
        print(" ".join(f"{c}={row[c]}" for c in self.columns), flush=True)


def run_grid(args: argparse.Namespace, dp: DiscreteParams) -> None:
    table = _Table(Path(args.out) / "recovery_discrete_grid.csv", GRID, args.fresh)
    for target in args.targets:
        for n in args.sizes:
            m = target_matrix(target, n)
            model = MODEL_OF.get(target, "bp")
            exact = RECOVERED_RMSE * (math.sqrt(2) if m.is_complex() else 1.0)
            res = fit_discrete(m, model, dp, exact)
            value = _paper(res.rmse, m.is_complex())
            table.add(
                dict(
                    target=target, n=n, model=model, rmse_paper=f"{value:.3e}",
                    recovered=value <= RECOVERED_RMSE, seconds=f"{res.seconds:.2f}",
                    cpu_seconds=f"{res.cpu_seconds:.2f}",
                    found=json.dumps(res.permutation, sort_keys=True),
                )
            )  # fmt: skip


def run_members(args: argparse.Namespace, dp: DiscreteParams) -> None:
    table = _Table(Path(args.out) / "recovery_members.csv", MEMBERS, args.fresh)
    for model in args.models:
        for n in args.sizes:
            for complex_ in [k == "complex" for k in args.kinds]:
                for seed in range(args.seeds):
                    m = member(n, model, complex_, 1000 * n + seed, per_level=model != "bpbp")
                    exact = RECOVERED_RMSE * (math.sqrt(2) if complex_ else 1.0)
                    res = discrete_search(m, ["bp", "bpp", "bpbp"], dp, exact)
                    value = _paper(res.rmse, complex_)
                    table.add(
                        dict(
                            model=model, n=n, complex=complex_, seed=seed,
                            found_model=res.model, rmse_paper=f"{value:.3e}",
                            recovered=value <= RECOVERED_RMSE, seconds=f"{res.seconds:.2f}",
                            cpu_seconds=f"{res.cpu_seconds:.2f}",
                            found=json.dumps(res.permutation, sort_keys=True),
                        )
                    )  # fmt: skip


def _sci(x: float) -> str:
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def beside_learned(grid: pd.DataFrame, out: Path) -> None:
    """reports/recovery_full_discrete.csv: the full profile's table (reports/recovery_full.csv)
    with the measured discrete rows added as method "discrete", so that `suite recover-report
    --name recovery_full_discrete` draws both rows side by side (the recover stage itself
    computes the discrete row once re-run)."""
    import pandas as pd

    full_csv = out / "recovery_full.csv"
    if not full_csv.is_file():
        return
    full = pd.read_csv(full_csv)
    full = full[full.method != "discrete"]
    is_complex = grid.target.map(lambda t: target_matrix(t, 8).is_complex())
    rows = pd.DataFrame(
        {
            "target": grid.target,
            "n": grid.n,
            "method": "discrete",
            "model": grid.model,
            "rmse": grid.rmse_paper * is_complex.map({True: math.sqrt(2), False: 1.0}),
            "rmse_paper": grid.rmse_paper,
            "recovered": grid.recovered,
            "trials": 0,
            "steps": 0,
            "seconds": grid.seconds,
            "budget_capped": False,
            "profile": "discrete-bench",
            "run_id": "",
            "env_id": "",
            "commit": "",
            "best_params": grid.found,
        }
    )
    merged = pd.concat([full, rows], ignore_index=True)
    merged.to_csv(out / "recovery_full_discrete.csv", index=False)


def summarize(out: Path) -> None:
    """reports/recovery_discrete_grid.md and recovery_members.md from the two CSVs."""
    import pandas as pd

    grid_csv, members_csv = out / "recovery_discrete_grid.csv", out / "recovery_members.csv"
    if grid_csv.is_file():
        df = pd.read_csv(grid_csv)
        ns = sorted(df.n.unique())
        lines = [
            "Discrete row on the target grid (`python -m tasks.recovery_discrete_bench grid`): "
            "RMSE (paper's convention; ✓ <= 1e-4), wall seconds and CPU seconds per cell, one "
            "thread, niced on a shared 2-core CPU",
            "",
            "| target | model | " + " | ".join(f"N={n}" for n in ns) + " |",
            "|" + "---|" * (len(ns) + 2),
        ]
        for t in [t for t in TARGETS if t in set(df.target)]:
            sub = df[df.target == t].set_index("n")
            row = [t, str(sub.model.iloc[0])]
            for n in ns:
                if n not in sub.index:
                    row.append("—")
                    continue
                r = sub.loc[n]
                mark = " ✓" if bool(r.recovered) else ""
                row.append(
                    f"{_sci(r.rmse_paper)}{mark} ({r.seconds:.2g} s, {r.cpu_seconds:.2g} cpu)"
                )
            lines.append("| " + " | ".join(row) + " |")
        structured = df[~df.target.isin(["legendre", "randn"])]
        lines += [
            "",
            f"Structured cells recovered: {int(structured.recovered.sum())} of {len(structured)}; "
            f"all cells {df.seconds.sum():.0f} s of wall time, {df.cpu_seconds.sum():.0f} s CPU.",
        ]
        (out / "recovery_discrete_grid.md").write_text("\n".join(lines) + "\n")
        beside_learned(df, out)
    if members_csv.is_file():
        df = pd.read_csv(members_csv)
        lines = [
            "`suite recover --matrix`'s discrete search on random exact members "
            "(`python -m tasks.recovery_discrete_bench members`): Haar-unitary (complex) or "
            "orthogonal (real) tied twiddles; bp and bpp with a random choice at every level of P "
            "(bpp: and P', one level), bpbp with a random shared triple per permutation",
            "",
            "| class | N | entries | recovered | found as | wall s (median, max) "
            "| CPU s (median, max) |",
            "|---|---|---|---|---|---|---|",
        ]
        for (model, n, cplx), sub in df.groupby(["model", "n", "complex"], sort=False):
            found = ", ".join(f"{k} {v}" for k, v in sub.found_model.value_counts().items())
            lines.append(
                f"| {model} | {n} | {'complex' if cplx else 'real'} | "
                f"{int(sub.recovered.sum())}/{len(sub)} | {found} | "
                f"{sub.seconds.median():.2g}, {sub.seconds.max():.2g} | "
                f"{sub.cpu_seconds.median():.2g}, {sub.cpu_seconds.max():.2g} |"
            )
        (out / "recovery_members.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["grid", "members", "summary"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--models", nargs="+", default=["bp", "bpp", "bpbp"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--kinds", nargs="+", choices=["complex", "real"], default=["complex", "real"]
    )
    parser.add_argument("--out", default="reports")
    parser.add_argument("--fresh", action="store_true", help="start the CSV anew")
    args = parser.parse_args(argv)
    if args.what == "summary":
        summarize(Path(args.out))
        return
    torch.set_num_threads(1)
    dp = DiscreteParams()  # the defaults are params.yaml's recover.discrete
    (run_grid if args.what == "grid" else run_members)(args, dp)


if __name__ == "__main__":
    main()
