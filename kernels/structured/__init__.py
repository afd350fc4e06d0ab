"""Structured n x n hidden layers for the CIFAR-10 compression experiment, by name.

`make_layer(method, n, generator)` builds one; `param_formula(method, n)` is its closed-form
count of trainable scalars (== layer.hidden_params == sum of numel); `METHODS` lists the names.
Every layer maps x (batch, n) real -> x @ W.T (batch, n) real with no bias and has `matrix()`
= W (kernels.structured.base). Families and counts (r the rank, m = log2 n):

    dense                 n^2                unconstrained (nn.Linear init)
    lowrank_r{1..4}       2 r n              U V^T
    circulant             n                  circ(c), by FFT
    fastfood              3 n                S H G Pi H B (Le et al. 2013)
    toeplitz_r{1..4}      2 r n              sum Z_1(g_i) Z_{-1}(h_i) (Sindhwani et al. 2015)
    ldr_td_r1             2 r n + 6 n - 4    LDR-TD of Thomas et al. 2018, r = 1
    bp_real, bpbp_real    4(n-1), 8(n-1)     [fixed bit reversal, tied butterfly] x 1 or 2
    bp_complex, bpbp_complex  8(n-1), 16(n-1)   the same in complex, real part out
    *_learned             + 3 per block      the same with a learned relaxed permutation
    monarch               2 n min(8, n)      block size 8: 16 n, bpbp_complex's budget
    monarch_sqrt          2 n 2^ceil(m/2)    the standard Monarch (b ~ sqrt(n))
    butterfly_untied      2 n m              one untied real butterfly (dense -> projection)

n must be a power of two for fastfood, the butterfly layers and Monarch (>= 4 for bp*).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.structured.base import StructuredLayer, check_size
from kernels.structured.butterfly_layer import BPLayer, ButterflyUntied, bp_param_count
from kernels.structured.circulant import Circulant
from kernels.structured.fastfood import Fastfood, fwht, hadamard_matrix
from kernels.structured.ldr import LDRTridiagonal, ToeplitzLike
from kernels.structured.lowrank import Dense, LowRank
from kernels.structured.monarch import Monarch, budget_block_size, sqrt_block_size

Generator = torch.Generator | None


@dataclass(frozen=True)
class _Spec:
    build: Callable[[int, Generator], StructuredLayer]
    count: Callable[[int], int]
    power_of_two: bool = False
    minimum: int = 2


def _specs() -> dict[str, _Spec]:
    specs: dict[str, _Spec] = {
        "dense": _Spec(lambda n, g: Dense(n, g), lambda n: n * n),
    }
    for r in range(1, 5):
        specs[f"lowrank_r{r}"] = _Spec(
            lambda n, g, r=r: LowRank(n, r, g), lambda n, r=r: 2 * r * n, minimum=max(2, r)
        )
    specs["circulant"] = _Spec(lambda n, g: Circulant(n, g), lambda n: n)
    specs["fastfood"] = _Spec(lambda n, g: Fastfood(n, g), lambda n: 3 * n, power_of_two=True)
    for r in range(1, 5):
        specs[f"toeplitz_r{r}"] = _Spec(
            lambda n, g, r=r: ToeplitzLike(n, r, g), lambda n, r=r: 2 * r * n
        )
    specs["ldr_td_r1"] = _Spec(lambda n, g: LDRTridiagonal(n, 1, g), lambda n: 2 * n + 6 * n - 4)
    for learned in (False, True):
        for nblocks, prefix in ((1, "bp"), (2, "bpbp")):
            for complex_ in (False, True):
                name = f"{prefix}_{'complex' if complex_ else 'real'}"
                specs[name + ("_learned" if learned else "")] = _Spec(
                    lambda n, g, k=nblocks, c=complex_, le=learned: BPLayer(n, k, c, le, g),
                    lambda n, k=nblocks, c=complex_, le=learned: bp_param_count(n, k, c, le),
                    power_of_two=True,
                    minimum=4,
                )
    specs["monarch"] = _Spec(
        lambda n, g: Monarch(n, budget_block_size(n), g),
        lambda n: 2 * n * budget_block_size(n),
        power_of_two=True,
    )
    specs["monarch_sqrt"] = _Spec(
        lambda n, g: Monarch(n, sqrt_block_size(n), g),
        lambda n: 2 * n * sqrt_block_size(n),
        power_of_two=True,
    )
    specs["butterfly_untied"] = _Spec(
        lambda n, g: ButterflyUntied(n, g),
        lambda n: 2 * n * (n.bit_length() - 1),
        power_of_two=True,
    )
    return specs


_SPECS = _specs()
METHODS: tuple[str, ...] = tuple(_SPECS)
"""Every accepted method name, in the order of the table above."""


def _spec(method: str, n: int) -> _Spec:
    spec = _SPECS.get(method)
    if spec is None:
        raise ValueError(f"unknown method {method!r} (allowed: {', '.join(METHODS)})")
    try:
        check_size(n, spec.power_of_two, spec.minimum)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
    return spec


def param_formula(method: str, n: int) -> int:
    """The closed-form number of trainable scalars of `method` at size n."""
    return _spec(method, n).count(n)


def make_layer(method: str, n: int, generator: torch.Generator | None = None) -> StructuredLayer:
    """A fresh layer of `method` on R^n, initialised from `generator` (global RNG if None)."""
    return _spec(method, n).build(n, generator)


__all__ = [
    "METHODS",
    "BPLayer",
    "ButterflyUntied",
    "Circulant",
    "Dense",
    "Fastfood",
    "LDRTridiagonal",
    "LowRank",
    "Monarch",
    "StructuredLayer",
    "ToeplitzLike",
    "fwht",
    "hadamard_matrix",
    "make_layer",
    "param_formula",
]
