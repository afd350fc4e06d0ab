"""Butterfly modules: a drop-in for nn.Linear, and the paper's BP / BPP / BPBP stacks.

Twiddle layout: see kernels/reference.py. Complex twiddles are stored as real parameters with
a trailing dimension of 2 (real, imaginary) so that every torch optimiser, L-BFGS included,
sees real numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernels import bp_matrix
from kernels.atomic import atomic_save
from kernels.multiply import PlanCache, butterfly_multiply
from kernels.permutation import Permutation
from kernels.reference import log2_exact

INITS = ("randn", "ortho")
MODELS = {"bp": (1, False), "bpp": (1, True), "bpbp": (2, False)}  # (BP blocks, extra perm)
# BPP's extra permutation P': "one" level at size n (the authors' code), or "per_level" (a
# relaxed triple at every level, an earlier choice of this suite kept as a knob).
EXTRA_PERMS = ("one", "per_level")
FACTORS_FORMAT = "butterfly-suite/factors/v1"


def _random_unitary_2x2(
    count: int, complex_: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """count Haar-random 2x2 orthogonal (real) or unitary (complex) matrices."""
    shape = (count, 2, 2)
    a = torch.randn(*shape, generator=generator, dtype=torch.float64)
    if complex_:
        a = torch.complex(a, torch.randn(*shape, generator=generator, dtype=torch.float64))
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    return q * (d / d.abs()).unsqueeze(-2)  # fix the phase so Q is Haar distributed


def init_twiddle(
    shape: tuple[int, ...], complex_: bool, init: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Twiddle of `shape` (..., 2, 2) as a real tensor (with a trailing 2 when complex).

    randn: i.i.d. N(0, 1) scaled 1/sqrt(2) (real) or 1/2 per part (complex), the paper's init.
    ortho: each 2x2 a Haar-random orthogonal / unitary matrix.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "randn":
        if complex_:
            return torch.randn(*shape, 2, generator=generator) / 2
        return torch.randn(*shape, generator=generator) / math.sqrt(2)
    count = math.prod(shape[:-2])
    u = _random_unitary_2x2(count, complex_, generator).reshape(shape)
    return (torch.view_as_real(u) if complex_ else u).float()


class Butterfly(nn.Module):
    """y = B x + bias with B a product of `nblocks` butterflies; a drop-in for nn.Linear.

    x: (..., in_features) -> y: (..., out_features). Sizes are zero-padded to n, the next power
    of two of max(in, out); the output keeps the first out_features entries. A complex layer
    returns a complex tensor.
    """

    _square = False  # real, n > 1, in = out = n: forward's short path (False in old pickles)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        complex: bool = False,
        tied: bool = False,
        nblocks: int = 1,
        increasing_stride: bool = True,
        init: str = "randn",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1 or nblocks < 1:
            raise ValueError("in_features, out_features and nblocks must be >= 1")
        self.in_features, self.out_features = in_features, out_features
        self.n = 1 << max(0, (max(in_features, out_features) - 1).bit_length())
        self.complex, self.tied, self.nblocks = complex, tied, nblocks
        self.increasing_stride = increasing_stride
        self._square = not complex and self.n > 1 and in_features == out_features == self.n
        m = log2_exact(self.n)
        shape = (nblocks, self.n - 1, 2, 2) if tied else (nblocks, m, self.n // 2, 2, 2)
        if self.n == 1:  # a 1x1 "butterfly" is a scalar: keep one 2x2 slot, use its [0, 0]
            shape = (nblocks, 1, 2, 2) if tied else (nblocks, 1, 1, 2, 2)
        self.twiddle = nn.Parameter(init_twiddle(shape, complex, init, generator))
        self.bias = None
        if bias:
            bound = 1 / math.sqrt(in_features)
            b = torch.empty(out_features, 2 if complex else 1).uniform_(
                -bound, bound, generator=generator
            )
            self.bias = nn.Parameter(b if complex else b.squeeze(-1))

    def twiddle_tensor(self) -> torch.Tensor:
        """The twiddle as a real or complex tensor in the layout of kernels/reference.py."""
        return torch.view_as_complex(self.twiddle) if self.complex else self.twiddle

    def train(self, mode: bool = True) -> Butterfly:
        self._cpu_plan().clear()  # a mode switch drops the inference plan (weights may change)
        return super().train(mode)

    def _cpu_plan(self) -> PlanCache:
        """Where kernels.multiply keeps this layer's packed CPU inference plan.

        Keyed on the twiddle's storage and version counter, and cleared by train()/eval():
        after editing weights through `.data` (which bypasses the version counter), call eval().
        """
        plans = self.__dict__.get("_plans")
        if plans is None:  # modules pickled before the cache existed
            plans = self._plans = PlanCache()
        return plans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kept lean: at batch 1 a call costs about 5 us, each attribute read here 0.03 us
        shape = x.shape
        params = self._parameters  # one dict lookup each: nn.Module.__getattr__ costs more
        # (the method only for modules pickled before the cache existed)
        cache = None if self.training else self.__dict__.get("_plans") or self._cpu_plan()
        if self._square and len(shape) == 2 and shape[1] == self.n:  # no pad, reshape or cut
            return butterfly_multiply(
                params["twiddle"], x, self.increasing_stride, cache=cache, bias=params.get("bias")
            )
        if len(shape) != 2:
            x = x.reshape(-1, shape[-1])
        if shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {shape[-1]}")
        bias, tw = params.get("bias"), params["twiddle"]
        if self.complex:
            tw = torch.view_as_complex(tw)
            bias = None if bias is None else torch.view_as_complex(bias)
        if self.n == 1:
            y = x * tw[..., 0, 0].prod()
            y = y if bias is None else y + bias
        else:
            if self.in_features < self.n:
                x = nn.functional.pad(x, (0, self.n - self.in_features))
            # the bias rides along: the real row loop adds it in the same call
            y = butterfly_multiply(tw, x, self.increasing_stride, cache=cache, bias=bias)
        if self.out_features < self.n:  # y has n columns (n = 1: one, and out_features = 1)
            y = y[:, : self.out_features]
        return y if len(shape) == 2 else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
            f"complex={self.complex}, tied={self.tied}, nblocks={self.nblocks}"
        )


def tied_bp_matrix(twiddle: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """The n x n matrix of B P for a tied twiddle (n-1, 2, 2), in O(n^2).

    Uses M_k = BF_k (I_2 (x) M_{k/2}) Q_k (docs/protocol.md section 7) with M_2 = BF_2;
    probs (levels or 1, 3) are the relaxed permutation's, or None for P = I. See
    kernels/bp_matrix.py.
    """
    return bp_matrix.tied_bp_matrix(twiddle, probs)


# bpbp joins its two blocks by a dense product up to this n, above it by pushing the rows of
# B2 P2 through B1 and P1 (kernels/bp_matrix.times_bp). Measured on the 2-core CPU with the
# compiled column kernels (kernels/cpu/columns.py), one Adam step: the two tie at n = 128
# unbatched (the push wins batched), the push is faster from 256 (5.0 vs 6.4 ms) on.
BPBP_DENSE_MAX_N = 128
BPBP_PUSH_BLOCK = 16  # B1's levels below this size join as one dense b x b block (16 ~ 32 > 64)
# the same where the relaxed levels do not run compiled (bp_matrix.compiled_levels): the values
# from before the compiled levels (on a CPU without a compiler the dense product measured faster
# still at n = 1024: 178 vs 358 ms)
BPBP_DENSE_MAX_N_TORCH = 256
BPBP_PUSH_BLOCK_TORCH = 64


class StackedTwiddle(nn.Module):
    """The twiddle of one butterfly of a batched ButterflyStack: (trials, 1, n-1, 2, 2[, 2])."""

    def __init__(self, twiddle: torch.Tensor, complex: bool):
        super().__init__()
        self.complex = complex
        self.twiddle = nn.Parameter(twiddle)

    def twiddle_tensor(self) -> torch.Tensor:
        return torch.view_as_complex(self.twiddle) if self.complex else self.twiddle


class ButterflyStack(nn.Module):
    """The paper's learned models on n x n: bp = B P, bpp = B P P', bpbp = B2 P2 B1 P1.

    share_logits ties the logits of each P across its levels; extra_perm shapes BPP's P' (one
    level at size n as in the authors' code, or a triple per level).

    forward: x (batch, n) -> (batch, n) computing y = M x row by row. With real_output the
    complex result's real part is returned (how the paper fits real targets).

    trials=T makes T independent models in one (tied twiddles only): every parameter gets a
    leading dim T under the same state_dict keys, matrix() is (T, n, n), forward gives
    (T, batch, n), and trial(t) is an unbatched copy of trial t. generator may then be a list
    of T generators: trial t draws exactly what an unbatched stack built with generator[t]
    draws; one generator (or None) is drawn from trial after trial.
    """

    trials: int | None = None  # the class default also serves modules pickled before trials

    def __init__(
        self,
        n: int,
        model: str = "bp",
        complex: bool = True,
        tied: bool = True,
        share_logits: bool = True,
        init: str = "randn",
        real_output: bool = False,
        generator: torch.Generator | list[torch.Generator | None] | None = None,
        extra_perm: str = "one",
        trials: int | None = None,
    ):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
        log2_exact(n)
        if n < 4:
            raise ValueError(f"learned butterfly models need n >= 4, got {n}")
        if extra_perm not in EXTRA_PERMS:
            raise ValueError(f"extra_perm must be one of {EXTRA_PERMS}, got {extra_perm!r}")
        self.config: dict[str, Any] = dict(
            n=n,
            model=model,
            complex=complex,
            tied=tied,
            share_logits=share_logits,
            init=init,
            real_output=real_output,
            extra_perm=extra_perm,
        )
        blocks, extra = MODELS[model]
        self.n, self.real_output, self.trials = n, real_output, trials
        if trials is not None:
            self._init_trials(trials, generator)
            return
        if isinstance(generator, list):
            raise ValueError("a list of generators needs trials=len(generators)")
        self.extra_perm = (
            Permutation(n, False, generator, top_only=extra_perm == "one") if extra else None
        )
        self.perms = nn.ModuleList(Permutation(n, share_logits, generator) for _ in range(blocks))
        self.butterflies = nn.ModuleList(
            Butterfly(n, n, bias=False, complex=complex, tied=tied, init=init, generator=generator)
            for _ in range(blocks)
        )

    def _init_trials(
        self, trials: int, generator: torch.Generator | list[torch.Generator | None] | None
    ) -> None:
        """Build `trials` unbatched stacks (one generator each, in order) and stack them."""
        gens = generator if isinstance(generator, list) else [generator] * trials
        if trials < 1 or len(gens) != trials:
            raise ValueError(f"trials={trials} needs as many generators, got {len(gens)}")
        if not self.config["tied"]:
            raise ValueError("trials need tied twiddles")
        ones = [ButterflyStack(**self.config, generator=g) for g in gens]
        self.extra_perm = None
        if ones[0].extra_perm is not None:
            self.extra_perm = Permutation.stacked([o.extra_perm for o in ones])
        blocks = range(len(ones[0].perms))
        self.perms = nn.ModuleList(Permutation.stacked([o.perms[b] for o in ones]) for b in blocks)
        self.butterflies = nn.ModuleList(
            StackedTwiddle(
                torch.stack([o.butterflies[b].twiddle.detach() for o in ones]),
                self.config["complex"],
            )
            for b in blocks
        )

    def trial(self, t: int) -> ButterflyStack:
        """An unbatched copy of trial t of a batched stack (same dtype, rounding and mode)."""
        if self.trials is None:
            raise ValueError("trial() needs a batched stack (trials=T)")
        dtype = self.butterflies[0].twiddle.dtype
        one = ButterflyStack(**self.config, generator=torch.Generator()).to(dtype)
        ref = one.state_dict()
        one.load_state_dict(
            {k: v[t] if v.dim() == ref[k].dim() + 1 else v for k, v in self.state_dict().items()}
        )
        for p in one.permutations():
            if bool(p.hard):
                p.round_()
        return one.train(self.training)

    def permutations(self) -> list[Permutation]:
        return ([self.extra_perm] if self.extra_perm is not None else []) + list(self.perms)

    def round_permutations_(self) -> ButterflyStack:
        for p in self.permutations():
            p.round_()
        return self

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y.real if (self.real_output and y.is_complex()) else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trials is not None:  # (T, batch, n) through each trial's matrix
            mat = self._tied_matrix()
            return self._out(x.to(mat.dtype) @ mat.transpose(-1, -2))
        if self.extra_perm is not None:
            x = self.extra_perm(x)
        for perm, bfly in zip(self.perms, self.butterflies, strict=True):
            x = bfly(perm(x))
        return self._out(x)

    def matrix(self) -> torch.Tensor:
        """The learned matrix M (y = M x): (n, n), or (trials, n, n) when batched.

        Tied: O(n^2) per BP block (kernels/bp_matrix.py); bpbp joins its blocks by a dense
        product up to BPBP_DENSE_MAX_N, above it in O(n^2 log n). Hard permutations gather.
        """
        if not self.config["tied"]:
            eye = torch.eye(self.n, dtype=self.butterflies[0].twiddle.dtype)
            return self.forward(eye).transpose(0, 1)
        return self._out(self._tied_matrix(real=self.real_output))

    @staticmethod
    def _columns(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
        """x P for x (..., rows, n)."""
        if bool(perm.hard):
            return bp_matrix.gather_columns(x, perm.column_order())
        return bp_matrix.permute_columns(x, perm.probs(), perm.top_only)

    def _block(self, b: int) -> torch.Tensor:
        """B_b P_b, (..., n, n)."""
        perm, twiddle = self.perms[b], self.butterflies[b].twiddle_tensor()[..., 0, :, :, :]
        if bool(perm.hard):
            return bp_matrix.gather_columns(tied_bp_matrix(twiddle, None), perm.column_order())
        return tied_bp_matrix(twiddle, perm.probs())

    def _tied_matrix(self, real: bool = False) -> torch.Tensor:
        """M, or (real) at least Re(M) where its last steps are real-linear: the joins and P'
        then run on real matrices (possibly still complex: callers take .real)."""
        mat = self._block(0)
        if len(self.perms) == 2:  # B2 P2 (B1 P1)
            compiled = bp_matrix.compiled_levels(mat.device)
            if self.n <= (BPBP_DENSE_MAX_N if compiled else BPBP_DENSE_MAX_N_TORCH):
                mat = bp_matrix.real_matmul(self._block(1), mat) if real else self._block(1) @ mat
            else:
                twiddle, perm = self.butterflies[0].twiddle_tensor()[..., 0, :, :, :], self.perms[0]
                if bool(perm.hard):
                    mat = bp_matrix.right_butterfly(self._block(1), twiddle)
                    mat = bp_matrix.gather_columns(mat.real if real else mat, perm.column_order())
                else:
                    block = min(BPBP_PUSH_BLOCK if compiled else BPBP_PUSH_BLOCK_TORCH, self.n)
                    mat = bp_matrix.times_bp(self._block(1), twiddle, perm.probs(), block, real)
        if self.extra_perm is not None:
            mat = self._columns(mat.real if real and mat.is_complex() else mat, self.extra_perm)
        return mat


def save_factors(
    model: ButterflyStack, path: str | Path, meta: dict[str, Any] | None = None
) -> None:
    """Write a learned model's factors so `load_factors` can rebuild it (atomic)."""
    if model.trials is not None:
        raise ValueError("save one trial of a batched stack: save_factors(stack.trial(t), ...)")
    payload = {
        "format": FACTORS_FORMAT,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def load_factors(path: str | Path) -> ButterflyStack:
    """Load factors written by `save_factors`; returns an eval-mode module: y = model(x)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FACTORS_FORMAT:
        raise ValueError(f"{path}: not a butterfly-suite factors file")
    # files written before extra_perm was a knob had P' per level
    model = ButterflyStack(**{"extra_perm": "per_level", **payload["config"]})
    model.load_state_dict(payload["state_dict"])
    for p in model.permutations():
        if bool(p.hard):
            p.round_()
    return model.eval()
