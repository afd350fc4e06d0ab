"""Training and polish of learned butterfly models: the loss, Adam over trials, L-BFGS.

A group of trials with the same model structure trains as one vectorised `ButterflyStack`
(a leading trial dimension; one Adam with a learning rate per trial, which is exactly
independent Adams since Adam is elementwise). The polish rounds the permutations of one trial
and runs L-BFGS the way the paper does: `steps` calls of `step()`, each of up to `iters`
iterations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from kernels.butterfly import MODELS, ButterflyStack
from tasks.recovery.params import SearchParams

CORNER_LOGIT = 4.0
"""A corner start's logits: sigmoid(4) = 0.98, near the hard choice and still learnable."""


def mse(approx: torch.Tensor, target: torch.Tensor, loss: str = "reals") -> torch.Tensor:
    """Mean squared error over the last two dims: a scalar, or (trials,) for (trials, n, n).

    reals: the mean over the real and imaginary parts (2 n^2 numbers for a complex target), as
    the paper computes it; entries: the mean of |d|^2 over the n^2 entries (twice as strict).
    """
    d = approx - target
    if d.is_complex():  # one real view: half the memory passes of |d|^2 from real and imag
        out = torch.view_as_real(d).square().mean(dim=(-3, -2, -1))
        return out if loss == "reals" else 2 * out
    return d.square().mean(dim=(-2, -1))


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


@dataclass(frozen=True)
class LBFGSConfig:
    """One polish: `steps` calls of torch's L-BFGS step(), each of up to `iters` iterations."""

    steps: int
    iters: int
    history: int
    line_search: str  # none | strong_wolfe
    tolerance_grad: float
    tolerance_change: float

    @classmethod
    def of(cls, sp: SearchParams, steps: int | None = None) -> LBFGSConfig:
        return cls(
            sp.polish_steps if steps is None else steps,
            sp.polish_iters,
            sp.polish_history,
            sp.polish_line_search,
            sp.polish_tolerance_grad,
            sp.polish_tolerance_change,
        )


def polish(
    model: ButterflyStack, target: torch.Tensor, cfg: LBFGSConfig, loss: str = "reals"
) -> tuple[ButterflyStack, float]:
    """A copy with its permutations rounded and its twiddles refined by L-BFGS.

    Returns the copy at the best step boundary and its MSE: a step that diverges (no line
    search can overshoot to inf/NaN) is undone and ends the polish.
    """
    model = copy.deepcopy(model).round_permutations_()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=cfg.iters,
        history_size=cfg.history,
        tolerance_grad=cfg.tolerance_grad,
        tolerance_change=cfg.tolerance_change,
        line_search_fn=None if cfg.line_search == "none" else cfg.line_search,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = mse(model.matrix(), target, loss)
        value.backward()
        for p in params:  # L-BFGS flattens every gradient with .view(-1)
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return value

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    with torch.no_grad():
        best = finite(mse(model.matrix(), target, loss).item())
    best_params = snapshot()
    for _ in range(cfg.steps):
        opt.step(closure)
        with torch.no_grad():
            value = finite(mse(model.matrix(), target, loss).item())
        if value < best:
            best, best_params = value, snapshot()
        elif not math.isfinite(value):
            break  # diverged: the best point so far is restored below
    with torch.no_grad():
        for p, b in zip(params, best_params, strict=True):
            p.copy_(b)
    return model, best


