"""Measurements of the discrete row: the target grid, and `--matrix` on random exact members.

`python -m tasks.recovery_discrete_bench grid --sizes 8 16 ... 1024` runs the discrete row
(tasks/recovery/discrete.py, params.yaml's recover.discrete) on every target x N and writes
reports/recovery_discrete_grid.{csv,md}; `... members --models bp bpp --sizes 64 256 1024
--seeds 5` builds random exact members (`member`) and runs what `suite recover --matrix`
runs first (`discrete_search` over bp, bpp, bpbp) and writes reports/recovery_members.{csv,md}.
Rows are appended as they finish, so a stopped run keeps what it measured. Wall and CPU
seconds of this process (one thread).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import torch

from kernels.butterfly import ButterflyStack
from tasks.recovery.discrete import discrete_search, fit_discrete
from tasks.recovery.params import RECOVERED_RMSE, DiscreteParams
from tasks.targets import TARGETS, target_matrix

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["grid", "members"])
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
    torch.set_num_threads(1)
    dp = DiscreteParams()  # the defaults are params.yaml's recover.discrete
    (run_grid if args.what == "grid" else run_members)(args, dp)


if __name__ == "__main__":
    main()
