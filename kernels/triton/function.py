"""Launch wrappers, autotuning and the autograd Function of the fused Triton butterfly.

Passes: a launch keeps a (BLOCK_B, W) tile in registers, so one launch applies a
sub-butterfly of at most MAX_TILE_N = 4096 points. That is the largest size whose backward
(~4 live tiles of W values, 8 if complex) still fits the register file of one SM with one
row per program: compiled for sm_90 (ptxas, no GPU run), the fp32 backward at W = 4096 uses
254 registers per thread at 8 warps without spilling, the forward 128. n <= MAX_TILE_N runs
in one launch covering every level of every block. Larger n takes the fewest passes of
balanced level ranges (n <= 2**24 in two): a pass applies levels [L0, L0 + c) to residue
classes mod 2**L0 (see kernels.py); decreasing stride runs the passes in reverse, and with
several blocks the passes loop per block.

Backward: a launch per (block, pass) segment. Segment inputs are recomputed by forward
launches into (batch, n) buffers (one per segment but the first), then each segment's
backward kernel recomputes its levels' inputs on chip (see butterfly_bwd_kernel). Twiddle
grads are reduced over a program's rows on chip into per-program partial buffers summed by
torch: deterministic. Their count (split_count) aims at 4 programs per SM, is capped by
PARTIAL_BUDGET bytes but never below one program per SM.

Memory: complex data stays interleaved (the kernels split it on chip); fp16 / bf16 runs
keep every (batch, n) buffer (output, multi-pass intermediates, gradients) in that dtype,
only the twiddles, their gradients and the arithmetic are fp32. Twiddle planes are laid
out once per twiddle version (cached like the CPU plan: by tensor identity and _version)
and kept for the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch
import triton

from kernels.reference import log2_exact
from kernels.triton import kernels as tk
from kernels.triton.kernels import INTERPRET, fold_tied, pair_order
from kernels.triton.spills import SPILLS

MAX_TILE_N = 4096
BWD_MAX_TILE_COMPLEX = 2048  # complex backward tiles: at 4096 every config spills (report)
COALESCE = 32  # neighbouring residue classes per strided tile: 128-byte runs of fp32
FWD_PER_THREAD = 32  # tile values per thread (complex: x2) the autotuner may try, forward
BWD_PER_THREAD = 16  # backward: ~4 live tiles plus recomputation temporaries
PARTIAL_BUDGET = 32 << 20  # bytes of twiddle-grad partials per backward launch
INTERPRET_TILE = 4096  # rows * columns per program under the interpreter: few programs
INTERPRET_PROGRAMS = 2  # backward programs per column under the interpreter (>1: tests splits)
INTERPRET_BLOCK_B: int | None = None  # tests force small row tiles (several per program)
_LOW = (torch.float16, torch.bfloat16)
_LAST: dict[str, dict] = {}
_TW_CACHE: dict[tuple, tuple] = {}
_TW_CACHE_SIZE = 16


@dataclass(frozen=True)
class Pass:
    """Levels [level0, level0 + c_log) on tiles of 2**c_log points x lob residue classes."""

    level0: int
    c_log: int
    lob: int


def plan_passes(m: int, max_tile_n: int = MAX_TILE_N) -> list[Pass]:
    """The fewest passes of at most log2(max_tile_n) levels each, sizes as equal as possible."""
    cmax = log2_exact(max_tile_n)
    npass = max(1, math.ceil(m / cmax))
    passes, level0 = [], 0
    for i in range(npass):
        c = m // npass + (1 if i < m % npass else 0)
        passes.append(Pass(level0, c, min(1 << level0, COALESCE, max_tile_n >> c)))
        level0 += c
    return passes


@dataclass(frozen=True)
class Geometry:
    """Everything a launch needs to know about one call.

    io: the real dtype of every (batch, n) buffer the kernels write (x's dtype for fp16 /
    bf16 x with fp32 compute, else compute); complex buffers are complex(compute).
    """

    batch: int
    n: int
    m: int
    nblocks: int
    tied: bool
    increasing: bool
    complex: bool
    tw_complex: bool
    compute: torch.dtype
    io: torch.dtype
    passes: tuple[Pass, ...]

    @property
    def tw_len(self) -> int:
        return self.n - 1 if self.tied else self.m * self.n // 2

    @property
    def buffer_dtype(self) -> torch.dtype:
        """dtype of outputs and intermediates."""
        if not self.complex:
            return self.io
        return torch.complex128 if self.compute == torch.float64 else torch.complex64

    def segments(self, fuse_blocks: bool) -> list[tuple[int, int, Pass]]:
        """(first block, block count, pass) of each launch, in application order."""
        if fuse_blocks and len(self.passes) == 1:
            return [(0, self.nblocks, self.passes[0])]
        order = self.passes if self.increasing else self.passes[::-1]
        return [(b, 1, p) for b in range(self.nblocks) for p in order]

    def consts(self, p: Pass, x_cplx: bool) -> dict[str, object]:
        return dict(C_LOG=p.c_log, LOB=p.lob, TIED=self.tied, INCREASING=self.increasing,
                    COMPLEX=self.complex, X_CPLX=x_cplx, TW_CPLX=self.tw_complex)


def backward_geometry(g: Geometry) -> Geometry:
    """The backward's plan: g, but complex tiles of at most BWD_MAX_TILE_COMPLEX points (a
    4096-point complex backward tile spills at every config: reports/triton_compile.md)."""
    if not g.complex or all((1 << p.c_log) * p.lob <= BWD_MAX_TILE_COMPLEX for p in g.passes):
        return g
    return dataclasses.replace(g, passes=tuple(plan_passes(g.m, BWD_MAX_TILE_COMPLEX)))


def check_inputs(twiddle: torch.Tensor, x: torch.Tensor) -> tuple[int, int, bool]:
    """Validate shapes, dtypes and devices; returns (n, nblocks, tied) or raises ValueError."""
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, n), got shape {tuple(x.shape)}")
    n = x.shape[1]
    try:
        m = log2_exact(n)
    except ValueError:
        raise ValueError(f"x's size n must be a power of two, got {n}") from None
    tied = twiddle.dim() == 4
    want = (n - 1, 2, 2) if tied else (m, n // 2, 2, 2)
    if twiddle.dim() not in (4, 5) or tuple(twiddle.shape[1:]) != want:
        raise ValueError(f"twiddle shape {tuple(twiddle.shape)} does not fit n={n}: expected "
                         f"(nblocks, {n - 1}, 2, 2) tied or (nblocks, {m}, {n // 2}, 2, 2) untied")
    ok = (*_LOW, torch.float32, torch.float64, torch.complex64, torch.complex128)
    for name, t in (("x", x), ("twiddle", twiddle)):
        if t.dtype not in ok:
            raise ValueError(f"unsupported {name} dtype {t.dtype}")
    if x.device != twiddle.device:
        raise ValueError(f"x on {x.device} but twiddle on {twiddle.device}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"Triton butterfly needs CUDA tensors or TRITON_INTERPRET=1: {x.device}")
    return n, twiddle.shape[0], tied


def _ptr(t: torch.Tensor) -> torch.Tensor:
    """What a kernel receives for a contiguous buffer: complex ones as interleaved reals."""
    return torch.view_as_real(t) if t.is_complex() else t


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, without a lazy conjugate bit (no copy when it already is)."""
    return t.resolve_conj().contiguous()


