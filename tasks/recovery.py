"""Transform recovery (PAPER.md section 2): learn a butterfly factorization of a matrix.

One cell = one matrix and one model (bp, bpp, bpbp). Its trials run as an Optuna study with a
Hyperband pruner on a shared storage (a journal file by default; any Optuna storage URL lets
other machines join with `suite recover-worker`). A trial: Adam with a log-uniform learning rate
in epochs of `epoch_steps` steps; every `polish_every` epochs a copy gets its permutation rounded
and `polish_steps` of L-BFGS; its value is the better of the two MSEs. Any trial reaching
`threshold_mse` stops every trial of the cell. At the end the best `final_top` trials get
`final_steps` more L-BFGS steps with the permutation frozen. A cell also stops at `cell_seconds`
(recorded as budget_capped).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import optuna
import torch

from kernels.butterfly import MODELS, ButterflyStack, save_factors
from kernels.factorize import hierarchical_butterfly, lowrank_projection, sparse_projection
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_multiply_reference
from tasks.targets import TARGETS, rmse, target_matrix

Log = Callable[[str], None]
BASELINES = ("sparse", "lowrank", "sparse_lowrank", "hierarchical")


@dataclass(frozen=True)
class SearchParams:
    """The trial search of one cell (PAPER.md section 2; paper values in comments)."""

    trials: dict[int, int]  # n -> trials per cell (20, 20, 40, 60, 80, 160, 160, 320)
    max_epochs: int  # 200
    epoch_steps: int  # 400 Adam steps per epoch
    lr_min: float  # 1e-4
    lr_max: float  # 0.5
    share_logits: list[bool]  # sampled per trial: [true, false]
    inits: list[str]  # sampled per trial: randn (the paper's), ortho
    polish_every: int  # 5 epochs
    polish_steps: int  # 15 L-BFGS steps
    polish_below: float  # polish only when the Adam MSE is below this (paper: always, .inf)
    final_top: int  # 16 best trials ...
    final_steps: int  # ... get 50 more L-BFGS steps
    threshold_mse: float  # 1e-8, i.e. RMSE 1e-4
    min_epochs: int  # Hyperband's smallest budget, in epochs
    reduction_factor: int  # Hyperband's eta
    patience: int  # prune a trial whose best MSE stalls this many epochs (0: off, the paper)
    min_delta_decades: float  # ... stalls = improves by less than this many decades
    cell_seconds: dict[int, float]  # n -> wall-clock cap of a cell (the paper has none)
    workers: int  # parallel trial processes on this machine
    seed: int  # sampler seed

    def validate(self) -> None:
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError("need 0 < lr_min <= lr_max")
        for name in (
            "max_epochs",
            "epoch_steps",
            "polish_every",
            "workers",
            "min_epochs",
            "final_top",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("polish_steps", "final_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.patience < 0 or self.min_delta_decades < 0:
            raise ValueError("patience and min_delta_decades must be >= 0")
        if self.reduction_factor < 2:
            raise ValueError("reduction_factor must be >= 2")
        if not self.threshold_mse > 0 or not self.polish_below > 0:
            raise ValueError("threshold_mse and polish_below must be > 0")
        if any(v < 1 for v in self.trials.values()):
            raise ValueError("trials must be >= 1 for every n")
        if any(v <= 0 for v in self.cell_seconds.values()):
            raise ValueError("cell_seconds must be > 0 for every n")
        if not self.share_logits or not self.inits:
            raise ValueError("share_logits and inits need at least one choice")
        if any(i not in ("randn", "ortho") for i in self.inits):
            raise ValueError(f"inits must be among randn, ortho, got {self.inits}")

    def trials_for(self, n: int) -> int:
        if n not in self.trials:
            raise ValueError(f"'{self._key('trials')}' has no entry for n={n}")
        return self.trials[n]

    def seconds_for(self, n: int) -> float:
        if n not in self.cell_seconds:
            raise ValueError(f"'{self._key('cell_seconds')}' has no entry for n={n}")
        return self.cell_seconds[n]

    def _key(self, name: str) -> str:
        return getattr(self, "key_path", lambda k: f"recover.search.{k}")(name)


@dataclass(frozen=True)
class RecoverParams:
    """The recover stage: which cells, which models, which baselines, and the search."""

    models: dict[str, str]  # target -> bp | bpp | bpbp (the paper's choice per target)
    sizes: dict[str, list[int]]  # target -> the n to run
    baselines: list[str]
    search: SearchParams  # built (strictly, key by key) by suite.params.build
    storage: str | None = None  # Optuna storage URL; None = a journal file in the work dir

    def validate(self) -> None:
        for t, model in self.models.items():
            if t not in TARGETS:
                raise ValueError(f"unknown target '{t}' (known: {', '.join(TARGETS)})")
            if model not in MODELS:
                raise ValueError(f"model for {t} must be one of {', '.join(MODELS)}, got {model!r}")
        for t, ns in self.sizes.items():
            if t not in self.models:
                raise ValueError(f"sizes.{t}: no model given for target '{t}'")
            for n in ns:
                if n < 8 or n & (n - 1):
                    raise ValueError(f"sizes.{t}: n must be a power of two >= 8, got {n}")
        search = self.search
        for ns in self.sizes.values():
            for n in ns:
                search.trials_for(n), search.seconds_for(n)  # every n has a budget
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise ValueError(f"unknown baseline '{bad[0]}' (known: {', '.join(BASELINES)})")

    def restricted(self, cells: list[tuple[str, int]]) -> RecoverParams:
        """The same params on a sub-grid of (target, n) cells; any size with a budget is allowed."""
        sizes: dict[str, list[int]] = {}
        for t, n in cells:
            sizes.setdefault(t, []).append(n)
        out = replace(self, sizes=sizes)
        object.__setattr__(out, "key_path", getattr(self, "key_path", lambda k: f"recover.{k}"))
        out.validate()
        return out

    @property
    def search_params(self) -> SearchParams:
        return self.search


@dataclass
class CellResult:
    """One learned cell: best MSE and where its factors are."""

    target: str
    n: int
    model: str
    rmse: float
    mse: float
    trials: int
    steps: int
    seconds: float
    budget_capped: bool
    best_params: dict[str, Any]
    factors: Path | None


def mse_loss(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the n^2 entries of |approx - target|^2 (complex: real and imaginary parts)."""
    d = approx - target
    return (d.real.square() + d.imag.square()).mean() if d.is_complex() else d.square().mean()


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def polish(model: ButterflyStack, target: torch.Tensor, steps: int) -> tuple[ButterflyStack, float]:
    """A copy with its permutations rounded, after `steps` L-BFGS (strong Wolfe) iterations."""
    model = copy.deepcopy(model).round_permutations_()
    params = [p for p in model.parameters() if p.requires_grad]
    # The MSE averages n^2 entries, so its gradients are tiny near a solution: turn off the
    # default tolerances, which would otherwise stop L-BFGS after one step.
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=steps,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mse_loss(model.matrix(), target)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # a line search that produced NaN; keep what we have
        pass
    with torch.no_grad():
        return model, _finite(mse_loss(model.matrix(), target).item())


