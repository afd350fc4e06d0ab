"""The knobs of transform recovery: the search of one cell, and the grid of cells.

Paper values (the authors' 2019 protocol, docs/protocol.md) are in the comments; every profile
that differs from them is a row of the README's deviations table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kernels.butterfly import EXTRA_PERMS, MODELS
from tasks.targets import TARGETS

RECOVERED_RMSE = 1e-4
"""The paper's "machine precision" line: a cell is recovered at RMSE <= 1e-4 (MSE <= 1e-8)."""

LINE_SEARCHES = ("none", "strong_wolfe")
LOSSES = ("reals", "entries")
PERM_INITS = ("randn", "corners")
PER_N = ("trials", "cell_seconds", "batch", "patience_at")  # the SearchParams maps keyed by n


class FieldError(ValueError):
    """A bad value of one field; suite.params turns `field` into its path in params.yaml."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SearchParams:
    """The trial search of one cell (paper values in comments)."""

    trials: dict[int, int]  # n -> trials per cell (20, 20, 40, 60, 80, 160, 160, 320)
    max_epochs: int  # 200
    epoch_steps: int  # 400 Adam steps per epoch
    lr_min: float  # 1e-4
    lr_max: float  # 0.5
    share_logits: list[bool]  # sampled per trial: [true, false]
    inits: list[str]  # sampled per trial: randn (the paper's), ortho
    polish_every: int  # 5 epochs
    polish_steps: int  # 15 calls of L-BFGS step() ...
    polish_iters: int  # ... each of up to 20 iterations (torch's max_iter default)
    polish_history: int  # 100 (torch's default)
    polish_line_search: str  # none (torch's default) | strong_wolfe
    polish_tolerance_grad: float  # 1e-7 (torch's default); 0 = run every iteration
    polish_tolerance_change: float  # 1e-9 (torch's default)
    polish_below: float  # polish only when the Adam MSE is below this (paper: always, .inf)
    final_top: int  # 16 best trials ...
    final_steps: int  # ... get 50 more L-BFGS step() calls with the permutation frozen
    threshold_mse: float  # 1e-8, i.e. RMSE 1e-4: every trial stops once one reaches it
    loss: str  # reals: mean over the 2 N^2 real and imaginary parts (the paper) | entries: N^2
    extra_perm: str  # BPP's P': one (level at size N, the paper) | per_level
    min_epochs: int  # Hyperband's smallest budget, in epochs
    reduction_factor: int  # Hyperband's eta
    patience: int  # prune a trial whose best MSE stalls this many epochs (0: off, the paper)
    min_delta_decades: float  # ... stalls = improves by less than this many decades
    cell_seconds: dict[int, float]  # n -> CPU seconds per worker for a cell (the paper: no cap)
    batch: dict[int, int]  # n -> trials trained together in one vectorised model (paper: 1)
    workers: int  # parallel trial processes on this machine
    seed: int  # sampler seed
    # model -> randn: permutation logits ~ N(0, 1) (the paper; also where a model is absent) |
    # corners: trial t starts near hard choice t of the model's 8^permutations (a seeded order,
    # every choice once per cycle), logits +-CORNER_LOGIT, still learnt
    perm_init: dict[str, str] = field(default_factory=dict)
    # n -> `patience` at that n (the others keep `patience`): at N = 1024 a BPBP trial on the
    # right permutations can sit on the zero-output plateau (MSE ~ 1/N) for several epochs
    patience_at: dict[int, int] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0 < self.lr_min <= self.lr_max:
            raise FieldError("lr_min", "need 0 < lr_min <= lr_max")
        for name in (
            "max_epochs",
            "epoch_steps",
            "polish_every",
            "polish_iters",
            "polish_history",
            "workers",
            "min_epochs",
            "final_top",
        ):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{name} must be >= 1")
        for name in ("polish_steps", "final_steps", "patience"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"{name} must be >= 0")
        for name in ("min_delta_decades", "polish_tolerance_grad", "polish_tolerance_change"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"{name} must be >= 0")
        if self.reduction_factor < 2:
            raise FieldError("reduction_factor", "reduction_factor must be >= 2")
        for name in ("threshold_mse", "polish_below"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"{name} must be > 0")
        for name, allowed in (
            ("polish_line_search", LINE_SEARCHES),
            ("loss", LOSSES),
            ("extra_perm", EXTRA_PERMS),
        ):
            if getattr(self, name) not in allowed:
                raise FieldError(name, f"{name} must be one of {', '.join(allowed)}")
        if any(v < 0 for v in self.patience_at.values()):
            raise FieldError("patience_at", "patience_at must be >= 0 for every n")
        for name in ("trials", "batch"):
            if any(v < 1 for v in getattr(self, name).values()):
                raise FieldError(name, f"{name} must be >= 1 for every n")
        if any(v <= 0 for v in self.cell_seconds.values()):
            raise FieldError("cell_seconds", "cell_seconds must be > 0 for every n")
        for model, init in self.perm_init.items():
            if model not in MODELS or init not in PERM_INITS:
                raise FieldError(
                    f"perm_init.{model}",
                    f"need a model ({', '.join(MODELS)}) -> one of {', '.join(PERM_INITS)}",
                )
        if not self.share_logits:
            raise FieldError("share_logits", "share_logits needs at least one choice")
        if len(set(self.share_logits)) > 1 and any(b > 1 for b in self.batch.values()):
            raise FieldError("batch", "vectorised trials (batch > 1) need one share_logits choice")
        if not self.inits or any(i not in ("randn", "ortho") for i in self.inits):
            raise FieldError("inits", f"inits must be among randn, ortho, got {self.inits}")

    @classmethod
    def from_json(cls, data: dict) -> SearchParams:
        """Rebuild from `asdict` after a JSON round trip (which turns int keys into strings)."""
        sized = {k: {int(n): v for n, v in data[k].items()} for k in PER_N if k in data}
        return cls(**{**data, **sized})

    def cell_slice(self, n: int, model: str) -> dict:
        """The values one cell of size n and this model runs with: maps keyed by n or by model
        reduced to that cell's entry (what a kept cell's result depends on)."""
        out = asdict(self)
        out.update({k: getattr(self, k).get(n) for k in PER_N})
        out["perm_init"] = self.perm_init_for(model)
        return out

    def perm_init_for(self, model: str) -> str:
        return self.perm_init.get(model, "randn")

    def patience_for(self, n: int) -> int:
        return self.patience_at.get(n, self.patience)

    def trials_for(self, n: int) -> int:
        if n not in self.trials:
            raise FieldError("trials", f"no entry for n={n}")
        return self.trials[n]

    def seconds_for(self, n: int) -> float:
        if n not in self.cell_seconds:
            raise FieldError("cell_seconds", f"no entry for n={n}")
        return self.cell_seconds[n]

    def batch_for(self, n: int) -> int:
        """Trials per vectorised model at size n (1 where no entry: large n, one per core)."""
        return self.batch.get(n, 1)


@dataclass(frozen=True)
class HeartbeatParams:
    """Liveness of trials on a shared database storage (Optuna's heartbeat; RDB URLs only)."""

    interval: int = 60  # seconds between heartbeats of a running trial
    grace: int = 180  # a trial silent this long is failed and queued again ...
    retries: int = 2  # ... at most this many times

    def validate(self) -> None:
        for name in ("interval", "grace"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{name} must be >= 1 second")
        if self.grace <= self.interval:
            raise FieldError("grace", "grace must exceed interval (a live trial looks dead)")
        if self.retries < 0:
            raise FieldError("retries", "retries must be >= 0")


@dataclass(frozen=True)
class DiscreteParams:
    """Knobs of the discrete row (tasks/recovery/discrete.py): the fit of hard permutations
    (bpbp, and bp / bpp targets the closed form misses) and the level search's budget."""

    steps: int = 100  # Adam steps of the first halving round, doubled every round
    rounds: int = 4  # halving rounds: 64 combos -> 16 -> 4 -> 1 (bpbp: 256 starts -> ... -> 4)
    keep: float = 0.25  # fraction of combos kept after each round
    lr: float = 0.03
    init: str = "ortho"  # twiddle init (kernels.butterfly.INITS)
    polish_steps: int = 30  # L-BFGS calls (of up to 20 iterations) on the survivors
    max_nodes: int = 2_000  # backtracking budget of the level-by-level search
    seed: int = 0
    batch_entries: int = 2**18  # combos trained together: this many matrix entries in all
    restarts: int = 4  # bpbp: random starts per combo of permutations (bp, bpp: one)

    def batch_for(self, n: int) -> int:
        """Combos per vectorised model at size n (16 up to n = 128, 4 at 256, 1 from 512)."""
        return max(1, min(16, self.batch_entries // (n * n)))

    def validate(self) -> None:
        for name in ("steps", "rounds", "max_nodes", "batch_entries", "restarts"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{name} must be >= 1")
        if not 0 < self.keep <= 1:
            raise FieldError("keep", "keep must be in (0, 1]")
        if not self.lr > 0:
            raise FieldError("lr", "lr must be > 0")
        if self.init not in ("randn", "ortho"):
            raise FieldError("init", "init must be randn or ortho")
        if self.polish_steps < 0:
            raise FieldError("polish_steps", "polish_steps must be >= 0")


@dataclass(frozen=True)
class RecoverParams:
    """The recover stage: which cells, which models, which baselines, and the search."""

    models: dict[str, str]  # target -> bp | bpp | bpbp (the paper's choice per target)
    sizes: dict[str, list[int]]  # target -> the n to run
    baselines: list[str]
    search: SearchParams
    storage: str | None = None  # Optuna storage URL; None = a journal file in the work dir
    heartbeat: HeartbeatParams = field(default_factory=HeartbeatParams)
    target_budget: dict[str, float] = field(default_factory=dict)  # target -> x trials and cap
    # the discrete row beside the learned one (tasks/recovery/discrete.py); None: no such row
    discrete: DiscreteParams | None = None

    def validate(self) -> None:
        from tasks.recovery.baselines import BASELINES

        for t, model in self.models.items():
            if t not in TARGETS:
                raise FieldError(
                    f"models.{t}", f"unknown target '{t}' (known: {', '.join(TARGETS)})"
                )
            if model not in MODELS:
                raise FieldError(
                    f"models.{t}", f"model must be one of {', '.join(MODELS)}, got {model!r}"
                )
        for t, ns in self.sizes.items():
            if t not in self.models:
                raise FieldError(f"sizes.{t}", f"no model given for target '{t}'")
            for n in ns:
                if n < 8 or n & (n - 1):
                    raise FieldError(f"sizes.{t}", f"n must be a power of two >= 8, got {n}")
        for ns in self.sizes.values():
            for n in ns:
                try:  # every n has a budget
                    self.search.trials_for(n), self.search.seconds_for(n)
                except FieldError as exc:
                    raise FieldError(f"search.{exc.field}", str(exc)) from None
        for t, scale in self.target_budget.items():
            if t not in self.models or not scale > 0:
                raise FieldError(f"target_budget.{t}", "needs a known target and a factor > 0")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise FieldError("baselines", f"unknown '{bad[0]}' (known: {', '.join(BASELINES)})")

    def search_for(self, target: str, n: int) -> SearchParams:
        """The search of one cell: the profile's, with trials and cap scaled for the target."""
        scale = self.target_budget.get(target, 1.0)
        if scale == 1.0:
            return self.search
        sp = self.search
        return replace(
            sp,
            trials={**sp.trials, n: max(1, round(sp.trials_for(n) * scale))},
            cell_seconds={**sp.cell_seconds, n: sp.seconds_for(n) * scale},
        )

    def restricted(self, cells: list[tuple[str, int]]) -> RecoverParams:
        """The same params on a sub-grid of (target, n) cells; any size with a budget is allowed."""
        sizes: dict[str, list[int]] = {}
        for t, n in cells:
            sizes.setdefault(t, []).append(n)
        out = replace(self, sizes=sizes)
        out.validate()
        return out