@functools.cache
def _order(n: int, passes: tuple[Pass, ...], device: torch.device) -> torch.Tensor:
    return pair_order(n, passes).to(device)


def _layout(twiddle: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, ...]:
    """(nblocks, 4, TW) planes of D1..D4 (re, and im if complex), untied ones in kernel pair
    order, in the compute dtype."""
    flat = twiddle.detach().reshape(g.nblocks, g.tw_len, 4).transpose(1, 2)
    if not g.tied:
        flat = flat[:, :, _order(g.n, g.passes, twiddle.device)]
    parts = (flat.real, flat.imag) if flat.is_complex() else (flat,)
    return tuple(q.to(g.compute).contiguous() for q in parts)


def tw_planes(twiddle: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, ...]:
    """_layout, cached per twiddle tensor and version (an in-place update, e.g. an optimiser
    step, bumps _version and so re-lays it out once); at most _TW_CACHE_SIZE entries."""
    key = (id(twiddle), twiddle._version, twiddle.data_ptr(), twiddle.dtype, twiddle.device,
           g.passes, g.tied, g.compute)
    hit = _TW_CACHE.get(key)
    if hit is not None and hit[0]() is twiddle:
        return hit[1]
    planes = _layout(twiddle, g)
    if len(_TW_CACHE) >= _TW_CACHE_SIZE:
        _TW_CACHE.pop(next(iter(_TW_CACHE)))
    _TW_CACHE[key] = (weakref.ref(twiddle), planes)
    return planes


