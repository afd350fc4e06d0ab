"""The search of one cell: an Optuna study of trials, run by workers on any machine.

The coordinator (`learn_cell`) creates the study, stores its definition in the study's user
attributes and enqueues every trial's hyper-parameters (drawn from one seeded generator, so the
same trials run whatever the number of workers). Workers (`run_worker`, here in a process pool
or elsewhere with `suite recover-worker`) take trials in groups of `batch_for(n)`, train each
group as one vectorised model in epochs, polish, report to the pruner (Hyperband, optionally
with a stall rule) and stop every trial once one reaches `threshold_mse`. At the end the best
`final_top` trials get `final_steps` more L-BFGS calls with the permutation frozen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from kernels.butterfly import ButterflyStack
from tasks.recovery.params import SearchParams
from tasks.recovery.train import (
    LBFGSConfig,
    TrialGroup,
    TrialSpec,
    build_stack,
    finite,
    mse,
    permutation_count,
    polish,
    working_dtype,
)
from tasks.targets import TARGETS, target_matrix

Log = Callable[[str], None]
DIVERGED = 30.0  # the log10 MSE a diverged trial reports to the pruner


@dataclass
class CellResult:
    """One learned cell: best MSE (the paper's convention is `loss`), where it came from."""

    target: str
    n: int
    model: str
    rmse: float
    mse: float
    trials: int
    steps: int
    seconds: float
    budget_capped: bool
    solved_by: int | None
    best_params: dict[str, Any] = field(default_factory=dict)


class StalledOrHyperband(optuna.pruners.BasePruner):
    """Prune when Hyperband says so, or when the trial has stalled on its own.

    Stalled: the reported best log10 MSE improved by less than `min_delta` decades over the
    last `patience` epochs. (Optuna's PatientPruner prunes only on getting worse, and only when
    the wrapped pruner agrees; with a few concurrent trials Hyperband has no rung to compare.)
    """

    def __init__(self, hyperband: optuna.pruners.HyperbandPruner, patience: int, min_delta: float):
        self.hyperband, self.patience, self.min_delta = hyperband, patience, min_delta

    def stalled(self, trial: optuna.trial.FrozenTrial) -> bool:
        values = [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)]
        if len(values) <= self.patience:
            return False
        return values[-1 - self.patience] - values[-1] < self.min_delta

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self.stalled(trial) or self.hyperband.prune(study, trial)


def make_pruner(sp: SearchParams, n: int) -> optuna.pruners.BasePruner:
    """Hyperband (Optuna's stand-in for the paper's asynchronous Hyperband), plus the stall rule
    with the patience of size n."""
    hyperband = optuna.pruners.HyperbandPruner(
        min_resource=sp.min_epochs, max_resource=sp.max_epochs, reduction_factor=sp.reduction_factor
    )
    patience = sp.patience_for(n)
    if patience == 0:
        return hyperband
    return StalledOrHyperband(hyperband, patience, sp.min_delta_decades)


def open_storage(url: str | None, work_dir: Path) -> optuna.storages.BaseStorage | str:
    """An Optuna storage: the given URL, or a journal file under work_dir (multi-process safe)."""
    if url:
        return url
    from optuna.storages.journal import JournalFileBackend

    work_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(work_dir / "optuna.journal")))


