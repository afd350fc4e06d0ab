"""The search of one cell: an Optuna study of trials, run by workers on any machine.

The coordinator (`learn_cell`) creates the study, stores its definition in the study's user
attributes and enqueues every trial's hyper-parameters (drawn from one seeded generator, so the
same trials run whatever the number of workers). Workers (`run_worker`, here in a process pool
or elsewhere with `suite recover-worker`) take trials in groups of `batch_for(n)`, train each
group as one vectorised model in epochs, polish, report to the pruner (Hyperband, optionally
with a stall rule) and stop every trial once one reaches `threshold_mse`. At the end the best
`final_top` trials get `final_steps` more L-BFGS calls with the permutation frozen.

On a shared database (an RDB URL such as postgresql://) each running trial sends Optuna's
heartbeat; a trial whose worker died is failed after the grace period and queued again
(RetryFailedTrialCallback), and the coordinator waits until no trial runs anywhere before it
writes the cell. A trial's learned state is kept in the study itself, so any machine can read it.
"""

from __future__ import annotations

import base64
import io
import math
import os
import socket
import threading
import time
import warnings
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
RDB_DIALECTS = ("postgresql", "mysql", "sqlite", "oracle", "mssql")
WORKER_ID = f"{socket.gethostname()}/{os.getpid()}"  # a trial's user attr `worker`
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
# heartbeat, fail_stale_trials and the retry callback are experimental in Optuna 5: one line each
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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


def open_storage(
    url: str | None, work_dir: Path, heartbeat: dict[str, int] | None = None
) -> optuna.storages.BaseStorage | str:
    """An Optuna storage: the given URL, or a journal file under work_dir (multi-process safe).

    heartbeat: {interval, grace, retries} (seconds, seconds, count) for a database URL: running
    trials send a heartbeat; one silent for `grace` seconds is failed and queued again, at most
    `retries` times. Journal files have no heartbeat.
    """
    if url:
        if heartbeat and url.split(":", 1)[0].split("+")[0] in RDB_DIALECTS:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat["interval"],
                grace_period=heartbeat["grace"],
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                    max_retry=heartbeat["retries"]
                ),
            )
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


def _pack(state: dict[str, Any]) -> str:
    """A trial's state as text for the study's user attrs (any machine can read it back)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpack(text: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


class _Heartbeat:
    """Records Optuna's heartbeat of this worker's running trials every `interval` seconds."""

    def __init__(self, storage: optuna.storages.BaseStorage):
        self.storage, self.ids, self.lock = storage, set[int](), threading.Lock()
        self.interval = storage.get_heartbeat_interval()  # type: ignore[attr-defined]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _beats(storage: optuna.storages.BaseStorage | str) -> bool:
    """Whether the storage records heartbeats (an RDBStorage opened with an interval, as it is
    or wrapped in the cache a Study puts around it)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


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
        self.lbfgs = LBFGSConfig.of(self.sp)
        beats = _beats(study._storage)
        self.heartbeat = _Heartbeat(study._storage) if beats else None
        self.taken = 0

    def solved(self) -> bool:
        """Solved, or closed by its coordinator: either way, stop."""
        attrs = self.study.user_attrs
        return attrs.get("solved_by") is not None or attrs.get("state") == "closed"

    def take(self, count: int) -> list[tuple[optuna.Trial, TrialSpec]]:
        """Up to `count` trials of the plan, or queued again after their worker died (an asked
        trial past the plan is told FAIL, unused)."""
        out = []
        if self.heartbeat is not None and count:
            optuna.storages.fail_stale_trials(self.study)  # re-queues a dead worker's trials
        for _ in range(count):
            trial = self.study.ask()
            retry = "failed_trial" in trial.storage.get_trial_system_attrs(trial._trial_id)
            if trial.number >= self.a["max_trials"] and not retry:
                trial.set_user_attr("unused", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            trial.set_user_attr("worker", WORKER_ID)
            if self.heartbeat is not None:
                self.heartbeat.add(trial._trial_id)
            out.append((trial, _suggest(trial, self.sp, permutation_count(self.model))))
        self.taken += len(out)
        return out

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()

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
            trial.set_user_attr("state", _pack({"state_dict": slot.state, "hp": slot.spec.hp}))
        if pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, finite(slot.best))
        if self.heartbeat is not None:
            self.heartbeat.discard(trial._trial_id)