def _prune(per_thread_max: int, rows_arg: str, kind: str, spills: frozenset | None):
    """early_config_prune: configs whose tile fits per_thread_max values per thread and
    plane-set, that fill at least a quarter of it, and that the compile report did not see
    spill (spills: (kind, COMPLEX, C_LOG, LOB, BLOCK_B, num_warps); None: the module's
    SPILLS, read at each call; reports/triton_compile.md)."""

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        args = {**named_args, **kwargs}
        width = (1 << args["C_LOG"]) * args["LOB"] * (2 if args["COMPLEX"] else 1)
        rows = triton.next_power_of_2(max(1, int(args[rows_arg])))

        def load(c: triton.Config) -> float:
            return c.kwargs["BLOCK_B"] * width / (32 * c.num_warps)

        def spills_(c: triton.Config) -> bool:
            return (kind, bool(args["COMPLEX"]), args["C_LOG"], args["LOB"], c.kwargs["BLOCK_B"],
                    c.num_warps) in (SPILLS if spills is None else spills)

        fit = [c for c in configs if load(c) <= per_thread_max and c.kwargs["BLOCK_B"] <= rows
               and not spills_(c)]
        if not fit:  # not even one row fits: the least loaded config that does not spill
            return [min(configs, key=lambda c: (spills_(c), load(c)))]
        top = max(load(c) for c in fit)
        return [c for c in fit if 4 * load(c) >= top]

    return prune


def _prune_fn(kind: str, spills: frozenset | None = None):
    """The tuner's prune for kind "fwd" / "bwd" (spills: SPILLS unless given)."""
    cap, rows = (FWD_PER_THREAD, "batch") if kind == "fwd" else (BWD_PER_THREAD, "rows_per_split")
    return _prune(cap, rows, kind, spills)


def rows_log2(rows: int) -> int:
    """The autotuning bucket of a row count: ceil(log2(rows)) (a BLOCK_B tuned for batch 1
    must not be reused at batch 16384)."""
    return max(0, int(rows) - 1).bit_length()


_CONFIGS = [triton.Config({"BLOCK_B": 1 << i}, num_warps=w) for i in range(11) for w in (4, 8, 16)]
_KEY = ["n", "rows_log2", "C_LOG", "LOB", "TIED", "INCREASING", "COMPLEX", "X_CPLX", "TW_CPLX"]
_PRUNE = {"fwd": _prune_fn("fwd"), "bwd": _prune_fn("bwd")}
_KERNELS = {"fwd": tk.butterfly_fwd_kernel, "bwd": tk.butterfly_bwd_kernel}


@functools.cache
def _tuned(kind: str) -> triton.runtime.Autotuner:
    """The autotuned kernel (built on first GPU use; the interpreter cannot benchmark).

    Keyed on the tile geometry, flags and the rows' log2 bucket (and nblk: blocks per
    forward launch); the autotuner adds the pointer dtypes. Launches are idempotent (out
    of place; partials are stored on a program's first row tile), so benchmarking needs no
    reset hooks."""
    key = [*_KEY, "nblk"] if kind == "fwd" else _KEY
    return triton.autotune(_CONFIGS, key=key, prune_configs_by={
        "early_config_prune": _PRUNE[kind]})(_KERNELS[kind])