def trial_plan(sp: SearchParams, key: str, count: int, model: str = "bp") -> list[dict[str, Any]]:
    """The hyper-parameters of every trial of a cell, drawn from one seeded generator.

    lr log-uniform in [lr_min, lr_max]; share_logits, init and the model seed uniform. Where
    the model's perm_init is corners, the trials take its 8^permutations corners (hard choices)
    in a seeded order, each cycle shuffled anew; otherwise corner is -1.
    """
    seed = int.from_bytes(f"{sp.seed}/{key}".encode(), "little") % 2**63
    rng = np.random.default_rng(seed)
    lo, hi = math.log(sp.lr_min), math.log(sp.lr_max)
    plan = [
        {
            "lr": float(math.exp(rng.uniform(lo, hi))),
            "share_logits": bool(sp.share_logits[rng.integers(len(sp.share_logits))]),
            "init": str(sp.inits[rng.integers(len(sp.inits))]),
            "seed": int(rng.integers(2**31 - 1)),
            "corner": -1,
        }
        for _ in range(count)
    ]
    if sp.perm_init_for(model) == "corners":  # own generator: the other draws stay randn's
        corners, crng = 8 ** permutation_count(model), np.random.default_rng(seed + 1)
        order = np.concatenate([crng.permutation(corners) for _ in range(-(-count // corners))])
        for hp, corner in zip(plan, order, strict=False):
            hp["corner"] = int(corner)
    return plan


def _suggest(trial: optuna.Trial, sp: SearchParams, perms: int) -> TrialSpec:
    """The enqueued values, through Optuna's suggest API (so they show in its UI as params)."""
    return TrialSpec(
        trial.number,
        trial.suggest_float("lr", sp.lr_min, sp.lr_max, log=True),
        trial.suggest_categorical("share_logits", sp.share_logits),
        trial.suggest_categorical("init", sp.inits),
        trial.suggest_int("seed", 0, 2**31 - 1),
        trial.suggest_int("corner", -1, 8**perms - 1),
    )


@dataclass
class _Slot:
    """A running trial of a worker's group."""

    trial: optuna.Trial
    spec: TrialSpec
    t0: float
    epoch: int = 0
    best: float = math.inf
    state: dict | None = None


class _Worker:
    """One process's share of a cell: groups of trials until the plan, the clock or a solve."""

    def __init__(self, study: optuna.Study, target: torch.Tensor):
        self.study, self.a = study, study.user_attrs
        self.sp = SearchParams.from_json(self.a["search"])
        self.target = target.to(working_dtype(target))
        self.n, self.model = self.a["n"], self.a["model"]
        self.trial_dir = Path(self.a["trial_dir"])
        self.lbfgs = LBFGSConfig.of(self.sp)

    def solved(self) -> bool:
        return self.study.user_attrs.get("solved_by") is not None

    def take(self, count: int) -> list[tuple[optuna.Trial, TrialSpec]]:
        """Up to `count` trials of the plan (an asked trial past the plan is told FAIL, unused)."""
        out = []
        for _ in range(count):
            trial = self.study.ask()
            if trial.number >= self.a["max_trials"]:
                trial.set_user_attr("unused", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            out.append((trial, _suggest(trial, self.sp, permutation_count(self.model))))
        return out

    def run(self) -> None:
        """Keep a batch of `batch_for(n)` trials training; a trial that ends frees its slot for
        the next trial of the plan at the next epoch boundary."""
        sp, size = self.sp, self.sp.batch_for(self.n)
        group: TrialGroup | None = None
        slots: list[_Slot] = []
        exhausted = False
        cpu0 = time.process_time()
        while True:
            spent = time.process_time() - cpu0 > self.a["cpu_seconds"]
            if spent or self.solved():
                if spent and not self.solved():
                    self.study.set_user_attr("capped", True)
                for slot in slots:
                    self._finish(slot, pruned=False)
                return
            taken = [] if exhausted else self.take(size - len(slots))
            exhausted |= len(taken) < size - len(slots)
            if group is None:
                if not taken:
                    return
                specs = [s for _, s in taken]
                group = TrialGroup(specs, self.n, self.model, self.target, sp, size > 1)
            elif taken:
                group.regroup(list(range(len(slots))), [s for _, s in taken])
            slots += [_Slot(t, s, time.time()) for t, s in taken]
            if not slots:
                return
            values = group.epoch()
            outcome: dict[int, bool] = {}  # slot index -> pruned?
            for i, (slot, value) in enumerate(zip(slots, values, strict=True)):
                slot.epoch += 1
                if value < slot.best:
                    slot.best, slot.state = value, group.trial(i).state_dict()
                due = slot.epoch % sp.polish_every == 0 or slot.epoch == sp.max_epochs
                if (due and value < sp.polish_below) or value < sp.threshold_mse:
                    polished, pvalue = polish(group.trial(i), self.target, self.lbfgs, sp.loss)
                    if pvalue < slot.best:
                        slot.best, slot.state = pvalue, polished.state_dict()
                report = min(math.log10(max(slot.best, 1e-30)), DIVERGED)
                slot.trial.report(report, slot.epoch)
                if slot.best <= sp.threshold_mse:
                    self.study.set_user_attr("solved_by", slot.trial.number)
                    outcome[i] = False
                elif slot.epoch == sp.max_epochs or not math.isfinite(slot.best):
                    outcome[i] = False  # done, or diverged with nothing to gain from more epochs
                elif slot.trial.should_prune():
                    outcome[i] = True
            for i, pruned in outcome.items():
                self._finish(slots[i], pruned)
            if outcome:
                keep = [i for i in range(len(slots)) if i not in outcome]
                group.keep(keep)
                slots = [slots[i] for i in keep]

    def _finish(self, slot: _Slot, pruned: bool) -> None:
        trial = slot.trial
        trial.set_user_attr("steps", slot.epoch * self.sp.epoch_steps)
        trial.set_user_attr("seconds", time.time() - slot.t0)
        if slot.state is not None:
            path = self.trial_dir / f"trial-{trial.number:05d}.pt"
            torch.save({"state_dict": slot.state, "hp": slot.spec.hp}, path)
            trial.set_user_attr("state", str(path))
        if pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, finite(slot.best))


def run_worker(
    storage_url: str | None,
    work_dir: str,
    study_name: str,
    worker: int,
    target: torch.Tensor | None = None,
) -> None:
    """Run a study's trials until its plan, its CPU budget or a solve; any machine may call it.

    The budget of a cell (`cell_seconds`) is CPU time per worker process, so a cell does the
    same work on a busy machine as on a quiet one, only later.
    """
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, Path(work_dir))
    attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    if target is None:
        target = target_matrix(attrs["target"], attrs["n"])
    sp = SearchParams.from_json(attrs["search"])
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=sp.seed * 1000 + worker),
        pruner=make_pruner(sp, attrs["n"]),
    )
    Path(attrs["trial_dir"]).mkdir(parents=True, exist_ok=True)
    _Worker(study, target).run()


def trial_pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for trials, started once and reused by every cell (None: in-process)."""
    return None if workers == 1 else ProcessPoolExecutor(workers, mp_context=get_context("spawn"))


def learn_cell(
    target: torch.Tensor,
    name: str,
    model: str,
    sp: SearchParams,
    work_dir: Path,
    storage: str | None = None,
    log: Log = print,
    pool: ProcessPoolExecutor | None = None,
) -> tuple[CellResult, ButterflyStack | None]:
    """Search, polish and return the best factorization of `target` with `model`.

    pool: from `trial_pool(sp.workers)`; without one, trials run in this process.
    """
    n = target.shape[0]
    t0 = time.time()
    cell_dir = work_dir / f"{name}-{n}-{model}"
    study_name = f"recover/{name}/{n}/{model}/{time.time_ns()}"
    attrs = {
        "target": name,
        "n": n,
        "model": model,
        "search": asdict(sp),
        "max_trials": sp.trials_for(n),
        "cpu_seconds": sp.seconds_for(n),
        "trial_dir": str((cell_dir / "trials").resolve()),
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is the stage's one line
    st = open_storage(storage, work_dir)
    study = optuna.create_study(study_name=study_name, storage=st, direction="minimize")
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    for hp in trial_plan(sp, f"{name}/{n}/{model}", attrs["max_trials"], model):
        study.enqueue_trial(hp)
    user_target = None if name in TARGETS else target  # named targets are rebuilt by workers
    if pool is None:
        run_worker(storage, str(work_dir), study_name, 0, user_target)
    else:
        futures = [
            pool.submit(run_worker, storage, str(work_dir), study_name, w, user_target)
            for w in range(sp.workers)
        ]
        for f in futures:
            f.result()
    study = optuna.load_study(study_name=study_name, storage=st)
    solved = study.user_attrs.get("solved_by")
    capped = bool(study.user_attrs.get("capped")) and solved is None
    ran = [t for t in study.trials if not t.user_attrs.get("unused")]
    ran = [t for t in ran if t.state != optuna.trial.TrialState.WAITING]
    done = [t for t in ran if "state" in t.user_attrs]
    steps = sum(t.user_attrs.get("steps", 0) for t in ran)
    if not done:
        log(f"  {name} n={n} {model}: no trial finished an epoch within the budget")
        nan = float("nan")
        return CellResult(
            name, n, model, nan, nan, len(ran), steps, time.time() - t0, True, None
        ), None
    best_model, best_mse, best_hp = final_polish(done, target, n, model, sp, solved)
    result = CellResult(
        name,
        n,
        model,
        math.sqrt(best_mse),
        best_mse,
        len(ran),
        steps,
        time.time() - t0,
        capped,
        solved,
        best_hp,
    )
    return result, best_model


def final_polish(
    done: list[optuna.trial.FrozenTrial],
    target: torch.Tensor,
    n: int,
    model: str,
    sp: SearchParams,
    solved: int | None,
) -> tuple[ButterflyStack, float, dict[str, Any]]:
    """The best trials get `final_steps` L-BFGS calls with the permutation frozen.

    When a trial solved the cell, only it is polished (the others stopped early).
    """
    work_target = target.to(working_dtype(target))
    ranked = sorted(done, key=lambda t: t.value if t.value is not None else _last(t))
    top = (
        [t for t in ranked if t.number == solved] if solved is not None else ranked[: sp.final_top]
    )
    cfg = LBFGSConfig.of(sp, sp.final_steps)
    best: tuple[ButterflyStack, float, dict[str, Any]] | None = None
    for t in top:
        saved = torch.load(t.user_attrs["state"], weights_only=True)
        hp = saved["hp"]
        spec = TrialSpec(
            t.number, hp["lr"], hp["share_logits"], hp["init"], hp["seed"], hp.get("corner", -1)
        )
        m = build_stack(n, model, not target.is_complex(), [spec], sp.extra_perm, batched=False)
        m.load_state_dict(saved["state_dict"])
        if any(bool(p.hard) for p in m.permutations()):
            m.round_permutations_()
        with torch.no_grad():
            before = finite(mse(m.matrix(), work_target, sp.loss).item())
        polished, after = polish(m, work_target, cfg, sp.loss) if sp.final_steps else (m, before)
        cand = (polished, after, hp) if after < before else (m, before, hp)
        if best is None or cand[1] < best[1]:
            best = cand
    assert best is not None
    return best


def _last(t: optuna.trial.FrozenTrial) -> float:
    """A pruned trial's last reported MSE (reports are log10 MSE)."""
    values = list(t.intermediate_values.values())
    return 10.0 ** values[-1] if values else float("inf")
