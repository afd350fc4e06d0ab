"""The discrete row (beyond the paper): hard permutations from the paper's family, then twiddles.

The relaxed permutation is what makes the learned search hard; the family it relaxes is small
(kernels/permutation.py: three binary choices per level). Here it is searched discretely:

- bp, bpp: level by level, closed form. For M = B P with B a butterfly and P the family's
  permutation with its own choice at every level, P = L_{m-2} ... L_0 (L_0 at block size n,
  applied first), M L_0^T = BF_n diag(C_top, C_bot) with C_top, C_bot (n/2 x n/2) again of the
  form B' P' on the remaining levels. So the top level's choice is the one under which every
  2 x n/2 block [M'[i, half]; M'[i + n/2, half]] has rank 1, the test the hierarchical
  factorization (kernels/factorize.py) does; the rank-1 factors give the children and the
  recursion goes on with one choice per level, shared by all blocks of that level. Choices
  that pass exactly are tried in order of residual, with backtracking. The twiddles are then
  `hierarchical_butterfly(M P^T)`: untied (2 n log2 n numbers instead of the tied 4 (n - 1));
  a tied member is an untied one, so every BP / BPP member is found exactly. bpp: the same for
  each of P''s 8 choices (one level at size n, applied first).
- bpbp: the 64 pairs of shared triples (one per permutation, the paper's shared logits), tied
  twiddles fitted by Adam in one vectorised model, halving the pairs by their loss, then L-BFGS
  on the survivors (tasks/recovery/train.py's polish).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.butterfly import ButterflyStack
from kernels.factorize import hierarchical_butterfly
from kernels.permutation import permute_level
from kernels.reference import log2_exact
from tasks.recovery.params import DiscreteParams
from tasks.recovery.train import BatchedAdam, LBFGSConfig, finite, mse, polish, working_dtype
from tasks.targets import rmse

CHOICES: tuple[tuple[bool, bool, bool], ...] = tuple(
    itertools.product((False, True), repeat=3)
)  # (even/odd separation, reverse first half, reverse second half): the 8 choices of a level
EXACT = 1e-12  # a relative rank-1 residual below this passes the split test (the Gram form
# of the smallest singular value loses about 1e-16 of the total to cancellation)
LOGIT = 10.0  # the logit magnitude of a hard choice (logit >= 0 is on)
STOP_MSE = 1e-9  # a fit whose Adam MSE reaches this stops the halving and goes to L-BFGS


@dataclass
class DiscreteResult:
    """The discrete row of one matrix: the fitted stack and what was found."""

    model: str
    rmse: float  # ||M_hat - M||_F / n (float64)
    seconds: float
    cpu_seconds: float
    stack: ButterflyStack
    permutation: dict[str, Any] = field(default_factory=dict)  # role -> choices per level
    candidates: int = 0  # hard permutations (or nodes of the level search) tried


def _level_index(k: int, choice: tuple[bool, bool, bool]) -> torch.Tensor:
    """(k,) indices of one level of block size k: the level applied to x is x[:, idx]."""
    probs = torch.tensor([float(c) for c in choice], dtype=torch.float64)
    return permute_level(torch.arange(k, dtype=torch.float64)[None], probs, k)[0].round().long()


def _blocks(subs: torch.Tensor) -> torch.Tensor:
    """(nsub, col half, i, row, k/2) view of subs (nsub, k, k): the 2 x k/2 blocks of the split,
    rows i and i + k/2 of one column half."""
    nsub, k = subs.shape[0], subs.shape[1]
    h = k // 2
    return subs.reshape(nsub, 2, h, 2, h).permute(0, 3, 2, 1, 4)


def _residual(subs: torch.Tensor) -> float:
    """Relative rank-1 residual of the top split of subs (nsub, k, k): the sum of the blocks'
    smallest squared singular values (from their 2 x 2 Gram matrices) over the total."""
    b = _blocks(subs)
    g = b @ b.transpose(-1, -2).conj()  # (..., 2, 2) Hermitian
    tr = (g[..., 0, 0] + g[..., 1, 1]).real
    det = (g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]).real
    small = (tr - (tr**2 - 4 * det).clamp(min=0).sqrt()) / 2
    return float(small.clamp(min=0).sum()) / max(float(tr.sum()), 1e-300)


def _children(subs: torch.Tensor) -> torch.Tensor:
    """(2 nsub, k/2, k/2): the rank-1 fit's right factors (the hierarchical factorization's
    step), the sub-problems of the next level."""
    nsub, k = subs.shape[0], subs.shape[1]
    _, s, vh = torch.linalg.svd(_blocks(subs), full_matrices=False)
    return (vh[..., 0, :] * s[..., :1].sqrt()).reshape(2 * nsub, k // 2, k // 2)


def identify_levels(
    matrix: torch.Tensor, max_nodes: int = 10_000
) -> tuple[list[tuple[bool, bool, bool]], float, int]:
    """Per-level choices (m-1 of them, block size n first) under which M P^T is a butterfly.

    matrix: (n, n), n >= 4. Returns (choices, worst relative split residual on the path, nodes
    visited). Depth first over the choices that split exactly, best residual first; when none
    does, the best one (a heuristic for matrices outside the class).
    """
    m64 = matrix.to(torch.complex128 if matrix.is_complex() else torch.float64)
    n = m64.shape[0]
    m = log2_exact(n)
    nodes = 0
    best: tuple[float, list[tuple[bool, bool, bool]]] | None = None

    def visit(subs: torch.Tensor, path: list, worst: float) -> bool:
        nonlocal nodes, best
        k = subs.shape[-1]
        if k == 2:  # no permutation below size 4: a 2 x 2 leaf is a twiddle
            if best is None or worst < best[0]:
                best = (worst, list(path))
            return worst <= EXACT
        tried = []
        for choice in CHOICES:
            nodes += 1
            tried.append((_residual(subs[..., _level_index(k, choice)]), choice))
        tried.sort(key=lambda t: t[0])
        exact = [t for t in tried if t[0] <= EXACT] or tried[:1]
        # the reversals do not change this level's test, and a butterfly absorbs them (B R is a
        # butterfly for R flipping low bits under a condition on higher ones): one branch per
        # even/odd choice is enough
        exact = [t for i, t in enumerate(exact) if t[1][0] not in {u[1][0] for u in exact[:i]}]
        for resid, choice in exact:
            children = _children(subs[..., _level_index(k, choice)])
            if visit(children, [*path, choice], max(worst, resid)):
                return True
            if nodes >= max_nodes:
                break
        return False

    visit(m64.unsqueeze(0), [], 0.0)
    assert best is not None and len(best[1]) == m - 1
    return best[1], best[0], nodes


def _hard_logits(choices: list[tuple[bool, bool, bool]]) -> torch.Tensor:
    return torch.tensor([[LOGIT if c else -LOGIT for c in ch] for ch in choices])


def _column_order(n: int, choices: list[tuple[bool, bool, bool]]) -> torch.Tensor:
    """idx of P = L_{m-2} ... L_0 (P x = x[idx]) for these per-level choices."""
    idx = torch.arange(n)
    for level, choice in enumerate(choices):
        k = n >> level
        blocks = idx.reshape(n // k, k)
        idx = blocks[:, _level_index(k, choice)].reshape(n)
    return idx


def bp_stack(
    matrix: torch.Tensor,
    choices: list[tuple[bool, bool, bool]],
    extra: tuple[bool, bool, bool] | None = None,
) -> ButterflyStack:
    """The untied float64 ButterflyStack B P (P') with these hard choices and B in closed form.

    B = hierarchical_butterfly(M P'^T P^T), exact when M is in the class.
    """
    n = matrix.shape[0]
    complex_ = matrix.is_complex()
    stack = ButterflyStack(
        n,
        "bp" if extra is None else "bpp",
        complex=complex_,
        tied=False,
        share_logits=False,
        generator=torch.Generator().manual_seed(0),  # the random init is overwritten below
    ).double()
    b = matrix.to(torch.complex128 if complex_ else torch.float64)
    if extra is not None:
        b = b[:, _level_index(n, extra)]
    b = b[:, _column_order(n, choices)]
    tw = hierarchical_butterfly(b)
    with torch.no_grad():
        bfly = stack.butterflies[0]
        bfly.twiddle.copy_(torch.view_as_real(tw) if complex_ else tw)
        stack.perms[0].logits.copy_(_hard_logits(choices).to(torch.float64))
        if extra is not None:
            stack.extra_perm.logits.copy_(_hard_logits([extra]).to(torch.float64))
    return stack.round_permutations_()


def _names(choices: list[tuple[bool, bool, bool]]) -> list[str]:
    """'e..' per level: e = even/odd separation, f / s = reverse first / second half."""
    return ["".join(c if on else "." for c, on in zip("efs", ch, strict=True)) for ch in choices]


def _top_residual(matrix: torch.Tensor) -> float:
    """The best top-level split residual over the 8 choices of the level at size n."""
    m64 = matrix.to(torch.complex128 if matrix.is_complex() else torch.float64).unsqueeze(0)
    n = matrix.shape[0]
    return min(_residual(m64[..., _level_index(n, c)]) for c in CHOICES)


def fit_bp(matrix: torch.Tensor, model: str, max_nodes: int = 10_000) -> DiscreteResult:
    """The discrete row for bp or bpp (closed form, see the module docstring)."""
    if model not in ("bp", "bpp"):
        raise ValueError(f"fit_bp takes bp or bpp, got {model!r}")
    t0, c0 = time.time(), time.process_time()
    n = matrix.shape[0]
    extras: list[tuple[bool, bool, bool] | None] = [None]
    if model == "bpp":  # P' choices whose top level splits best first
        extras = sorted(CHOICES, key=lambda e: _top_residual(matrix[:, _level_index(n, e)]))
    best: tuple[float, ButterflyStack, dict[str, Any]] | None = None
    nodes = 0
    for extra in extras:
        m = matrix if extra is None else matrix[:, _level_index(n, extra)]
        choices, _, visited = identify_levels(m, max_nodes)
        nodes += visited
        stack = bp_stack(matrix, choices, extra)
        with torch.no_grad():
            value = rmse(stack.matrix(), matrix)
        perm = {"P": _names(choices)} | ({} if extra is None else {"P'": _names([extra])})
        perm["twiddles"] = "untied"
        if best is None or value < best[0]:
            best = (value, stack, perm)
        if value <= 1e-12 * max(1.0, float(torch.linalg.norm(matrix)) / n):
            break
    assert best is not None
    value, stack, perm = best
    return DiscreteResult(
        model, value, time.time() - t0, time.process_time() - c0, stack, perm, nodes
    )


def _combo_logits(combo: tuple[int, ...]) -> list[torch.Tensor]:
    """(1, 3) logits of each permutation (ButterflyStack.permutations() order) of a combo of
    indices into CHOICES (one shared triple per permutation)."""
    return [_hard_logits([CHOICES[c]]).to(torch.float64) for c in combo]


def _group(
    n: int, model: str, real: bool, cands: list[tuple[tuple[int, ...], int]],
    states: list[dict | None], dp: DiscreteParams,
) -> ButterflyStack:  # fmt: skip
    """A vectorised stack of these candidates (a combo of hard permutations and a start), each
    from its saved state or from the init its start seeds."""
    gens = [torch.Generator().manual_seed(dp.seed * 100_000 + start) for _, start in cands]
    combos = [combo for combo, _ in cands]
    stack = ButterflyStack(
        n, model, complex=True, tied=True, init=dp.init, real_output=real,
        trials=len(combos), generator=gens,
    )  # fmt: skip
    full = stack.state_dict()
    for t, (combo, state) in enumerate(zip(combos, states, strict=True)):
        if state is not None:
            for k, v in state.items():
                if full[k].dim() > v.dim():
                    full[k][t] = v
        for perm, logits in zip(stack.permutations(), _combo_logits(combo), strict=True):
            key = next(k for k, p in stack.named_parameters() if p is perm.logits)
            full[key][t] = logits.to(full[key].dtype)
    stack.load_state_dict(full)
    return stack.round_permutations_()


def fit_hard(matrix: torch.Tensor, model: str, dp: DiscreteParams) -> DiscreteResult:
    """Every combo of hard shared triples (8 for bp, 64 for bpp and bpbp; bpbp from `restarts`
    random starts each: one start on the right pair reaches the line in about a third of
    tries), tied complex twiddles
    fitted by Adam in vectorised chunks with successive halving (steps doubling each round),
    then L-BFGS on the best; float32 / complex64 as the learned search (real targets: the real
    part of the output, as the paper fits them)."""
    from kernels.butterfly import MODELS

    t0, c0 = time.time(), time.process_time()
    n = matrix.shape[0]
    target = matrix.to(working_dtype(matrix))
    real = not matrix.is_complex()
    blocks, extra = MODELS[model]
    starts = dp.restarts if model == "bpbp" else 1
    combos = [
        (combo, i * starts + r)
        for i, combo in enumerate(itertools.product(range(8), repeat=blocks + int(extra)))
        for r in range(starts)
    ]
    states: list[dict | None] = [None] * len(combos)
    chunk = dp.batch_for(n)
    steps = dp.steps
    losses: list[float] = []
    solved = False
    for r in range(dp.rounds):
        losses = [math.inf] * len(combos)
        for i in range(0, len(combos), chunk):
            part = combos[i : i + chunk]
            stack = _group(n, model, real, part, states[i : i + chunk], dp)
            params = [p for p in stack.parameters() if p.requires_grad]
            opt = BatchedAdam(params, torch.full((len(part),), dp.lr), batched=True)
            for _ in range(steps):
                opt.zero_grad()
                loss = mse(stack.matrix(), target)
                loss.sum().backward()
                opt.step()
                if float(loss.detach().min()) <= STOP_MSE:  # one is there: polish it
                    solved = True
                    break
            with torch.no_grad():
                losses[i : i + len(part)] = [
                    finite(v) for v in mse(stack.matrix(), target).tolist()
                ]
            for t in range(len(part)):
                states[i + t] = stack.trial(t).state_dict()
            if solved:
                break
        order = sorted(range(len(combos)), key=lambda j: losses[j])
        if solved or r == dp.rounds - 1 or len(combos) == 1:
            break
        keep = order[: max(1, math.ceil(len(combos) * dp.keep))]
        combos, states = [combos[j] for j in keep], [states[j] for j in keep]
        steps *= 2
    best_i = min(range(len(combos)), key=lambda j: losses[j])
    best = _group(n, model, real, [combos[best_i]], [states[best_i]], dp).trial(0)
    if dp.polish_steps:
        cfg = LBFGSConfig(dp.polish_steps, 20, 100, "strong_wolfe", 0.0, 0.0)
        best, _ = polish(best, target, cfg)
    with torch.no_grad():
        value = rmse(best.double().matrix(), matrix)
    roles = ["P'"] if extra else []
    roles += [f"P{b + 1}" for b in range(blocks)] if blocks > 1 else ["P"]
    perm = {role: _names([CHOICES[c]]) for role, c in zip(roles, combos[best_i][0], strict=True)}
    perm["twiddles"] = "tied"
    return DiscreteResult(
        model,
        value,
        time.time() - t0,
        time.process_time() - c0,
        best,
        perm,
        8 ** len(roles) * starts,
    )


def fit_discrete(
    matrix: torch.Tensor, model: str, dp: DiscreteParams, exact_rmse: float = 1e-4
) -> DiscreteResult:
    """The discrete row of `matrix` (n, n) with `model` (bp | bpp | bpbp).

    bp / bpp: the closed form first; where it misses `exact_rmse` (||.||_F / n; e.g. a real
    target that is the real part of a complex butterfly, like the DCT), `fit_hard` too, and
    the better of the two. bpbp: `fit_hard`. seconds and cpu_seconds count both.
    """
    if model == "bpbp":
        return fit_hard(matrix, model, dp)
    closed = fit_bp(matrix, model, dp.max_nodes)
    if closed.rmse <= exact_rmse or matrix.is_complex():
        return closed
    fitted = fit_hard(matrix, model, dp)
    best = fitted if fitted.rmse < closed.rmse else closed
    best.seconds, best.cpu_seconds = (
        closed.seconds + fitted.seconds,
        closed.cpu_seconds + fitted.cpu_seconds,
    )
    best.candidates = closed.candidates + fitted.candidates
    return best


def discrete_search(
    matrix: torch.Tensor,
    models: list[str],
    dp: DiscreteParams,
    exact_rmse: float = 1e-4,
    log: Callable[[str], None] | None = None,
) -> DiscreteResult:
    """What `suite recover --matrix` does first: the closed forms of bp and bpp (in `models`),
    then the hard fits of each model, until one reaches `exact_rmse` (||.||_F / n); the best.
    seconds and cpu_seconds count every attempt."""
    t0, c0 = time.time(), time.process_time()
    plan = [(m, "closed") for m in models if m != "bpbp"]
    # a complex member of bp / bpp is an untied one, which the closed form always finds: their
    # fits are for real targets (the real part of a complex butterfly, as the DCT) only
    plan += [(m, "fit") for m in models if m == "bpbp" or not matrix.is_complex()]
    best: DiscreteResult | None = None
    tried = 0
    for model, how in plan:
        res = (
            fit_bp(matrix, model, dp.max_nodes) if how == "closed" else fit_hard(matrix, model, dp)
        )
        tried += res.candidates
        if log is not None:
            log(f"discrete {model} ({how}): rmse {res.rmse:.3e} {res.permutation}")
        if best is None or res.rmse < best.rmse:
            best = res
        if res.rmse <= exact_rmse:
            break
    assert best is not None
    best.seconds, best.cpu_seconds = time.time() - t0, time.process_time() - c0
    best.candidates = tried
    return best
