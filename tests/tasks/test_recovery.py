"""The recovery task: polish, Adam over trials, the search of one cell, baselines."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

from kernels.butterfly import ButterflyStack
from kernels.constructions import exact_stack
from kernels.reference import butterfly_dense
from suite.params import load_stage
from tasks.recovery import LBFGSConfig, RecoverParams, baselines, learn_cell, mse, polish
from tasks.recovery.search import StalledOrHyperband, open_storage, trial_plan
from tasks.recovery.train import BatchedAdam, TrialGroup, TrialSpec
from tasks.targets import target_matrix

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
PAPER_POLISH = LBFGSConfig(15, 20, 100, "none", 0.0, 0.0)


@pytest.fixture(scope="module")
def smoke() -> RecoverParams:
    return load_stage(PARAMS, "recover", RecoverParams, "smoke")[1]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _near_solution(name: str, n: int, gen: torch.Generator) -> tuple[ButterflyStack, torch.Tensor]:
    """The exact stack of `name` in float32, twiddles perturbed, permutations relaxed.

    The logits keep their signs (so rounding gives the exact permutation back) but sit at
    +-1.5, where the relaxed matrix is far from the exact one: the polish must round them.
    """
    exact = exact_stack(name, n)
    target = exact.matrix().detach()
    cfg = {**exact.config}
    stack = ButterflyStack(**cfg)
    with torch.no_grad():
        for b_new, b_old in zip(stack.butterflies, exact.butterflies, strict=True):
            tw = b_old.twiddle.detach().float()
            b_new.twiddle.copy_(tw + 1e-3 * torch.randn(tw.shape, generator=gen))
        for p_new, p_old in zip(stack.permutations(), exact.permutations(), strict=True):
            p_new.logits.copy_(1.5 * torch.sign(p_old.logits.detach() + 1e-9).float())
    tgt = target.to(torch.complex64 if target.is_complex() else torch.float32)
    return stack, tgt


@pytest.mark.parametrize(
    ("name", "model"), [("dft", "bp"), ("dct", "bpp"), ("convolution", "bpbp")]
)
def test_polish_lowers_the_loss_of_a_rounded_near_solution(
    name: str, model: str, gen: torch.Generator
) -> None:
    """For every model the polish rounds the permutation and L-BFGS reaches the line."""
    stack, target = _near_solution(name, 16, gen)
    assert stack.config["model"] == model
    start = mse(stack.matrix(), target).item()
    polished, value = polish(stack, target, LBFGSConfig(5, 20, 100, "strong_wolfe", 0.0, 0.0))
    assert start > 1e-4 and value < 1e-9, (start, value)
    assert all(bool(p.hard) for p in polished.permutations())
    with torch.no_grad():  # the value is the returned model's, not a number from elsewhere
        assert mse(polished.matrix(), target).item() == pytest.approx(value, rel=1e-4, abs=1e-12)


def test_polish_runs_the_papers_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    """15 calls of step() of up to 20 iterations each: 300 loss-and-gradient evaluations."""
    calls = {"grad": 0}
    original = ButterflyStack.matrix

    def counting(self: ButterflyStack) -> torch.Tensor:
        calls["grad"] += torch.is_grad_enabled()
        return original(self)

    monkeypatch.setattr(ButterflyStack, "matrix", counting)
    target = target_matrix("randn", 16).float()  # not in the class: L-BFGS never converges
    stack = ButterflyStack(16, "bp", real_output=True, generator=torch.Generator().manual_seed(0))
    polish(stack, target, PAPER_POLISH)
    assert calls["grad"] == 15 * 20
    calls["grad"] = 0
    polish(stack, target, replace(PAPER_POLISH, steps=2, iters=7))
    assert calls["grad"] == 2 * 7


def test_polish_survives_a_diverging_step() -> None:
    """No line search with lr 1 can overshoot: the best step boundary is kept, finite."""
    target = target_matrix("randn", 8).float() * 1e3
    stack = ButterflyStack(8, "bpbp", real_output=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = mse(stack.matrix(), target).item()
    polished, value = polish(stack, target, replace(PAPER_POLISH, steps=5))
    assert math.isfinite(value) and value <= start
    # the returned model is the restored best point, not whatever the last step left behind
    assert all(torch.isfinite(p).all() for p in polished.parameters())
    with torch.no_grad():
        assert mse(polished.matrix(), target).item() == pytest.approx(value, rel=1e-5)


def test_batched_adam_is_torch_adam(gen: torch.Generator) -> None:
    """BatchedAdam on an unbatched model takes the same steps as torch.optim.Adam."""
    target = target_matrix("dft", 16).to(torch.complex64)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    a = ButterflyStack(16, "bp", generator=torch.Generator().manual_seed(seed))
    b = ButterflyStack(16, "bp", generator=torch.Generator().manual_seed(seed))
    ours = BatchedAdam(list(a.parameters()), torch.tensor([0.03], dtype=torch.float64), False)
    theirs = torch.optim.Adam(b.parameters(), lr=0.03)
    for _ in range(20):
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            mse(model.matrix(), target).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_a_trial_in_a_batch_trains_as_alone(smoke: RecoverParams, gen: torch.Generator) -> None:
    """Trials of one vectorised model do not interact: each matches its own unbatched run,
    also after the group was narrowed to fewer trials."""
    sp = replace(smoke.search, epoch_steps=15)
    seeds = torch.randint(0, 2**31 - 1, (3,), generator=gen).tolist()
    specs = [
        TrialSpec(i, lr, True, "randn", s)
        for i, (lr, s) in enumerate(zip([0.01, 0.05, 0.1], seeds, strict=True))
    ]
    target = target_matrix("dct", 16)
    group = TrialGroup(specs, 16, "bpp", target, sp)
    batched = group.epoch()
    group.keep([0, 2])
    narrowed = group.epoch()
    for i, spec in enumerate(specs):
        alone = TrialGroup([spec], 16, "bpp", target, sp)
        values = [alone.epoch()[0]]
        if i != 1:
            values.append(alone.epoch()[0])
        assert values[0] == pytest.approx(batched[i], rel=1e-4)
        if i != 1:
            assert values[1] == pytest.approx(narrowed[[0, 2].index(i)], rel=1e-4)
    # a trial that joins a running group starts from its own init and its own Adam step 1
    late = TrialSpec(3, 0.03, True, "ortho", seeds[0] + 1)
    group.regroup([0, 1], [late])
    joined = group.epoch()
    assert joined[2] == pytest.approx(
        TrialGroup([late], 16, "bpp", target, sp).epoch()[0], rel=1e-4
    )


def test_smoke_recovers_the_dft(smoke: RecoverParams, tmp_path: Path) -> None:
    """Adam + rounded-permutation polish reach the line on the 8-point DFT; the model is real."""
    res, model = learn_cell(target_matrix("dft", 8), "dft", "bp", smoke.search, tmp_path)
    assert res.rmse <= 1e-4 and model is not None and res.solved_by is not None
    assert res.trials >= 1 and res.steps > 0 and res.seconds > 0
    assert not res.budget_capped
    with torch.no_grad():
        err = (model.matrix().to(torch.complex128) - target_matrix("dft", 8)).abs().max()
    assert err < 1e-3
    assert all(bool(p.hard) for p in model.permutations())


def test_a_solve_stops_every_trial(smoke: RecoverParams, tmp_path: Path) -> None:
    """Once a trial reaches the line, no trial of the plan starts: the rest stay queued."""
    sp = replace(smoke.search, trials={8: 40}, threshold_mse=1e-3, batch={8: 2})
    res, _ = learn_cell(target_matrix("hadamard", 8), "hadamard", "bp", sp, tmp_path)
    assert res.solved_by is not None and res.mse <= 1e-3
    (summary,) = optuna.get_all_study_summaries(open_storage(None, tmp_path))
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(None, tmp_path))
    by_number = {t.number: t for t in study.trials}
    solver = by_number[res.solved_by]
    assert solver.value is not None and solver.value <= 1e-3
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert waiting, "the solve should leave planned trials unstarted"
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert not running


def test_two_workers_run_the_same_trials_as_one(smoke: RecoverParams, tmp_path: Path) -> None:
    """The plan fixes every trial's hyper-parameters: 2 workers give the 1-worker result."""
    from tasks.recovery import trial_pool

    sp = replace(
        smoke.search,
        trials={8: 4},
        batch={8: 2},
        max_epochs=2,
        min_epochs=2,
        epoch_steps=20,
        polish_below=1e-30,
        patience=0,
        threshold_mse=1e-30,
        final_steps=0,
    )
    target = target_matrix("randn", 8)
    one, _ = learn_cell(target, "randn", "bp", sp, tmp_path / "one")
    with trial_pool(2) as pool:
        two, _ = learn_cell(
            target, "randn", "bp", replace(sp, workers=2), tmp_path / "two", pool=pool
        )
    assert one.trials == two.trials == 4
    assert two.mse == pytest.approx(one.mse, rel=1e-5)
    assert two.best_params == pytest.approx(one.best_params)


