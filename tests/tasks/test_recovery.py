"""The recovery task: the real training loop on the smoke profile, stop-all, budget, baselines."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

from kernels.reference import butterfly_dense
from suite.params import load_stage
from tasks.recovery import RecoverParams, baselines, learn_cell, mse_loss, polish
from tasks.targets import target_matrix

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def smoke() -> RecoverParams:
    return load_stage(PARAMS, "recover", RecoverParams, "smoke")[1]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_smoke_recovers_the_dft(smoke: RecoverParams, tmp_path: Path) -> None:
    """Adam + rounded-permutation polish reach machine precision on the 8-point DFT."""
    res, model = learn_cell(target_matrix("dft", 8), "dft", "bp", smoke.search_params, tmp_path)
    assert res.rmse <= 1e-4 and model is not None
    assert res.trials >= 1 and res.steps > 0 and res.seconds > 0
    assert not res.budget_capped
    with torch.no_grad():  # the returned model really is the DFT, not just a logged number
        err = (model.matrix().to(torch.complex128) - target_matrix("dft", 8)).abs().max()
    assert err < 1e-3
    assert all(bool(p.hard) for p in model.permutations())


def test_solve_stops_every_trial(smoke: RecoverParams, tmp_path: Path) -> None:
    """Once one trial reaches the threshold, no further trial starts."""
    sp = replace(smoke.search_params, trials={8: 50}, threshold_mse=1e-3)
    res, _ = learn_cell(target_matrix("hadamard", 8), "hadamard", "bp", sp, tmp_path)
    assert res.mse <= 1e-3
    assert res.trials < 50


def test_budget_cap_is_recorded(smoke: RecoverParams, tmp_path: Path) -> None:
    """A cell that cannot finish within cell_seconds says so instead of pretending."""
    sp = replace(smoke.search_params, cell_seconds={8: 1.0}, epoch_steps=2000, max_epochs=50)
    res, _ = learn_cell(target_matrix("randn", 8), "randn", "bp", sp, tmp_path)
    assert res.budget_capped
    assert res.seconds < 60


def test_polish_reaches_machine_precision_from_a_near_solution() -> None:
    """L-BFGS with the permutation rounded converges from a perturbed exact factorization."""
    from kernels.butterfly import ButterflyStack
    from kernels.permutation import Permutation

    n = 16
    target = target_matrix("hadamard", n).to(torch.float32)
    stack = ButterflyStack(n, "bp", complex=True, real_output=True)
    with torch.no_grad():
        stack.perms[0].logits.copy_(-Permutation.bit_reversal_logits(n)[:1].abs())  # identity
        tw = torch.zeros(n - 1, 2, 2, 2)
        tw[..., 0] = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)
        tw += 1e-3 * torch.randn(tw.shape)
        stack.butterflies[0].twiddle.copy_(tw.unsqueeze(0))
    start = mse_loss(stack.matrix(), target).item()
    _, value = polish(stack, target, 50)
    assert start > 1e-7 and value < 1e-10


def test_baselines(tmp_path: Path) -> None:
    """Sparse and low-rank rows use the 2 n log2 n budget; hierarchical is exact for butterflies."""
    n = 32
    had = target_matrix("hadamard", n)
    rows = baselines(had, ["sparse", "lowrank", "sparse_lowrank", "hierarchical"])
    assert rows["sparse_lowrank"] == min(rows["sparse"], rows["lowrank"])
    assert rows["hierarchical"] < 1e-12  # identity permutation
    assert baselines(target_matrix("dft", n), ["hierarchical"])["hierarchical"] < 1e-12
    # a random untied butterfly under bit reversal is exact too
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tw = torch.randn(1, 5, n // 2, 2, 2, generator=g, dtype=torch.float64)
    from kernels.permutation import bit_reversal

    perm = bit_reversal(n)
    m = butterfly_dense(tw)[:, torch.argsort(perm)]
    assert baselines(m, ["hierarchical"])["hierarchical"] < 1e-10 * m.norm().item()
    # a matrix with fewer non-zeros than the budget is kept exactly by the sparse row
    sparse = torch.zeros(n, n, dtype=torch.float64)
    sparse[torch.randint(0, n, (50,), generator=g), torch.randint(0, n, (50,), generator=g)] = 1.0
    assert baselines(sparse, ["sparse"])["sparse"] == 0.0
    # the unstructured control is far from every closed form
    rnd = baselines(target_matrix("randn", n), ["sparse", "lowrank", "hierarchical"])
    assert min(rnd.values()) > 1e-2


def test_study_is_self_describing(smoke: RecoverParams, tmp_path: Path) -> None:
    """Another machine can join a cell from the storage alone: the study holds its definition."""
    learn_cell(target_matrix("dft", 8), "dft", "bp", smoke.search_params, tmp_path)
    from tasks.recovery import open_storage

    storage = open_storage(None, tmp_path)
    (summary,) = optuna.get_all_study_summaries(storage)
    attrs = summary.user_attrs
    assert attrs["target"] == "dft" and attrs["n"] == 8 and attrs["model"] == "bp"
    assert attrs["search"]["epoch_steps"] == smoke.search_params.epoch_steps


def test_stalled_trial_is_pruned_without_a_population() -> None:
    """A lone trial whose log-MSE stops improving is pruned (Hyperband alone would not)."""
    from tasks.recovery import StalledOrHyperband

    hyperband = optuna.pruners.HyperbandPruner(min_resource=2, max_resource=30, reduction_factor=3)
    pruner = StalledOrHyperband(hyperband, patience=3, min_delta=0.1)
    study = optuna.create_study(pruner=pruner)
    stalled = study.ask()
    improving = study.ask()
    decisions_stalled, decisions_improving = [], []
    for epoch in range(1, 9):
        stalled.report(-2.0, epoch)  # flat at MSE 1e-2
        improving.report(-1.0 - 0.5 * epoch, epoch)  # half a decade per epoch
        decisions_stalled.append(stalled.should_prune())
        decisions_improving.append(improving.should_prune())
    assert not any(decisions_stalled[:3]) and decisions_stalled[3]  # pruned at epoch 4
    assert not any(decisions_improving)