def _build(n: int, model: str, real: bool, hp: dict[str, Any]) -> ButterflyStack:
    g = torch.Generator().manual_seed(hp["seed"])
    return ButterflyStack(
        n,
        model,
        complex=True,
        tied=True,
        share_logits=hp["share_logits"],
        init=hp["init"],
        real_output=real,
        generator=g,
    )


class _Objective:
    """One trial of a cell; everything it needs is in the study's user attributes."""

    def __init__(self, attrs: dict[str, Any], target: torch.Tensor, deadline: float):
        self.a, self.target, self.deadline = attrs, target.to(_working_dtype(target)), deadline
        self.sp = SearchParams(**attrs["search"])
        self.trial_dir = Path(attrs["trial_dir"])

    def __call__(self, trial: optuna.Trial) -> float:
        sp, a = self.sp, self.a
        hp = {
            "lr": trial.suggest_float("lr", sp.lr_min, sp.lr_max, log=True),
            "share_logits": trial.suggest_categorical("share_logits", sp.share_logits),
            "init": trial.suggest_categorical("init", sp.inits),
            "seed": trial.suggest_int("seed", 0, 2**31 - 1),
        }
        model = _build(a["n"], a["model"], not self.target.is_complex(), hp)
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
        best, best_state, steps, t0 = float("inf"), None, 0, time.time()
        for epoch in range(1, sp.max_epochs + 1):
            for _ in range(sp.epoch_steps):
                opt.zero_grad()
                loss = mse_loss(model.matrix(), self.target)
                loss.backward()
                opt.step()
            steps += sp.epoch_steps
            with torch.no_grad():
                value = _finite(mse_loss(model.matrix(), self.target).item())
            if value < best:
                best, best_state = value, copy.deepcopy(model.state_dict())
            due = epoch % sp.polish_every == 0 or epoch == sp.max_epochs
            if (due and value < sp.polish_below) or value < sp.threshold_mse:
                polished, pvalue = polish(model, self.target, sp.polish_steps)
                if pvalue < best:
                    best, best_state = pvalue, copy.deepcopy(polished.state_dict())
            # pruners compare decades of MSE (a diverged trial reports +30)
            trial.report(min(math.log10(max(best, 1e-30)), 30.0), epoch)
            if not math.isfinite(value) and not math.isfinite(best):
                break  # diverged: nothing to gain from more epochs
            if best <= sp.threshold_mse:
                trial.study.set_user_attr("solved_by", trial.number)
                break
            if time.time() > self.deadline or trial.study.user_attrs.get("solved_by") is not None:
                break
            if trial.should_prune():
                self._save(trial, best_state, steps, t0, hp)
                raise optuna.TrialPruned()
        self._save(trial, best_state, steps, t0, hp)
        return best

    def _save(
        self, trial: optuna.Trial, state: dict | None, steps: int, t0: float, hp: dict
    ) -> None:
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("seconds", time.time() - t0)
        if state is not None:
            path = self.trial_dir / f"trial-{trial.number:05d}.pt"
            torch.save({"state_dict": state, "hp": hp}, path)
            trial.set_user_attr("state", str(path))