def test_the_plan_is_seeded_and_spans_the_ranges(smoke: RecoverParams) -> None:
    sp = replace(smoke.search, lr_min=1e-3, lr_max=1e-1, share_logits=[True, False])
    plan = trial_plan(sp, "dft/8/bp", 200)
    assert plan == trial_plan(sp, "dft/8/bp", 200)
    assert plan != trial_plan(sp, "dft/16/bp", 200)
    lrs = [p["lr"] for p in plan]
    assert min(lrs) >= 1e-3 and max(lrs) <= 1e-1 and min(lrs) < 3e-3 and max(lrs) > 3e-2
    assert {p["share_logits"] for p in plan} == {True, False}


def test_budget_cap_is_recorded(smoke: RecoverParams, tmp_path: Path) -> None:
    """A cell that cannot finish within cell_seconds says so instead of pretending."""
    sp = replace(smoke.search, cell_seconds={8: 1.0}, epoch_steps=2000, max_epochs=50)
    res, _ = learn_cell(target_matrix("randn", 8), "randn", "bp", sp, tmp_path)
    assert res.budget_capped and res.solved_by is None
    assert res.seconds < 60


def test_baselines(tmp_path: Path) -> None:
    """Sparse and low-rank rows use the 2 n log2 n budget; hierarchical is exact for butterflies."""
    n = 32
    had = target_matrix("hadamard", n)
    rows = baselines(had, ["sparse", "lowrank", "sparse_lowrank", "hierarchical"])
    assert rows["sparse_lowrank"] == min(rows["sparse"], rows["lowrank"])
    assert rows["hierarchical"] < 1e-12  # identity permutation
    assert baselines(target_matrix("dft", n), ["hierarchical"])["hierarchical"] < 1e-12
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tw = torch.randn(1, 5, n // 2, 2, 2, generator=g, dtype=torch.float64)
    from kernels.permutation import bit_reversal

    perm = bit_reversal(n)
    m = butterfly_dense(tw)[:, torch.argsort(perm)]
    assert baselines(m, ["hierarchical"])["hierarchical"] < 1e-10 * m.norm().item()
    sparse = torch.zeros(n, n, dtype=torch.float64)
    sparse[torch.randint(0, n, (50,), generator=g), torch.randint(0, n, (50,), generator=g)] = 1.0
    assert baselines(sparse, ["sparse"])["sparse"] == 0.0
    rnd = baselines(target_matrix("randn", n), ["sparse", "lowrank", "hierarchical"])
    assert min(rnd.values()) > 1e-2


def test_study_is_self_describing(smoke: RecoverParams, tmp_path: Path) -> None:
    """Another machine can join a cell from the storage alone: the study holds its definition."""
    learn_cell(target_matrix("dft", 8), "dft", "bp", smoke.search, tmp_path)
    (summary,) = optuna.get_all_study_summaries(open_storage(None, tmp_path))
    attrs = summary.user_attrs
    assert attrs["target"] == "dft" and attrs["n"] == 8 and attrs["model"] == "bp"
    assert attrs["search"]["epoch_steps"] == smoke.search.epoch_steps


def test_stalled_trial_is_pruned_without_a_population() -> None:
    """A lone trial whose log-MSE stops improving is pruned (Hyperband alone would not)."""
    hyperband = optuna.pruners.HyperbandPruner(min_resource=2, max_resource=30, reduction_factor=3)
    pruner = StalledOrHyperband(hyperband, patience=3, min_delta=0.1)
    study = optuna.create_study(pruner=pruner)
    stalled = study.ask()
    improving = study.ask()
    decisions_stalled, decisions_improving = [], []
    for epoch in range(1, 9):
        stalled.report(-2.0, epoch)
        improving.report(-1.0 - 0.5 * epoch, epoch)
        decisions_stalled.append(stalled.should_prune())
        decisions_improving.append(improving.should_prune())
    assert not any(decisions_stalled[:3]) and decisions_stalled[3]
    assert not any(decisions_improving)


def test_search_params_survive_the_study_round_trip(smoke: RecoverParams) -> None:
    """Workers rebuild the search from the study's JSON attributes: int keys come back ints."""
    import json
    from dataclasses import asdict

    from tasks.recovery import SearchParams

    sp = replace(smoke.search, batch={8: 4, 64: 2}, patience_at={1024: 8})
    back = SearchParams.from_json(json.loads(json.dumps(asdict(sp))))
    assert back == sp and back.batch_for(64) == 2 and back.batch_for(128) == 1
    assert back.patience_for(1024) == 8 and back.patience_for(8) == smoke.search.patience


def test_the_stall_rule_takes_the_patience_of_its_size(smoke: RecoverParams) -> None:
    """patience_at overrides patience at one n; 0 there leaves Hyperband alone."""
    from tasks.recovery.search import make_pruner

    sp = replace(smoke.search, patience=3, patience_at={512: 0, 1024: 8})
    assert isinstance(make_pruner(sp, 64), StalledOrHyperband)
    assert make_pruner(sp, 64).patience == 3 and make_pruner(sp, 1024).patience == 8
    assert isinstance(make_pruner(sp, 512), optuna.pruners.HyperbandPruner)


def test_target_budget_scales_one_target(smoke: RecoverParams) -> None:
    p = replace(smoke, target_budget={"hadamard": 2.0})
    assert p.search_for("hadamard", 8).cell_seconds[8] == 2 * smoke.search.cell_seconds[8]
    assert p.search_for("hadamard", 8).trials[8] == 2 * smoke.search.trials[8]
    assert p.search_for("dft", 8) == smoke.search


def test_corner_plans_visit_every_hard_choice(smoke: RecoverParams) -> None:
    """perm_init corners: each cycle of 8^perms trials takes every corner once, in a seeded
    order that differs between cycles; the other draws are those of the randn plan."""
    sp = replace(smoke.search, perm_init={"bpbp": "corners"})
    plan = trial_plan(sp, "convolution/16/bpbp", 150, "bpbp")
    corners = [p["corner"] for p in plan]
    assert sorted(corners[:64]) == sorted(corners[64:128]) == list(range(64))
    assert corners[:64] != corners[64:128] and len(set(corners[128:])) == 22
    plain = trial_plan(smoke.search, "convolution/16/bpbp", 150, "bpbp")
    assert {p["corner"] for p in plain} == {-1}
    assert {p["corner"] for p in trial_plan(sp, "dft/16/bp", 20, "bp")} == {-1}
    assert [{**p, "corner": -1} for p in plan] == plain


@pytest.mark.parametrize("model", ["bp", "bpp", "bpbp"])
def test_a_corner_start_rounds_to_its_choice(model: str, gen: torch.Generator) -> None:
    """Trial t starts at its corner (batched or alone): rounding gives that hard choice for
    each permutation (P' first), every level alike; the twiddles are the seed's, untouched."""
    from tasks.recovery.train import build_stack, corner_logits, permutation_count

    count = permutation_count(model)
    corners = torch.randint(0, 8**count, (3,), generator=gen).tolist()
    seeds = torch.randint(0, 2**31 - 1, (4,), generator=gen).tolist()
    specs = [
        TrialSpec(i, 0.03, False, "ortho", s, c)
        for i, (s, c) in enumerate(zip(seeds, corners + [-1], strict=True))
    ]
    stack = build_stack(16, model, True, specs, "one", batched=True).round_permutations_()
    for t, spec in enumerate(specs):
        alone = build_stack(16, model, True, [spec], "one", batched=False)
        plain = build_stack(16, model, True, [replace(spec, corner=-1)], "one", batched=False)
        for b_alone, b_plain in zip(alone.butterflies, plain.butterflies, strict=True):
            torch.testing.assert_close(b_alone.twiddle, b_plain.twiddle, rtol=0, atol=0)
        if spec.corner < 0:
            for p_alone, p_plain in zip(alone.permutations(), plain.permutations(), strict=True):
                torch.testing.assert_close(p_alone.logits, p_plain.logits, rtol=0, atol=0)
            continue
        expect = [(lg > 0).float() for lg in corner_logits(spec.corner, count)]
        for perms in (stack.trial(t).permutations(), alone.round_permutations_().permutations()):
            for perm, bits in zip(perms, expect, strict=True):
                probs = perm.probs()
                assert torch.equal(probs, bits.expand_as(probs))
    with pytest.raises(ValueError, match="corner"):
        corner_logits(8**count, count)


def test_a_corner_search_records_its_corner(smoke: RecoverParams, tmp_path: Path) -> None:
    """With perm_init corners the DFT at 8 is still recovered; the winner names its corner."""
    sp = replace(smoke.search, perm_init={"bp": "corners"})
    res, model = learn_cell(target_matrix("dft", 8), "dft", "bp", sp, tmp_path)
    assert res.rmse <= 1e-4 and model is not None
    assert res.best_params["corner"] in range(8)
