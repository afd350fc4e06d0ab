"""The grid of cells: each (target, n) learned with its model, plus the closed-form rows."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernels.butterfly import ButterflyStack
from tasks.recovery.baselines import baselines
from tasks.recovery.discrete import DiscreteResult, fit_discrete
from tasks.recovery.params import RECOVERED_RMSE, RecoverParams
from tasks.recovery.search import Log, learn_cell
from tasks.targets import rmse, target_matrix


@dataclass
class CellRecord:
    """One row of the recovery table.

    rmse = ||M_hat - M||_F / n; rmse_paper is the paper's convention (the mean over the 2 n^2
    real and imaginary parts for a complex target: rmse / sqrt(2)); recovered uses rmse_paper.
    """

    target: str
    n: int
    method: str
    model: str
    rmse: float
    rmse_paper: float
    trials: int = 0
    steps: int = 0
    seconds: float = 0.0
    budget_capped: bool = False
    solved_by: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    fitted: ButterflyStack | None = None

    @property
    def recovered(self) -> bool:
        return bool(self.rmse_paper <= RECOVERED_RMSE)


def paper_rmse(value: float, complex_target: bool) -> float:
    """Our ||.||_F / n in the paper's convention (real and imaginary parts count separately)."""
    return value / math.sqrt(2) if complex_target else value


def cells(params: RecoverParams) -> list[tuple[str, int, str]]:
    """(target, n, model) of every learned cell, in the grid's order."""
    return [(t, n, params.models[t]) for t, ns in params.sizes.items() for n in ns]


def recover_cell(
    name: str,
    n: int,
    model: str,
    params: RecoverParams,
    work_dir: Path,
    log: Log = print,
    pool: ProcessPoolExecutor | None = None,
) -> list[CellRecord]:
    """The learned row of one cell, then its closed-form rows, then the discrete row."""
    target = target_matrix(name, n)
    sp = params.search_for(name, n)
    heartbeat = asdict(params.heartbeat)
    res, fitted = learn_cell(
        target, name, model, sp, work_dir, params.storage, log, pool, heartbeat
    )
    value = res.rmse
    if fitted is not None:
        with torch.no_grad():
            value = rmse(fitted.matrix().detach(), target)
    is_complex = target.is_complex()
    rows = [
        CellRecord(
            name,
            n,
            model,
            model,
            value,
            paper_rmse(value, is_complex),
            res.trials,
            res.steps,
            res.seconds,
            res.budget_capped,
            res.solved_by,
            res.best_params,
            fitted,
        )
    ]
    t0 = time.time()
    for method, v in baselines(target, params.baselines).items():
        rows.append(
            CellRecord(
                name, n, method, method, v, paper_rmse(v, is_complex), seconds=time.time() - t0
            )
        )
    if params.discrete is not None:
        res = fit_discrete(target, model, params.discrete, ours_rmse(RECOVERED_RMSE, is_complex))
        log(f"  {name} n={n} discrete {res.model}: rmse {res.rmse:.2e} in {res.seconds:.1f}s")
        rows.append(discrete_record(name, n, res, is_complex))
    return rows


def ours_rmse(value: float, complex_target: bool) -> float:
    """The inverse of `paper_rmse`: a line in the paper's convention as ||.||_F / n."""
    return value * math.sqrt(2) if complex_target else value


def discrete_record(name: str, n: int, res: DiscreteResult, complex_target: bool) -> CellRecord:
    """The discrete row of a cell: method "discrete", the model it fitted, what it found."""
    best = {"permutation": res.permutation, "cpu_seconds": round(res.cpu_seconds, 3)}
    return CellRecord(
        name,
        n,
        "discrete",
        res.model,
        res.rmse,
        paper_rmse(res.rmse, complex_target),
        trials=res.candidates,
        seconds=res.seconds,
        best_params=best,
        fitted=res.stack,
    )


def run_grid(
    params: RecoverParams, work_dir: Path, log: Log = print, pool: ProcessPoolExecutor | None = None
) -> Iterator[CellRecord]:
    """Every cell of the grid, learned rows first within a cell."""
    for name, n, model in cells(params):
        yield from recover_cell(name, n, model, params, work_dir, log, pool)