def _working_dtype(target: torch.Tensor) -> torch.dtype:
    return torch.complex64 if target.is_complex() else torch.float32  # the paper's float32


def _stop_when_solved(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if study.user_attrs.get("solved_by") is not None:
        study.stop()


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


def _pruner(sp: SearchParams) -> optuna.pruners.BasePruner:
    """Hyperband (the paper's scheduler), optionally also dropping stalled trials."""
    hyperband = optuna.pruners.HyperbandPruner(
        min_resource=sp.min_epochs, max_resource=sp.max_epochs, reduction_factor=sp.reduction_factor
    )
    return (
        hyperband
        if sp.patience == 0
        else StalledOrHyperband(hyperband, sp.patience, sp.min_delta_decades)
    )


def open_storage(url: str | None, work_dir: Path) -> optuna.storages.BaseStorage | str:
    """An Optuna storage: the given URL, or a journal file under work_dir (multi-process safe)."""
    if url:
        return url
    from optuna.storages.journal import JournalFileBackend

    work_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(work_dir / "optuna.journal")))


def run_worker(
    storage_url: str | None,
    work_dir: str,
    study_name: str,
    worker: int,
    target: torch.Tensor | None = None,
) -> None:
    """Run a study's trials until its cap, its deadline or a solve; any machine may call it."""
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, Path(work_dir))
    attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    if target is None:
        target = target_matrix(attrs["target"], attrs["n"])
    sp = SearchParams(**attrs["search"])
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=sp.seed * 1000 + worker),
        pruner=_pruner(sp),
    )
    remaining = attrs["deadline"] - time.time()
    if remaining <= 0:
        return
    Path(attrs["trial_dir"]).mkdir(parents=True, exist_ok=True)
    study.optimize(
        _Objective(attrs, target, attrs["deadline"]),
        timeout=remaining,
        callbacks=[
            optuna.study.MaxTrialsCallback(attrs["max_trials"], states=None),
            _stop_when_solved,
        ],
        catch=(),
    )


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
    study_name = f"recover/{name}/{n}/{model}/{int(t0)}"
    attrs = {
        "target": name,
        "n": n,
        "model": model,
        "search": asdict(sp),
        "max_trials": sp.trials_for(n),
        "deadline": t0 + sp.seconds_for(n),
        "trial_dir": str((cell_dir / "trials").resolve()),
    }
    st = open_storage(storage, work_dir)
    study = optuna.create_study(study_name=study_name, storage=st, direction="minimize")
    for k, v in attrs.items():
        study.set_user_attr(k, v)
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
    capped = time.time() > attrs["deadline"] and study.user_attrs.get("solved_by") is None
    done = [t for t in study.trials if "state" in t.user_attrs]
    steps = sum(t.user_attrs.get("steps", 0) for t in study.trials)
    if not done:
        log(f"  {name} n={n} {model}: no trial finished an epoch within the budget")
        res = CellResult(
            name,
            n,
            model,
            float("nan"),
            float("nan"),
            len(study.trials),
            steps,
            time.time() - t0,
            True,
            {},
            None,
        )
        return res, None
    best_model, best_mse, best_hp = _final_polish(done, target, n, model, sp, study)
    result = CellResult(
        name,
        n,
        model,
        math.sqrt(best_mse),
        best_mse,
        len(study.trials),
        steps,
        time.time() - t0,
        capped,
        best_hp,
        None,
    )
    return result, best_model


