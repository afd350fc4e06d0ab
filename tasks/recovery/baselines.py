"""Closed-form rows beside the learned ones: sparse, low-rank, their best, hierarchical."""

from __future__ import annotations

import math

import torch

from kernels.factorize import hierarchical_butterfly, lowrank_projection, sparse_projection
from kernels.permutation import bit_reversal
from kernels.reference import butterfly_multiply_reference
from tasks.targets import rmse

BASELINES = ("sparse", "lowrank", "sparse_lowrank", "hierarchical")


def baselines(target: torch.Tensor, which: list[str]) -> dict[str, float]:
    """RMSE (||.||_F / n) of the closed-form rows at the budget of 2 n log2 n parameters."""
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
