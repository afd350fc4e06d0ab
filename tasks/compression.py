"""CIFAR-10 single-hidden-layer compression (docs/protocol.md section 3): train, evaluate, time.

The network is x -> W x + b -> ReLU -> Linear(n, 10) with W the n x n layer under test
(n = 1024: 32x32 grayscale pixels). Protocol: grayscale by channel average, per-feature
standardisation with the statistics of the training part, a seeded validation split, Adam,
early stopping on validation accuracy, test accuracy of the best-validation checkpoint.

Early stopping decides when every run ends: `patience` epochs without a validation gain of
more than `min_delta` points. `max_epochs` (and `max_seconds`) only guard against runaways: a
run stopped by one is flagged (`stopped_by`), and `still_improving` says whether its best
validation epoch was within the last `patience` epochs when it was cut off.

A task takes params and a `log` callback and returns records; it never touches MLflow or DVC.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import heapq
import itertools
import json
import math
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kernels.atomic import atomic_save
from kernels.structured import METHODS, make_layer

N_FEATURES = 1024
N_CLASSES = 10
PROJECTED = {"dense_to_butterfly": "butterfly_untied", "dense_to_monarch": "monarch"}
"""Train dense, project its hidden matrix onto a class in closed form, then fine-tune."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class CompressParams:
    """Knobs of the compress stage (params.yaml: compress + profiles.<p>.compress)."""

    methods: list[str]
    seeds: list[int]
    lrs: list[float]  # candidates searched on validation accuracy with the first seed
    method_lrs: dict[str, list[float]] = field(default_factory=dict)  # per-method candidates
    n_train: int | None = None
    n_test: int | None = None
    val_fraction: float = 0.15
    split_seed: int = 0
    batch_size: int = 256
    max_epochs: int = 30  # runaway guard; a run that reaches it is flagged
    patience: int = 4  # epochs without a validation gain before a run stops
    min_delta: float = 0.0  # validation accuracy points a gain must exceed
    finetune_epochs: int = 10  # runaway guard of the fine-tune after a projection
    max_seconds: float | None = None  # runaway guard per training run (checked each epoch)
    threads: int = 2  # torch threads of each training process
    workers: int = 1  # training runs of one method at once, each in its own process
    lr_extend: int = 0  # candidates the lr search may add beyond an edge of its grid (next_lr)
    latency_threads: int = 1
    latency_repeats: int = 50

    def validate(self) -> None:
        allowed = set(METHODS) | set(PROJECTED)
        for m in self.methods:
            if m not in allowed:
                raise ValueError(f"unknown method {m!r} (allowed: {', '.join(sorted(allowed))})")
        if not self.seeds or not self.lrs:
            raise ValueError("seeds and lrs must not be empty")
        for m, lrs in self.method_lrs.items():
            if m not in allowed or not lrs:
                raise ValueError(f"method_lrs: {m!r} needs a known method and >= 1 lr")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr_extend < 0:
            raise ValueError(f"lr_extend must be >= 0, got {self.lr_extend}")
        for name in (
            "batch_size",
            "max_epochs",
            "patience",
            "threads",
            "workers",
            "latency_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(lr <= 0 for lrs in (self.lrs, *self.method_lrs.values()) for lr in lrs):
            raise ValueError(f"learning rates must be > 0, got {self.lrs} {self.method_lrs}")

    def lrs_for(self, method: str) -> list[float]:
        """The learning rates searched for `method`."""
        return list(self.method_lrs.get(method, self.lrs))


@dataclass
class Features:
    """Standardised grayscale features: x (count, 1024) float32, y (count,) int64 per split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def counts(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def _subsample(y: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Indices of a class-stratified subsample of `count` items (all of them when None)."""
    if count is None or count >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    per_class = max(1, count // N_CLASSES)
    keep = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(N_CLASSES)]
    return np.sort(np.concatenate(keep))


def grayscale(images: np.ndarray) -> np.ndarray:
    """(count, 32, 32, 3) uint8 -> (count, 1024) float32, the channel average.

    The channel sum is exact in uint16 and float32, so sum / 3 equals the float32 mean to the
    bit, without a float copy of every channel (3x faster on the training set)."""
    total = images.sum(axis=-1, dtype=np.uint16).astype(np.float32)
    return (total / np.float32(3)).reshape(len(images), -1)


def make_features(arrays: dict[str, np.ndarray], p: CompressParams) -> Features:
    """Grayscale, seeded validation split, standardisation with training-part statistics."""
    tr = _subsample(arrays["y_train"], p.n_train, p.split_seed)
    te = _subsample(arrays["y_test"], p.n_test, p.split_seed + 1)
    x, y = grayscale(arrays["x_train"][tr]), arrays["y_train"][tr].astype(np.int64)
    x_test, y_test = grayscale(arrays["x_test"][te]), arrays["y_test"][te].astype(np.int64)
    order = np.random.default_rng(p.split_seed).permutation(len(y))
    n_val = max(1, int(round(p.val_fraction * len(y))))
    val, train = order[:n_val], order[n_val:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0) + 1e-6  # a constant pixel must not divide by zero

    def norm(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float()

    return Features(
        norm(x[train]),
        torch.from_numpy(y[train]),
        norm(x[val]),
        torch.from_numpy(y[val]),
        norm(x_test),
        torch.from_numpy(y_test),
    )


class HiddenNet(nn.Module):
    """x (batch, n) -> Linear(n, 10)(ReLU(W x + b)); W is the structured layer under test."""

    def __init__(self, hidden: nn.Module, n: int = N_FEATURES, classes: int = N_CLASSES):
        super().__init__()
        self.hidden = hidden
        self.bias = nn.Parameter(torch.zeros(n))
        self.out = nn.Linear(n, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x) + self.bias))


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    """Percent of correct argmax predictions."""
    net.eval()
    correct = sum(
        int((net(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    return 100.0 * correct / max(1, len(y))


STOP_REASONS = ("patience", "epoch_cap", "time_cap", "diverged")
"""Why a run ended: early stopping, a runaway guard (flagged), or a non-finite loss."""
CAPS = ("epoch_cap", "time_cap")


def still_improving(stopped_by: str, epochs: int, best_epoch: int, patience: int) -> bool:
    """A run cut off by a cap whose best validation epoch lies within its last `patience`
    epochs: early stopping had not yet decided, so more training could have helped."""
    return stopped_by in CAPS and epochs - best_epoch < patience


@dataclass
class Trained:
    """Outcome of one training run: the best-validation state and the learning curve."""

    state: dict[str, torch.Tensor]
    val_accuracy: float
    best_epoch: int
    epochs: int
    seconds: float
    stopped_by: str = "patience"
    curve: list[dict[str, float]] = field(default_factory=list)
    pre: Trained | None = None  # the dense phase of a projected method

    @property
    def diverged(self) -> bool:
        return self.stopped_by == "diverged"

    @property
    def capped(self) -> bool:
        """Stopped by a runaway guard (epoch or time cap), not by early stopping."""
        return self.stopped_by in CAPS


RUN_KNOBS = ("n_train", "n_test", "val_fraction", "split_seed", "batch_size", "max_epochs",
             "patience", "min_delta", "max_seconds", "threads")  # fmt: skip
"""The knobs a training run depends on besides its method, lr and seed (a projected method's
also on `finetune_epochs`)."""


@dataclass(frozen=True)
class RunCache:
    """Finished training runs kept in `folder`, one file per (method, lr, seed) and key.

    A run is a function of its method, lr, seed, the RUN_KNOBS, the data and the code (the
    `context`: data checksum and code digest), so a kept run whose key matches stands for it:
    a killed stage resumes where it stopped, a wider lr grid trains only its new candidates, and
    the dense phase of a projected method is the dense method's run (same net, data split,
    seed, lr and stopping rule). folder None: nothing is kept.
    """

    folder: Path | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def key(self, method: str, p: CompressParams, lr: float, seed: int) -> dict[str, Any]:
        knobs = {k: getattr(p, k) for k in RUN_KNOBS}
        if method in PROJECTED:
            knobs["finetune_epochs"] = p.finetune_epochs
        return {**knobs, **self.context, "method": method, "lr": lr, "seed": seed}

    def _path(self, key: dict[str, Any]) -> Path:
        assert self.folder is not None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / key["method"] / f"lr{key['lr']:g}-seed{key['seed']}-{digest}.pt"

    def load(
        self, method: str, p: CompressParams, lr: float, seed: int
    ) -> tuple[Trained, float | None] | None:
        """(the run, its projected val accuracy or None) if kept under this key, else None."""
        if self.folder is None:
            return None
        key = self.key(method, p, lr, seed)
        path = self._path(key)
        if not path.is_file():
            return None
        blob = torch.load(path, weights_only=True)
        if blob.get("key") != key:
            return None
        pre = None if blob["pre"] is None else Trained(**blob["pre"])
        return Trained(**blob["trained"], pre=pre), blob["projected"]

    def save(
        self, method: str, p: CompressParams, lr: float, seed: int, t: Trained,
        projected: float | None = None,
    ) -> None:  # fmt: skip
        """Keep a finished run (kernels.atomic: never half a file)."""
        if self.folder is None:
            return
        key = self.key(method, p, lr, seed)
        path = self._path(key)
        fields = [f for f in Trained.__dataclass_fields__ if f != "pre"]
        blob = {
            "key": key,
            "trained": {f: getattr(t, f) for f in fields},
            "pre": None if t.pre is None else {f: getattr(t.pre, f) for f in fields},
            "projected": projected,
        }
        atomic_save(path, lambda tmp: torch.save(blob, tmp))


def _stop_reason(
    epoch: int, best_epoch: int, loss: float, elapsed: float, epochs: int, p: CompressParams
) -> str | None:
    """Why training stops after `epoch`, or None to go on; patience wins over the caps."""
    if not math.isfinite(loss):
        return "diverged"
    if epoch - best_epoch >= p.patience:
        return "patience"
    if epoch >= epochs:
        return "epoch_cap"
    if p.max_seconds is not None and elapsed >= p.max_seconds:
        return "time_cap"
    return None


def train(
    net: nn.Module,
    f: Features,
    lr: float,
    epochs: int,
    p: CompressParams,
    seed: int,
    log: Log,
    label: str,
) -> Trained:
    """Adam with early stopping on validation accuracy; net ends at its best checkpoint.

    `epochs` is the runaway cap; see _stop_reason for the order of the stopping rules.
    """
    gen = torch.Generator().manual_seed(seed)
    # fused: one kernel per step instead of a dozen passes over each parameter (the same
    # update up to rounding)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    best = Trained(copy.deepcopy(net.state_dict()), accuracy(net, f.x_val, f.y_val), 0, 0, 0.0)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(f.y_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), p.batch_size):
            idx = order[i : i + p.batch_size]
            loss = loss_fn(net(f.x_train[idx]), f.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        train_loss = total / count
        val = accuracy(net, f.x_val, f.y_val) if math.isfinite(train_loss) else math.nan
        elapsed = time.perf_counter() - t0
        best.curve.append(
            {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val, "seconds": elapsed}
        )
        best.epochs = epoch
        log(f"[compress] {label} epoch {epoch}: loss {train_loss:.4f} val {val:.2f}%")
        if math.isfinite(val) and (val > best.val_accuracy + p.min_delta or best.best_epoch == 0):
            best.state, best.val_accuracy, best.best_epoch = (
                copy.deepcopy(net.state_dict()),
                val,
                epoch,
            )
        reason = _stop_reason(epoch, best.best_epoch, train_loss, elapsed, epochs, p)
        if reason is not None:
            best.stopped_by = reason
            break
    best.seconds = time.perf_counter() - t0
    net.load_state_dict(best.state)
    return best


@torch.inference_mode()
def latency_ms(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int) -> float:
    """Median wall time of fn(x) in milliseconds, after warm-up."""
    for _ in range(max(3, repeats // 10)):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_latency(net: HiddenNet, p: CompressParams, seed: int) -> dict[str, float]:
    """Inference latency of the hidden layer and the whole net at batch 1 and 256."""
    net.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(p.latency_threads)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    try:
        for batch in (1, 256):
            x = torch.randn(batch, N_FEATURES, generator=gen)
            reps = p.latency_repeats if batch == 1 else max(5, p.latency_repeats // 5)
            out[f"latency_hidden_b{batch}_ms"] = latency_ms(net.hidden, x, reps)
            out[f"latency_net_b{batch}_ms"] = latency_ms(net, x, reps)
    finally:
        torch.set_num_threads(threads)
    return out


def _count(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


def _fresh_net(method: str, seed: int) -> HiddenNet:
    torch.manual_seed(seed)  # nn.Linear's init draws from the global generator
    return HiddenNet(make_layer(method, N_FEATURES, torch.Generator().manual_seed(seed)))


def step_seconds(method: str, f: Features, p: CompressParams, steps: int = 3) -> float:
    """Wall time of one training step of `method` (forward, backward, Adam) at p.batch_size
    with the caller's threads: the median of `steps` after one warm-up. A projected method's
    step is its fine-tune's. train_all's scheduler starts the costlier methods first."""
    net = _fresh_net(PROJECTED.get(method, method), 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    x, y = f.x_train[: p.batch_size], f.y_train[: p.batch_size]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _fit(
    method: str,
    f: Features,
    lr: float,
    seed: int,
    p: CompressParams,
    log: Log,
    pre: Trained | None = None,
):
    """Train one method at one lr and seed; projected methods pre-train dense first.

    Returns (net, trained, projected val accuracy or None); for a projected method
    trained.pre holds the dense phase (its curve comes first in trained.curve). `pre`: that
    dense phase, already trained by the dense method (RunCache), instead of training it here.
    """
    label = f"{method} seed={seed} lr={lr:g}"
    if method not in PROJECTED:
        net = _fresh_net(method, seed)
        return net, train(net, f, lr, p.max_epochs, p, seed, log, label), None
    dense = _fresh_net("dense", seed)
    if pre is None:
        pre = train(dense, f, lr, p.max_epochs, p, seed, log, f"{label} (dense phase)")
    else:
        dense.load_state_dict(pre.state)  # where train() leaves the net: its best checkpoint
        log(f"[compress] {label}: dense phase reused (val {pre.val_accuracy:.2f}%)")
    kind = make_layer(PROJECTED[method], N_FEATURES)
    with torch.no_grad():
        hidden = type(kind).from_matrix(dense.hidden.matrix().detach())
    net = HiddenNet(hidden)
    net.bias.data.copy_(dense.bias.data)
    net.out.load_state_dict(dense.out.state_dict())
    projected = accuracy(net, f.x_val, f.y_val)
    log(f"[compress] {label}: dense val {pre.val_accuracy:.2f}% -> projected {projected:.2f}%")
    fine = train(net, f, lr, p.finetune_epochs, p, seed + 1, log, f"{label} (fine-tune)")
    fine.seconds += pre.seconds
    fine.pre = pre
    fine.curve = pre.curve + [
        {**c, "epoch": c["epoch"] + pre.epochs, "seconds": c["seconds"] + pre.seconds}
        for c in fine.curve
    ]
    return net, fine, projected


def _flags(t: Trained, p: CompressParams) -> dict[str, Any]:
    """Stop reason and the cap flags of a run, over both phases of a projected method."""
    phases = [t] if t.pre is None else [t.pre, t]
    improving = any(
        still_improving(x.stopped_by, x.epochs, x.best_epoch, p.patience) for x in phases
    )
    return {
        "stopped_by": t.stopped_by
        if t.pre is None or not t.pre.capped
        else f"dense phase {t.pre.stopped_by}; fine-tune {t.stopped_by}",
        "diverged": any(x.diverged for x in phases),
        "budget_capped": any(x.capped for x in phases),
        "still_improving": improving,
    }


Job = tuple[float, int]  # (lr, seed) of one training run
Fitted = tuple["HiddenNet", Trained, float | None]
_WORKER: dict[str, Any] = {}


def _worker_init(f: Features, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["features"] = f


def _worker_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _worker_fit(method: str, lr: float, seed: int, p: CompressParams, pre: Trained | None):
    return _fit(method, _WORKER["features"], lr, seed, p, _worker_log, pre)


@dataclass
class _Progress:
    """'k of n runs' of one method (or of all, `parent`) with the time spent and an estimate
    of the time left; thread-safe (compress-train's methods share one `parent`)."""

    method: str
    planned: int
    log: Log
    parent: _Progress | None = None
    done: int = 0
    reused: int = 0  # of `done`: kept runs (RunCache), not trained here
    t0: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def plan(self, more: int) -> None:
        with self.lock:
            self.planned += more
        if self.parent is not None:
            self.parent.plan(more)

    def step(self, reused: bool = False) -> None:
        with self.lock:
            self.done += 1
            self.reused += reused
            spent = time.perf_counter() - self.t0
            left = spent / self.done * max(0, self.planned - self.done)
            line = (f"[compress] {self.method}: {self.done} of {self.planned} runs done, "
                    f"{spent:.0f} s, about {left:.0f} s left")  # fmt: skip
        self.log(line)
        if self.parent is not None:
            self.parent.step(reused)


def _fit_jobs(
    method: str,
    f: Features,
    jobs: list[Job],
    p: CompressParams,
    log: Log,
    kept: RunCache,
    progress: _Progress,
    pool: Executor | _Scheduler | None = None,
    later: bool = False,
) -> dict[Job, Fitted]:
    """_fit for every (lr, seed) job: in this process, `workers` spawned processes at once, or
    the shared `pool` (train_all; `later`: jobs of a method's later phase, its extensions and
    seeds).

    Runs are independent and seeded, so the result does not depend on `workers`. A job kept in
    `kept` is not trained again; a projected method's dense phase is the dense method's run
    (_dense_phases). Every run trained here (and its dense phase) is kept.
    """
    runs: dict[Job, Fitted] = {}
    for job in jobs:
        hit = kept.load(method, p, *job)
        if hit is not None:
            trained, projected = hit
            runs[job] = (_kept_net(method, job[1], trained.state), trained, projected)
            log(f"[compress] {method} seed={job[1]} lr={job[0]:g}: kept run reused "
                f"(val {trained.val_accuracy:.2f}%)")  # fmt: skip
            progress.step(reused=True)
    todo = [job for job in jobs if job not in runs]
    pre = _dense_phases(todo, p, kept, pool) if method in PROJECTED else dict.fromkeys(todo)

    def keep(job: Job, fitted: Fitted) -> None:  # as each run ends: a kill loses only the running
        _, trained, projected = fitted
        kept.save(method, p, *job, trained, projected)
        if trained.pre is not None and pre[job] is None:
            kept.save("dense", p, *job, trained.pre)
        runs[job] = fitted
        progress.step()

    _fit_all(method, f, todo, p, log, pre, keep, pool, later)
    return runs


def _dense_phases(
    jobs: list[Job], p: CompressParams, kept: RunCache, pool: Executor | _Scheduler | None
) -> dict[Job, Trained | None]:
    """The dense phase of each job of a projected method: the dense method's kept run; else,
    with train_all's shared pool, its run there (the dense method's own, or asked now: trained
    once either way, then kept); else None: the projected run trains it itself."""
    phases: dict[Job, Trained | None] = {}
    for job in jobs:
        hit = kept.load("dense", p, *job)
        phases[job] = None if hit is None else hit[0]
    if isinstance(pool, _Scheduler):
        asked = {job: pool.submit(_worker_fit, "dense", *job, p, None) for job in jobs
                 if phases[job] is None}  # fmt: skip
        for job, fut in asked.items():
            phases[job] = fut.result()[1]
            kept.save("dense", p, *job, phases[job])
    return phases


def _kept_net(method: str, seed: int, state: dict[str, torch.Tensor]) -> HiddenNet:
    """The net of a kept run: its method's layer with the run's best-validation state."""
    if method in PROJECTED:
        net = HiddenNet(make_layer(PROJECTED[method], N_FEATURES))
    else:
        net = _fresh_net(method, seed)
    net.load_state_dict(state)
    return net


def _fit_all(
    method: str,
    f: Features,
    jobs: list[Job],
    p: CompressParams,
    log: Log,
    pre: dict[Job, Trained | None],
    done: Callable[[Job, Fitted], None],
    pool: Executor | _Scheduler | None = None,
    later: bool = False,
) -> None:
    """Train every job, calling done(job, fitted) as each one ends (in `pool` if given)."""
    if pool is None and (p.workers == 1 or len(jobs) <= 1):
        for job in jobs:
            done(job, _fit(method, f, *job, p, log, pre[job]))
        return
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(_pool(f, p, min(p.workers, len(jobs))))
        rank = {"later": later} if isinstance(pool, _Scheduler) else {}
        futures = {pool.submit(_worker_fit, method, *job, p, pre[job], **rank): job for job in jobs}
        for fut in as_completed(futures):
            done(futures[fut], fut.result())


def _pool(f: Features, p: CompressParams, workers: int) -> ProcessPoolExecutor:
    """`workers` spawned training processes holding the features (no fork of a process
    holding torch threads)."""
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(f, p.threads)
    )


class _Scheduler:
    """train_all's shared pool: at most `workers` runs in the processes at once; the waiting ones
    start by rank, then the costlier method first (`cost`: seconds per training step), then in
    the order asked. Rank: dense (its runs are the projected methods' dense phases), the
    projected methods (their fine-tunes are long), then the later phase of any method
    (extensions and seeds, which end its chain), then the searches. Costly chains start first
    so that the slowest method is not the tail. A run asked twice (dense's own run and a
    projection's dense phase) is trained once.

    `members`: the submitting threads to wait for (each in `member()`) before the first start,
    so that the first runs are the best-ranked, not whichever thread asked first.
    """

    def __init__(
        self, pool: Executor, workers: int, cost: dict[str, float] | None = None, members: int = 0
    ) -> None:
        self.pool, self.free, self.cost = pool, workers, cost or {}
        self.waiting: list[tuple[tuple[int, float, int], Future, tuple]] = []  # a heap
        self.asked: dict[tuple[str, float, int], Future] = {}
        self.lock = threading.Lock()
        self.order = itertools.count()
        self.absent = members  # members that have neither asked for a run nor ended
        self.local = threading.local()

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """A submitting thread: the pool waits for its first run (or its end) before starting."""
        self.local.absent = True
        try:
            yield
        finally:
            self._arrive()
            self._start()

    def _arrive(self) -> None:
        if getattr(self.local, "absent", False):
            self.local.absent = False
            with self.lock:
                self.absent -= 1

    def submit(
        self, fn: Callable[..., Fitted], method: str, lr: float, seed: int,
        p: CompressParams, pre: Trained | None, later: bool = False,
    ) -> Future:  # fmt: skip
        rank = 0 if method == "dense" else 1 if method in PROJECTED else 2 if later else 3
        key = (rank, -self.cost.get(method, 0.0), next(self.order))
        with self.lock:
            out = self.asked.get((method, lr, seed))
            if out is None:
                out = self.asked[(method, lr, seed)] = Future()
                heapq.heappush(self.waiting, (key, out, (fn, method, lr, seed, p, pre)))
        self._arrive()
        self._start()
        return out

    def _start(self) -> None:
        with self.lock:
            starts = []
            while self.free and self.waiting and self.absent <= 0:
                self.free -= 1
                starts.append(heapq.heappop(self.waiting))
        for _, out, call in starts:
            try:
                run = self.pool.submit(*call)
            except RuntimeError as e:  # the processes were shut down (or broke): a failed run
                self._end(out, e)
            else:
                run.add_done_callback(lambda run, out=out: self._end(out, run))

    def _end(self, out: Future, run: Future | RuntimeError) -> None:
        """A run ended (or could not start): hand its outcome on, start the next."""
        with self.lock:
            self.free += 1
        if isinstance(run, RuntimeError):
            out.set_exception(run)
        elif run.cancelled():
            out.cancel()
        elif run.exception() is not None:
            out.set_exception(run.exception())
        else:
            out.set_result(run.result())
        self._start()

    def cancel(self) -> None:
        """Drop the waiting runs (a failed run fails the call)."""
        with self.lock:
            waiting, self.waiting, self.absent = self.waiting, [], 0
        for _, out, _ in waiting:
            out.cancel()


def next_lr(lrs: list[float], best: float) -> float | None:
    """The candidate beyond the edge where `best` sits, None if it is inside (or one lr only).

    The grid's step pattern goes on (the ratio of the step before the edge step), so a 1-3-10
    grid stays one: [3e-4, 1e-3, 3e-3, 1e-2] goes on with 3e-2 (best 1e-2) or 1e-4 (best 3e-4).
    """
    grid = sorted(lrs)
    if len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    if best == grid[-1]:
        new = grid[-1] * (grid[-2] / grid[-3] if len(grid) > 2 else grid[-1] / grid[-2])
    else:
        new = grid[0] / (grid[2] / grid[1] if len(grid) > 2 else grid[1] / grid[0])
    return float(f"{new:.3g}")


def _best_lr(lrs: list[float], runs: dict[Job, Fitted], seed: int) -> float:
    """The lr of the best validation accuracy with `seed` (ties: the smaller lr)."""
    return max(lrs, key=lambda r: (runs[(r, seed)][1].val_accuracy, -r))


def planned_runs(method: str, p: CompressParams) -> int:
    """Runs of a method before any lr extension: its candidates, then the other seeds."""
    return len(p.lrs_for(method)) + len(p.seeds) - 1


def _search(
    method: str,
    f: Features,
    p: CompressParams,
    log: Log,
    kept: RunCache,
    progress: _Progress,
    pool: Executor | _Scheduler | None = None,
) -> tuple[float, list[float], str, dict[Job, Fitted]]:
    """The lr search on the first seed (extended past an edge, next_lr), then the other seeds
    at the chosen lr: (lr, candidates, "lr:val% ..." text, every run)."""
    first, lrs = p.seeds[0], sorted(p.lrs_for(method))
    runs = _fit_jobs(method, f, [(lr, first) for lr in lrs], p, log, kept, progress, pool)
    for _ in range(p.lr_extend):  # the best at an edge: one more candidate beyond it
        new = next_lr(lrs, _best_lr(lrs, runs, first))
        if new is None:
            break
        log(f"[compress] {method}: lr {_best_lr(lrs, runs, first):g} is at an edge: trying {new:g}")
        progress.plan(1)
        runs.update(_fit_jobs(method, f, [(new, first)], p, log, kept, progress, pool, True))
        lrs = sorted([*lrs, new])
    lr = _best_lr(lrs, runs, first)
    search = " ".join(f"{r:g}:{runs[(r, first)][1].val_accuracy:.2f}" for r in lrs)
    if len(lrs) > 1:
        log(f"[compress] {method}: lr search (val %) {search} -> {lr:g}")
    others = [(lr, s) for s in p.seeds if s != first]
    runs.update(_fit_jobs(method, f, others, p, log, kept, progress, pool, True))
    return lr, lrs, search, runs


def run_method(
    method: str,
    arrays: dict[str, np.ndarray],
    p: CompressParams,
    log: Log,
    kept: RunCache | None = None,
) -> list[dict[str, Any]]:
    """Train `method` for every seed (after an lr search on validation if several lrs).

    The lr candidates train at once (`workers` processes); while the best sits at an edge of the
    grid, up to `lr_extend` more candidates train beyond it (next_lr); then the other seeds at
    the chosen lr. Returns one record per seed: accuracies, parameter counts, stop reason and
    cap flags, latency, learning curve, the best-validation state dict ("state") and the net
    ("net"), and the cost of the call: stage_seconds (wall time once the features are made),
    stage_runs and stage_runs_reused (taken from `kept`, not trained again).
    `kept`: where finished runs are kept and looked up (RunCache; None: nothing is kept).
    """
    kept = kept or RunCache()
    torch.set_num_threads(p.threads)
    f = make_features(arrays, p)
    log(f"[compress] {method}: features {f.counts()}")
    progress = _Progress(method, planned_runs(method, p), log)
    lr, lrs, search, runs = _search(method, f, p, log, kept, progress)
    records = []
    for seed in p.seeds:
        net, trained, projected = runs[(lr, seed)]
        record: dict[str, Any] = {
            "method": method,
            "seed": seed,
            "lr": lr,
            "lr_candidates": lrs,
            "lr_search": search,
            "hidden_params": _count(net.hidden),
            "total_params": _count(net),
            "val_accuracy": trained.val_accuracy,
            "test_accuracy": accuracy(net, f.x_test, f.y_test),
            "projected_val_accuracy": math.nan if projected is None else projected,
            "epochs": trained.epochs,
            "best_epoch": trained.best_epoch,
            **_flags(trained, p),
            "patience": p.patience,
            "max_epochs": p.max_epochs if projected is None else p.finetune_epochs,
            "seconds": trained.seconds,
            "curve": trained.curve,
            "state": trained.state,
            "net": net,
            **{f"n_{k}": v for k, v in f.counts().items()},
        }
        record.update(measure_latency(net, p, seed))
        flag = " (hit a cap while still improving)" if record["still_improving"] else ""
        log(
            f"[compress] {method} seed={seed}: test {record['test_accuracy']:.2f}% "
            f"(val {trained.val_accuracy:.2f}%), {record['hidden_params']} hidden params, "
            f"stopped by {record['stopped_by']}{flag}"
        )
        records.append(record)
    stage = {  # the method's whole cost: search, seeds and latency (kept runs cost ~nothing)
        "stage_seconds": time.perf_counter() - progress.t0,
        "stage_runs": progress.done,
        "stage_runs_reused": progress.reused,
    }
    return [{**r, **stage} for r in records]


def train_all(
    arrays: dict[str, np.ndarray], p: CompressParams, log: Log, kept: RunCache
) -> dict[str, Any]:
    """The training runs of every method of p.methods (the lr search and the seeds of
    run_method) in one pool of `workers` processes, kept in `kept`.

    Within one method the runs wait for each other (the seeds need the search's lr); across
    methods they fill the pool, in _Scheduler's order. A projected run waits only for the dense
    run that is its dense phase. run_method then finds every run kept. Returns the chosen lr
    per method and the cost: wall seconds, runs trained and reused.
    """
    torch.set_num_threads(p.threads)
    f = make_features(arrays, p)
    log(f"[compress] features {f.counts()}, {len(p.methods)} methods, {p.workers} worker(s)")
    cost = {m: step_seconds(m, f, p) for m in p.methods}
    log("[compress] training step (ms), the costliest first: " + ", ".join(
        f"{m} {1e3 * cost[m]:.1f}" for m in sorted(cost, key=cost.get, reverse=True)))  # fmt: skip
    total = _Progress("all methods", sum(planned_runs(m, p) for m in p.methods), log)
    chosen: dict[str, float] = {}

    def one(method: str) -> None:
        progress = _Progress(method, planned_runs(method, p), log, parent=total)
        with pool.member():
            chosen[method] = _search(method, f, p, log, kept, progress, pool)[0]

    with _pool(f, p, p.workers) as processes, ThreadPoolExecutor(len(p.methods)) as threads:
        pool = _Scheduler(processes, p.workers, cost, members=len(p.methods))
        try:
            for fut in [threads.submit(one, m) for m in p.methods]:
                fut.result()  # a failed run fails the call ...
        except BaseException:
            pool.cancel()  # ... without waiting for the rest
            processes.shutdown(wait=False, cancel_futures=True)
            raise
    return {
        "lr": {m: chosen[m] for m in p.methods},
        "wall_seconds": time.perf_counter() - total.t0,
        "runs": total.done,
        "runs_reused": total.reused,
        "workers": p.workers,
        "step_ms": {m: round(1e3 * cost[m], 3) for m in p.methods},
    }