def _final_polish(
    done: list, target: torch.Tensor, n: int, model: str, sp: SearchParams, study: optuna.Study
) -> tuple[ButterflyStack, float, dict[str, Any]]:
    """The best trials get `final_steps` L-BFGS steps with the permutation frozen."""
    work_target = target.to(_working_dtype(target))
    solved = study.user_attrs.get("solved_by")
    ranked = sorted(done, key=lambda t: t.value if t.value is not None else _last(t))
    top = (
        [t for t in ranked if t.number == solved] if solved is not None else ranked[: sp.final_top]
    )
    best: tuple[ButterflyStack, float, dict[str, Any]] | None = None
    for t in top:
        saved = torch.load(t.user_attrs["state"], weights_only=True)
        m = _build(n, model, not target.is_complex(), saved["hp"])
        m.load_state_dict(saved["state_dict"])
        if any(bool(p.hard) for p in m.permutations()):
            m.round_permutations_()
        with torch.no_grad():
            before = _finite(mse_loss(m.matrix(), work_target).item())
        polished, after = polish(m, work_target, sp.final_steps) if sp.final_steps else (m, before)
        cand = (polished, after, saved["hp"]) if after < before else (m, before, saved["hp"])
        if best is None or cand[1] < best[1]:
            best = cand
    assert best is not None
    return best


def _last(t: optuna.trial.FrozenTrial) -> float:
    """A pruned trial's last reported MSE (reports are log10 MSE)."""
    values = list(t.intermediate_values.values())
    return 10.0 ** values[-1] if values else float("inf")


def baselines(target: torch.Tensor, which: list[str]) -> dict[str, float]:
    """RMSE of the closed-form rows at the budget of 2 n log2 n parameters."""
    n = target.shape[0]
    budget = 2 * n * int(math.log2(n))
    out: dict[str, float] = {}
    if "sparse" in which or "sparse_lowrank" in which:
        out["sparse"] = rmse(sparse_projection(target, min(budget, n * n)), target)
    if "lowrank" in which or "sparse_lowrank" in which:
        out["lowrank"] = rmse(lowrank_projection(target, int(math.log2(n))), target)
    if "sparse_lowrank" in which:
        out["sparse_lowrank"] = min(out["sparse"], out["lowrank"])  # as the paper plots it
    if "hierarchical" in which:
        out["hierarchical"] = min(_hierarchical_rmse(target, perm) for perm in _known_perms(n))
    return {k: v for k, v in out.items() if k in which}


def _known_perms(n: int) -> list[torch.Tensor]:
    """The permutations the closed-form row may assume: identity and bit reversal."""
    return [torch.arange(n), bit_reversal(n)]


def _hierarchical_rmse(target: torch.Tensor, perm: torch.Tensor) -> float:
    """RMSE of the hierarchical factorization of target = B P, P x = x[perm] (B = M[:, perm])."""
    n = target.shape[0]
    tw = hierarchical_butterfly(target[:, perm])
    approx_b = butterfly_multiply_reference(tw, torch.eye(n, dtype=tw.dtype)).transpose(0, 1)
    return rmse(approx_b[:, torch.argsort(perm)], target)


def run_grid(params: RecoverParams, work_dir: Path, log: Log = print) -> Iterator[dict[str, Any]]:
    """Every cell of the grid: yields one record per (target, n, method), learned rows first."""
    sp = params.search_params
    with trial_pool(sp.workers) or contextlib.nullcontext() as pool:
        yield from _grid(params, sp, work_dir, log, pool)


def _grid(
    params: RecoverParams,
    sp: SearchParams,
    work_dir: Path,
    log: Log,
    pool: ProcessPoolExecutor | None,
) -> Iterator[dict[str, Any]]:
    for name, ns in params.sizes.items():
        model = params.models[name]
        for n in ns:
            target = target_matrix(name, n)
            log(f"[recover] {name} n={n} model={model}: up to {sp.trials_for(n)} trials")
            res, best = learn_cell(target, name, model, sp, work_dir, params.storage, log, pool)
            if best is not None:
                path = work_dir / "factors" / f"{name}-{n}-{model}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_factors(best, path, {"target": name, "n": n, "rmse": res.rmse})
                res.factors = path
            log(
                f"[recover] {name} n={n} {model}: rmse={res.rmse:.2e} trials={res.trials} "
                f"{res.seconds:.0f}s{' (budget cap)' if res.budget_capped else ''}"
            )
            yield _record(res)
            t0 = time.time()
            rows = baselines(target, params.baselines)
            for method, value in rows.items():
                yield {
                    "target": name,
                    "n": n,
                    "method": method,
                    "model": method,
                    "rmse": value,
                    "trials": 0,
                    "steps": 0,
                    "seconds": time.time() - t0,
                    "budget_capped": False,
                    "factors": None,
                    "best_params": {},
                }


def _record(res: CellResult) -> dict[str, Any]:
    return {
        "target": res.target,
        "n": res.n,
        "method": res.model,
        "model": res.model,
        "rmse": res.rmse,
        "trials": res.trials,
        "steps": res.steps,
        "seconds": res.seconds,
        "budget_capped": res.budget_capped,
        "factors": res.factors,
        "best_params": res.best_params,
    }
