"""Transform recovery (docs/protocol.md): learn a butterfly factorization of a matrix.

params: the knobs; train: loss, Adam over trials, L-BFGS polish; search: one cell as an Optuna
study run by workers; grid: the cells and their records; baselines: the closed-form rows.
"""

from tasks.recovery.baselines import BASELINES, baselines
from tasks.recovery.grid import CellRecord, cells, paper_rmse, recover_cell, run_grid
from tasks.recovery.params import (
    RECOVERED_RMSE,
    FieldError,
    HeartbeatParams,
    RecoverParams,
    SearchParams,
)
from tasks.recovery.search import (
    CellResult,
    StalledOrHyperband,
    learn_cell,
    open_cells,
    open_storage,
    run_worker,
    serve,
    trial_pool,
)
from tasks.recovery.train import LBFGSConfig, mse, polish

__all__ = [
    "BASELINES",
    "RECOVERED_RMSE",
    "CellRecord",
    "CellResult",
    "FieldError",
    "HeartbeatParams",
    "LBFGSConfig",
    "RecoverParams",
    "SearchParams",
    "StalledOrHyperband",
    "baselines",
    "cells",
    "learn_cell",
    "mse",
    "open_cells",
    "open_storage",
    "paper_rmse",
    "polish",
    "recover_cell",
    "run_grid",
    "run_worker",
    "serve",
    "trial_pool",
]