def run_worker(
    storage_url: str | None,
    work_dir: str,
    study_name: str,
    worker: int,
    target: torch.Tensor | None = None,
) -> int:
    """Run a study's trials until its plan, its CPU budget or a solve; any machine may call it.

    The budget of a cell (`cell_seconds`) is CPU time per worker process, so a cell does the
    same work on a busy machine as on a quiet one, only later. Returns the trials it took.
    """
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = open_storage(storage_url, Path(work_dir))
    attrs = optuna.load_study(study_name=study_name, storage=plain).user_attrs
    storage = open_storage(storage_url, Path(work_dir), attrs.get("heartbeat"))
    if target is None:
        target = target_matrix(attrs["target"], attrs["n"])
    sp = SearchParams.from_json(attrs["search"])
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=sp.seed * 1000 + worker),
        pruner=make_pruner(sp, attrs["n"]),
    )
    w = _Worker(study, target)
    try:
        w.run()
    finally:
        w.close()
    return w.taken


def open_cells(storage: optuna.storages.BaseStorage | str) -> list[str]:
    """Names of the cell studies a coordinator has opened and not yet closed, newest first."""
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.study_name.startswith("recover/") and s.user_attrs.get("state") == "open"
    ]
    return sorted(names, key=lambda name: int(name.rsplit("/", 1)[1]), reverse=True)


def serve(
    storage_url: str, work_dir: str, worker: int, idle_seconds: float, log: Log = print
) -> int:
    """Join every open cell of a shared storage in turn (each once) until none has opened for
    `idle_seconds`: what a worker on another machine runs. Returns the cells it joined."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, Path(work_dir))
    joined: set[str] = set()
    last = time.monotonic()
    while time.monotonic() - last < idle_seconds:
        fresh = [name for name in open_cells(storage) if name not in joined]
        if not fresh:
            time.sleep(min(0.5, idle_seconds / 10))
            continue
        joined.add(fresh[0])
        log(f"[recover-worker {WORKER_ID}] joined {fresh[0]}")
        taken = run_worker(storage_url, work_dir, fresh[0], worker)
        log(f"[recover-worker {WORKER_ID}] left {fresh[0]}: {taken} trials")
        last = time.monotonic()
    log(f"[recover-worker {WORKER_ID}] no open cell for {idle_seconds:.0f}s: done")
    return len(joined)


def settle(study: optuna.Study, rerun: Callable[[], object], log: Log, poll: float = 1.0) -> None:
    """Wait until no trial of the study runs on any machine.

    With a heartbeat, a trial whose worker died is failed after the grace period and queued
    again; queued retries of an unfinished cell (not solved, not capped) are run by `rerun`.
    Without one (a journal file), a trial of a dead remote worker would be waited for forever:
    a line every minute says so.
    """
    beats, said = _beats(study._storage), time.monotonic()
    while True:
        if beats:
            optuna.storages.fail_stale_trials(study)
        live = study.get_trials(deepcopy=False, states=(RUNNING, WAITING))
        running = [t for t in live if t.state == RUNNING]
        retries = [t for t in live if t.state == WAITING and "failed_trial" in t.system_attrs]
        attrs = study.user_attrs
        if retries and attrs.get("solved_by") is None and not attrs.get("capped"):
            log(f"  {len(retries)} trial(s) of a worker that died: running them here")
            rerun()
            continue
        if not running:
            return
        if time.monotonic() - said > 60:
            said = time.monotonic()
            hint = "" if beats else " (no heartbeat on this storage: a dead worker is not seen)"
            log(f"  waiting for {len(running)} trial(s) running elsewhere{hint}")
        time.sleep(poll)


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
    heartbeat: dict[str, int] | None = None,
) -> tuple[CellResult, ButterflyStack | None]:
    """Search, polish and return the best factorization of `target` with `model`.

    pool: from `trial_pool(sp.workers)`; without one, trials run in this process. Workers
    elsewhere (`serve`) join while the study is open; it is closed once no trial runs.
    heartbeat: see `open_storage`.
    """
    n = target.shape[0]
    t0 = time.time()
    study_name = f"recover/{name}/{n}/{model}/{time.time_ns()}"
    attrs = {
        "target": name,
        "n": n,
        "model": model,
        "search": asdict(sp),
        "max_trials": sp.trials_for(n),
        "cpu_seconds": sp.seconds_for(n),
        "heartbeat": heartbeat,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is the stage's one line
    st = open_storage(storage, work_dir, heartbeat)
    study = optuna.create_study(study_name=study_name, storage=st, direction="minimize")
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    for hp in trial_plan(sp, f"{name}/{n}/{model}", attrs["max_trials"], model):
        study.enqueue_trial(hp)
    study.set_user_attr("state", "open")  # last: workers elsewhere join from here on
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
    again = sp.workers  # a worker index of its own: retries sample nothing new, seeds differ

    def rerun() -> None:
        run_worker(storage, str(work_dir), study_name, again, user_target)

    settle(study, rerun, log, min(1.0, (heartbeat or {}).get("interval", 1)))
    study.set_user_attr("state", "closed")
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
        saved = _unpack(t.user_attrs["state"])
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