class BatchedAdam:
    """torch.optim.Adam (default betas and eps) over parameters whose leading dim is the trial.

    Each trial has its own learning rate and its own step count (bias correction), so trials
    can join and leave a running group. batched=False: an unbatched model, one trial.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: torch.Tensor,
        batched: bool,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params, self.lr, self.batched = params, lr.double(), batched
        self.betas, self.eps = betas, eps
        self.t = torch.zeros_like(self.lr)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _per_trial(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        x = x.to(p.real.dtype if p.is_complex() else p.dtype)
        return x.reshape(()) if not self.batched else x.reshape(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1 = 1 - b1**self.t
        c2 = (1 - b2**self.t).sqrt()
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None or not p.requires_grad:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / self._per_trial(c2, p)).add_(self.eps)
            p.sub_(self._per_trial(self.lr / c1, p) * m / denom)

    def regroup(self, params: list[torch.Tensor], keep: torch.Tensor, new_lr: torch.Tensor) -> None:
        """Keep the state of trials `keep`, append fresh trials with `new_lr`; `params` are the
        regrouped model's (kept trials first, in order)."""
        fresh = len(new_lr)
        self.params = params
        self.lr = torch.cat([self.lr[keep], new_lr.double()])
        self.t = torch.cat([self.t[keep], torch.zeros(fresh, dtype=self.t.dtype)])

        def grow(old: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.cat([old[keep], torch.zeros_like(p[len(keep) :])])

        self.m = [grow(m, p) for m, p in zip(self.m, params, strict=True)]
        self.v = [grow(v, p) for v, p in zip(self.v, params, strict=True)]


@dataclass(frozen=True)
class TrialSpec:
    """The sampled hyper-parameters of one trial (Optuna trial number and values)."""

    number: int
    lr: float
    share_logits: bool
    init: str
    seed: int
    corner: int = -1  # the hard choice its permutation logits start near; -1: N(0, 1) logits

    @property
    def hp(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "share_logits": self.share_logits,
            "init": self.init,
            "seed": self.seed,
            "corner": self.corner,
        }


def permutation_count(model: str) -> int:
    """How many learnable permutations the model has (P' counts): 1 bp, 2 bpp, 2 bpbp."""
    blocks, extra = MODELS[model]
    return blocks + int(extra)


def corner_logits(corner: int, count: int) -> list[torch.Tensor]:
    """The (3,) logits of each of `count` permutations (ButterflyStack.permutations() order) at
    corner `corner` of their 8^count hard choices: permutation j takes choice (corner >> 3j) & 7,
    whose bit i switches on relaxed choice i (even/odd, reverse first half, reverse second)."""
    if not 0 <= corner < 8**count:
        raise ValueError(f"corner must be in [0, {8**count}), got {corner}")
    out = []
    for j in range(count):
        choice = (corner >> (3 * j)) & 7
        bits = torch.tensor([(choice >> i) & 1 for i in range(3)], dtype=torch.float32)
        out.append((2 * bits - 1) * CORNER_LOGIT)
    return out


@torch.no_grad()
def start_at_corners(stack: ButterflyStack, specs: list[TrialSpec], batched: bool) -> None:
    """Set the permutation logits of every trial whose spec names a corner (every level alike)."""
    perms = stack.permutations()
    for t, spec in enumerate(specs):
        if spec.corner < 0:
            continue
        for perm, logits in zip(perms, corner_logits(spec.corner, len(perms)), strict=True):
            target = perm.logits[t] if batched else perm.logits
            target.copy_(logits.to(target.dtype).expand_as(target))


def build_stack(
    n: int, model: str, real: bool, specs: list[TrialSpec], extra_perm: str, batched: bool
) -> ButterflyStack:
    """The model of these trials (same share_logits): batched has a leading trial dim.

    Trial t of a batched stack holds exactly the parameters an unbatched stack of spec t
    would start from (its init, its seed), so grouping never changes a trial.
    """

    def one(spec: TrialSpec) -> ButterflyStack:
        return ButterflyStack(
            n,
            model,
            complex=True,
            tied=True,
            share_logits=spec.share_logits,
            init=spec.init,
            real_output=real,
            extra_perm=extra_perm,
            generator=torch.Generator().manual_seed(spec.seed),
        )

    if not batched:
        stack = one(specs[0])
        start_at_corners(stack, specs[:1], batched=False)
        return stack
    if len({s.share_logits for s in specs}) != 1:
        raise ValueError("trials of one batched model must share share_logits")
    gens = [torch.Generator().manual_seed(s.seed) for s in specs]
    stack = ButterflyStack(
        n,
        model,
        complex=True,
        tied=True,
        share_logits=specs[0].share_logits,
        init=specs[0].init,
        real_output=real,
        extra_perm=extra_perm,
        trials=len(specs),
        generator=gens,
    )
    if len({s.init for s in specs}) > 1:
        state = stack.state_dict()
        for t, spec in enumerate(specs):
            for k, v in one(spec).state_dict().items():
                if state[k].dim() > v.dim():
                    state[k][t] = v
        stack.load_state_dict(state)
    start_at_corners(stack, specs, batched=True)
    return stack


def working_dtype(target: torch.Tensor) -> torch.dtype:
    """The paper's float32 (complex64 for a complex target)."""
    return torch.complex64 if target.is_complex() else torch.float32


class TrialGroup:
    """Trials trained together: one batched model, one Adam, values per trial.

    Trials leave (`regroup` keeps a subset) and join (`regroup` appends fresh ones) between
    epochs, so a worker keeps its batch full. batched=False holds one unbatched trial.
    """

    def __init__(
        self,
        specs: list[TrialSpec],
        n: int,
        model: str,
        target: torch.Tensor,
        sp: SearchParams,
        batched: bool | None = None,
    ):
        self.n, self.model_name, self.sp = n, model, sp
        self.target = target.to(working_dtype(target))
        self.batched = len(specs) > 1 if batched is None else batched
        self.specs: list[TrialSpec] = []
        self.stack: ButterflyStack | None = None
        self.opt: BatchedAdam | None = None
        self.regroup([], specs)

    def _build(self, specs: list[TrialSpec]) -> ButterflyStack:
        real = not self.target.is_complex()
        return build_stack(self.n, self.model_name, real, specs, self.sp.extra_perm, self.batched)

    def losses(self) -> torch.Tensor:
        """(trials,) MSE of each trial's matrix."""
        assert self.stack is not None
        return mse(self.stack.matrix(), self.target, self.sp.loss).reshape(-1)

    def epoch(self) -> list[float]:
        """`epoch_steps` Adam steps; returns each trial's MSE after them."""
        assert self.opt is not None
        for _ in range(self.sp.epoch_steps):
            self.opt.zero_grad()
            self.losses().sum().backward()  # trials do not interact: each gets its own gradient
            self.opt.step()
        with torch.no_grad():
            return [finite(v) for v in self.losses().tolist()]

    def trial(self, i: int) -> ButterflyStack:
        """An unbatched copy of trial i (for a polish, a checkpoint or the final model)."""
        assert self.stack is not None
        return self.stack.trial(i) if self.batched else copy.deepcopy(self.stack)

    def keep(self, indices: list[int]) -> None:
        """Narrow the group to these trials (the others finished or were pruned)."""
        self.regroup(indices, [])

    def regroup(self, keep: list[int], new: list[TrialSpec]) -> None:
        """Keep trials `keep` (in that order) with their state, then append fresh trials `new`."""
        if not self.batched and len(keep) + len(new) > 1:
            raise ValueError("an unbatched group holds one trial")
        if keep == list(range(len(self.specs))) and not new:
            return
        specs = [self.specs[i] for i in keep] + list(new)
        if not specs:
            self.specs, self.stack, self.opt = [], None, None
            return
        stack = self._build(specs)
        lr_new = torch.tensor([s.lr for s in new], dtype=torch.float64)
        idx = torch.tensor(keep, dtype=torch.long)
        if self.stack is not None and keep:
            state = stack.state_dict()
            old = self.stack.state_dict()
            if self.batched:
                for k, v in old.items():
                    if v.dim() > 0 and v.shape[0] == len(self.specs) and k in state:
                        state[k][: len(keep)] = v[idx]
            else:
                state = old
            stack.load_state_dict(state)
        if self.opt is None or not keep:
            self.opt = BatchedAdam(
                list(stack.parameters()), torch.tensor([s.lr for s in specs]), self.batched
            )
        else:
            self.opt.regroup(list(stack.parameters()), idx, lr_new)
        self.specs, self.stack = specs, stack