def _launch(kind: str, grid, args: tuple, consts: dict, width: int) -> dict[str, object]:
    """Launch with a fixed config (interpreter, or BUTTERFLY_TRITON_AUTOTUNE=0 to skip the
    first-call benchmarking) or autotuned; returns the config used."""
    if INTERPRET:
        block_b = INTERPRET_BLOCK_B or max(1, min(16, INTERPRET_TILE // width))
        _KERNELS[kind][grid](*args, **consts, BLOCK_B=block_b)
        return {"BLOCK_B": block_b, "num_warps": None, "num_stages": None}
    if os.environ.get("BUTTERFLY_TRITON_AUTOTUNE", "1") == "0":
        named = dict(zip(_KERNELS[kind].arg_names, args, strict=False))
        best = max(_PRUNE[kind](_CONFIGS, named, **consts),
                   key=lambda c: (c.kwargs["BLOCK_B"] / c.num_warps, -c.num_warps))
        _KERNELS[kind][grid](*args, **consts, **best.all_kwargs())
    else:
        tuned = _tuned(kind)
        tuned[grid](*args, **consts)
        best = tuned.best_config
    return {"BLOCK_B": best.kwargs["BLOCK_B"], "num_warps": best.num_warps,
            "num_stages": best.num_stages}


def _forward_segment(x: torch.Tensor, y: torch.Tensor, tws: tuple, g: Geometry, blk0: int,
                     nblk: int, p: Pass) -> dict[str, object]:
    """y = levels of pass p of blocks blk0.. applied to x ((batch, n) buffers)."""
    width = (1 << p.c_log) * p.lob

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(g.batch, meta["BLOCK_B"]), g.n // width

    args = (_ptr(x), _ptr(y), tws[0], tws[-1], g.batch, g.n, g.tw_len, blk0, nblk, p.level0,
            rows_log2(g.batch))
    cfg = _launch("fwd", grid, args, g.consts(p, x.is_complex()), width)
    return {**cfg, "C": 1 << p.c_log, "ST": 1 << p.level0, "LOB": p.lob, "blocks": nblk}


def run_forward(x: torch.Tensor, tws: tuple, g: Geometry, fuse: bool,
                keep: bool = False) -> tuple[object, list]:
    """Apply every segment; returns (output, launch configs) or, with keep, the list of
    every segment's input in place of the output."""
    segs = g.segments(fuse)
    inputs, launches = [x], []
    for i, (blk0, nblk, p) in enumerate(segs):
        if keep and i == len(segs) - 1:
            break
        y = torch.empty(g.batch, g.n, dtype=g.buffer_dtype, device=x.device)
        launches.append(_forward_segment(inputs[-1], y, tws, g, blk0, nblk, p))
        inputs.append(y)
    return (inputs if keep else inputs[-1]), launches


def split_count(batch: int, nq: int, seg_bytes: int, sms: int | None) -> tuple[int, int]:
    """(programs along the batch, rows each) of a backward launch with nq column programs:
    about 4 programs per SM (sms None: the interpreter's INTERPRET_PROGRAMS), at most
    PARTIAL_BUDGET bytes of partials of seg_bytes each, but never fewer programs than SMs."""
    if sms is None:
        want = INTERPRET_PROGRAMS
    else:
        want = triton.cdiv(4 * sms, nq)
        want = min(want, max(PARTIAL_BUDGET // seg_bytes, triton.cdiv(sms, nq)))
    nsplit = max(1, min(batch, want))
    rows = triton.cdiv(batch, nsplit)
    return triton.cdiv(batch, rows), rows  # no program without rows


def _backward_segment(a: torch.Tensor, gy: torch.Tensor, tws: tuple, dtws: tuple, g: Geometry,
                      blk: int, p: Pass) -> tuple[torch.Tensor, dict]:
    """Grad of one segment's input (a's dtype); writes its twiddle grads (kernel pair
    order) into dtws[blk, :, levels of p]."""
    width = (1 << p.c_log) * p.lob
    nq = g.n // width
    seg_off, seg = p.level0 * (g.n // 2), p.c_log * (g.n // 2)
    item = torch.empty((), dtype=g.compute).element_size() * (2 if g.tw_complex else 1)
    sms = None if INTERPRET else torch.cuda.get_device_properties(
        a.device).multi_processor_count
    nsplit, rows = split_count(g.batch, nq, 4 * seg * item, sms)
    parts = tuple(torch.empty(nsplit, 4, seg, dtype=g.compute, device=a.device)
                  for _ in range(2 if g.tw_complex else 1))
    gx = torch.empty_like(a)
    args = (_ptr(a), _ptr(gy), _ptr(gx), tws[0], tws[-1], parts[0], parts[-1],
            g.batch, g.n, g.tw_len, blk, p.level0, rows, seg, rows_log2(rows))
    cfg = _launch("bwd", (nsplit, nq), args, g.consts(p, a.is_complex()), width)
    for dtw, part in zip(dtws, parts, strict=True):
        dtw[blk, :, seg_off : seg_off + seg] = part.sum(0)
    return gx, {**cfg, "C": 1 << p.c_log, "ST": 1 << p.level0, "LOB": p.lob, "splits": nsplit,
                "rows_per_split": rows}


def _record(direction: str, g: Geometry, launches: list[dict]) -> None:
    _LAST[direction] = {
        "n": g.n, "batch": g.batch, "nblocks": g.nblocks, "num_passes": len(g.passes),
        "num_launches": len(launches), "BLOCK_B": launches[0]["BLOCK_B"],
        "num_warps": launches[0]["num_warps"], "interpreter": INTERPRET, "launches": launches,
    }


def last_config(direction: str = "forward") -> dict:
    """Launch configuration of the last forward (or "backward") call; {} before any call.

    Top-level BLOCK_B / num_warps are the first launch's; `launches` lists every launch with
    its tile (C points, stride ST, LOB residues), BLOCK_B, num_warps and num_stages.
    """
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _LAST.get(direction, {}).items()}


class ButterflyFunction(torch.autograd.Function):
    """Autograd for the fused kernels: x (batch, n) real or complex, twiddle real or complex."""

    @staticmethod
    def forward(ctx, twiddle: torch.Tensor, x: torch.Tensor, g: Geometry) -> torch.Tensor:
        tws = tw_planes(twiddle, g)
        y, launches = run_forward(_dense(x), tws, g, fuse=True)
        _record("forward", g, launches)
        ctx.save_for_backward(twiddle, x)
        ctx.tws = tws  # the laid-out planes: no second re-layout in the backward
        ctx.g = g
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        twiddle, x = ctx.saved_tensors
        g = backward_geometry(ctx.g)
        tws = ctx.tws if g is ctx.g else tw_planes(twiddle, g)
        # recompute the input of every (block, pass) segment but the first (that is x)
        inputs, _ = run_forward(_dense(x), tws, g, fuse=False, keep=True)
        # twiddle grads come in kernel pair order for tied twiddles too: unpermuted, folded below
        dtws = tuple(torch.empty(g.nblocks, 4, g.m * g.n // 2, dtype=g.compute, device=x.device)
                     for _ in tws)
        grad, launches = _dense(gy.to(g.buffer_dtype)), []
        for (blk, _, p), a in reversed(list(zip(g.segments(False), inputs, strict=True))):
            grad, cfg = _backward_segment(a, grad, tws, dtws, g, blk, p)
            launches.append(cfg)
        _record("backward", g, launches)
        order = _order(g.n, g.passes, x.device)
        dtw = [torch.empty_like(d).index_copy_(2, order, d) for d in dtws]
        dtw = [d.transpose(1, 2).reshape(g.nblocks, g.m, g.n // 2, 2, 2) for d in dtw]
        dtw = [fold_tied(d) if g.tied else d for d in dtw]
        dtw = torch.complex(*dtw) if twiddle.is_complex() else dtw[0]
        return dtw.to(twiddle.dtype), grad.to(x.dtype), None


def butterfly_multiply_triton(
    twiddle: torch.Tensor, x: torch.Tensor, increasing_stride: bool = True, *,
    max_tile_n: int = MAX_TILE_N,
) -> torch.Tensor:
    """y = B x for x (batch, n) with the fused Triton kernels; same contract as the reference.

    twiddle: tied (nblocks, n-1, 2, 2) or untied (nblocks, m, n/2, 2, 2), real or complex.
    Returns complex (complex64, or complex128 with any fp64 input) if either is complex; a
    real result has x's dtype for fp16 / bf16 x (fp32 accumulation), else fp32 or fp64.
    max_tile_n: the largest sub-butterfly one launch applies (a power of two >= 2; tests
    lower it to reach the multi-pass path cheaply).
    """
    n, nblocks, tied = check_inputs(twiddle, x)
    if max_tile_n < 2 or max_tile_n & (max_tile_n - 1):
        raise ValueError(f"max_tile_n must be a power of two >= 2, got {max_tile_n}")
    real = {x.real.dtype, twiddle.real.dtype}  # .real of a real tensor is itself
    compute = torch.float64 if torch.float64 in real else torch.float32
    io = x.dtype if x.dtype in _LOW and compute == torch.float32 else compute
    m = n.bit_length() - 1
    g = Geometry(x.shape[0], n, m, nblocks, tied, increasing_stride,
                 x.is_complex() or twiddle.is_complex(), twiddle.is_complex(), compute, io,
                 tuple(plan_passes(m, max_tile_n)))
    if n == 1 or nblocks == 0 or x.shape[0] == 0:  # identity (no levels) or empty: no launch
        out = g.buffer_dtype
        return x.to(out) + 0 * twiddle.sum().to(out)  # keeps both in the graph
    return ButterflyFunction.apply(twiddle, x, g)
