"""Timing table of the CPU butterfly paths, one thread: `python -m kernels.cpu.bench`.

Writes reports/cpu_training_times.csv (one row per timed cell) and .md (the tables), with the
machine, load average, torch version and commit. Sections:

- train: forward + backward of y = B x (the loss is sum(y * g), real part when complex),
  n = 1024, batch 256, untied (kernels.Butterfly's default), real / complex, 1 / 2 blocks:
  the reference oracle under autograd (what Butterfly trained through before) against
  kernels.multiply (the compiled tiled kernels), the tiled kernels storing every level input
  instead of recomputing it, and a dense nn.Linear(1024, 1024) step; plus transform recovery's
  call (complex64, tied, batch = n = 1024).
- infer: no autograd, batch 1 and 256: the reference against kernels.multiply with a
  PlanCache (as a Butterfly layer in eval mode calls it), dense for comparison (complex
  against real is the ratio the issue asks about).
- layers: the compression layers (kernels.structured.BPLayer) at inference, batch 1 and 256,
  with BUTTERFLY_CPU_BACKEND=torch (torch paths: the oracle for complex, the torch row-loop
  fallback for real, torch relaxed permutations) against the default compiled paths.
- overhead: a Butterfly(n, n) eval call at batch 1 against nn.Linear(n, n); overhead = the
  call minus its arithmetic (the row loop's per-row time from a batch-64 call); each time is
  the lowest median of 20 rounds spread over about 2 s per n.
- nets: one training step (forward, cross-entropy, backward, Adam) of the compression task's
  network, x -> Linear(1024, 10)(ReLU(W x + b)), batch 256, per hidden layer W: BP / BPBP
  layers (fixed or learned permutation) through their factored compiled path (what they train
  through) against the materialised B_k P_k and a GEMM (what they trained through before);
  the other structured layers and dense as they train.
- compile (optional, about 90 s of compiling): the reference under torch.compile, the
  alternative to a hand-written kernel, on the first training case.
Times are medians of repeated calls after warm-up (time.perf_counter).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import kernels.cpu.tiled as tiled
from kernels.atomic import atomic_save
from kernels.butterfly import Butterfly
from kernels.cpu import CPUButterfly
from kernels.cpu.compiled import BACKEND_ENV, backend
from kernels.multiply import PlanCache, butterfly_multiply
from kernels.reference import butterfly_multiply_reference
from kernels.structured.butterfly_layer import BPLayer

FIELDS = ["section", "case", "impl", "n", "batch", "dtype", "nblocks", "tied", "ms"]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def low_medians_ms(
    calls: dict[str, tuple[Callable[[], object], int]], rounds: int = 20, pause_s: float = 0.1
) -> dict[str, float]:
    """Per name, the lowest of `rounds` medians of repeats // rounds calls of fn, for calls
    {name: (fn, repeats)}: the rounds take the fns in turn and are spread out by pause_s, so a
    burst of load on a shared machine lifts some rounds, not all (microsecond timings)."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, (fn, repeats) in calls.items():
            best[name] = min(best[name], median_ms(fn, max(1, repeats // rounds)))
        time.sleep(pause_s)
    return best


def twiddle(n: int, nblocks: int, tied: bool, dtype: torch.dtype, gen: torch.Generator):
    m = n.bit_length() - 1
    shape = (nblocks, n - 1, 2, 2) if tied else (nblocks, m, n // 2, 2, 2)
    return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5**0.5


def train_step(fn, tw: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of sum(Re(fn(tw, x) * g)) into tw.grad."""

    def step() -> None:
        tw.grad = None
        y = fn(tw, x)
        ((y * g).real if y.is_complex() else y * g).sum().backward()

    return step


def section_train(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    n, batch = 1024, 256
    cases = [(c, nb, False, batch) for c in (False, True) for nb in (1, 2)]
    cases.append((True, 1, True, n))  # transform recovery: complex tied, batch = n
    for complex_, nblocks, tied, b in cases:
        dtype = torch.complex64 if complex_ else torch.float32
        tw = twiddle(n, nblocks, tied, dtype, gen).requires_grad_()
        x = torch.randn(b, n, generator=gen, dtype=dtype)
        g = torch.randn(b, n, generator=gen, dtype=dtype)
        name = "recovery: complex tied, batch = n" if b == n else "Butterfly layer"
        base = dict(section="train", case=name, n=n, batch=b, dtype=str(dtype)[6:],
                    nblocks=nblocks, tied=tied)  # fmt: skip
        reps = max(3, repeats // 4)
        ref = train_step(butterfly_multiply_reference, tw, x, g)
        rows.append({**base, "impl": "reference", "ms": median_ms(ref, reps)})
        fast = train_step(butterfly_multiply, tw, x, g)
        rows.append({**base, "impl": "compiled", "ms": median_ms(fast, repeats)})
        tiled.STORE_LEVELS = True
        try:
            rows.append({**base, "impl": "compiled, levels stored", "ms": median_ms(fast, repeats)})
        finally:
            tiled.STORE_LEVELS = False
    lin = torch.nn.Linear(n, n)
    x = torch.randn(batch, n, generator=gen)

    def dense() -> None:
        lin.zero_grad(set_to_none=True)
        lin(x).sum().backward()

    ms = median_ms(dense, repeats)
    rows.append(dict(section="train", case="dense nn.Linear", impl="dense", n=n, batch=batch,
                     dtype="float32", nblocks=0, tied=False, ms=ms))  # fmt: skip


def section_infer(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    n = 1024
    for batch in (1, 256):
        reps = repeats * (20 if batch == 1 else 1)
        for complex_ in (False, True):
            for nblocks in (1, 2):
                dtype = torch.complex64 if complex_ else torch.float32
                tw = twiddle(n, nblocks, False, dtype, gen)
                x = torch.randn(batch, n, generator=gen, dtype=dtype)
                base = dict(section="infer", case="butterfly multiply", n=n, batch=batch,
                            dtype=str(dtype)[6:], nblocks=nblocks, tied=False)  # fmt: skip
                with torch.inference_mode():
                    ref = median_ms(partial(butterfly_multiply_reference, tw, x), max(3, reps // 4))
                    rows.append({**base, "impl": "reference", "ms": ref})
                    # what a Butterfly layer runs in eval mode: its plan (if any) packed once
                    cache = PlanCache()
                    fast = median_ms(partial(butterfly_multiply, tw, x, cache=cache), reps)
                    rows.append({**base, "impl": "compiled", "ms": fast})
        lin = torch.nn.Linear(n, n, bias=False)
        x = torch.randn(batch, n, generator=gen)
        with torch.inference_mode():
            rows.append(dict(section="infer", case="dense nn.Linear", impl="dense", n=n,
                             batch=batch, dtype="float32", nblocks=0, tied=False,
                             ms=median_ms(partial(lin, x), reps)))  # fmt: skip


def section_layers(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    n = 1024
    for nblocks in (1, 2):
        for complex_ in (False, True):
            for learned in (False, True):
                name = ("bp" if nblocks == 1 else "bpbp") + ("_complex" if complex_ else "_real")
                name += "_learned" if learned else ""
                state = BPLayer(n, nblocks, complex_, learned, generator=gen).state_dict()
                for impl in ("torch paths", "compiled"):
                    layer = BPLayer(n, nblocks, complex_, learned)
                    layer.load_state_dict(state)
                    layer.eval()
                    forced = impl == "torch paths"
                    old = os.environ.get(BACKEND_ENV)
                    if forced:
                        os.environ[BACKEND_ENV] = "torch"
                    try:
                        for batch in (1, 256):
                            x = torch.randn(batch, n, generator=gen)
                            reps = repeats * (10 if batch == 1 else 1)
                            if forced and batch == 256:
                                reps = max(3, reps // 4)
                            with torch.inference_mode():
                                ms = median_ms(partial(layer, x), reps)
                            rows.append(dict(section="layers", case=name, impl=impl, n=n,
                                             batch=batch, dtype="float32", nblocks=nblocks,
                                             tied=True, ms=ms))  # fmt: skip
                    finally:
                        if forced:
                            if old is None:
                                del os.environ[BACKEND_ENV]
                            else:
                                os.environ[BACKEND_ENV] = old


NET_METHODS = ("dense", "bp_real", "bp_complex", "bpbp_real", "bpbp_complex", "bp_real_learned",
               "bp_complex_learned", "bpbp_real_learned", "bpbp_complex_learned", "monarch",
               "monarch_sqrt", "circulant", "fastfood", "toeplitz_r1", "toeplitz_r4", "ldr_td_r1",
               "lowrank_r4")  # fmt: skip


def section_nets(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    from kernels.structured import make_layer

    n, batch = 1024, 256
    x = torch.randn(batch, n, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    for method in NET_METHODS:
        hidden = make_layer(method, n, gen)
        impls = {"as trained": hidden}
        if isinstance(hidden, BPLayer):
            impls["materialised B P + GEMM"] = hidden.materialised  # the earlier training path
        for impl, fn in impls.items():
            bias, out = torch.nn.Parameter(torch.zeros(n)), torch.nn.Linear(n, 10)
            opt = torch.optim.Adam([*hidden.parameters(), bias, *out.parameters()], lr=1e-3)

            def step(fn=fn, bias=bias, out=out, opt=opt) -> None:
                loss = torch.nn.functional.cross_entropy(out(torch.relu(fn(x) + bias)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            hidden.train()
            rows.append(dict(section="nets", case=method, impl=impl, n=n, batch=batch,
                             dtype="float32", nblocks=0, tied=True,
                             ms=median_ms(step, repeats)))  # fmt: skip


def section_overhead(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    for n in (64, 256, 1024):
        layer = Butterfly(n, n, tied=True, generator=gen).eval()
        lin = torch.nn.Linear(n, n).eval()
        x1 = torch.randn(1, n, generator=gen)
        x64 = torch.randn(64, n, generator=gen)
        plan = CPUButterfly(layer.twiddle.detach())
        out1, out64 = torch.empty(1, n), torch.empty(64, n)
        reps = repeats * 200
        calls = {
            "call": (partial(layer, x1), reps),
            "dense": (partial(lin, x1), reps),
            "p1": (partial(plan, x1, out1), reps),
            "p64": (partial(plan, x64, out64), reps // 10),
        }
        with torch.inference_mode():
            ms = low_medians_ms(calls)
        call, dense, p1, p64 = ms["call"], ms["dense"], ms["p1"], ms["p64"]
        per_row = max(0.0, (p64 - p1) / 63)
        base = dict(section="overhead", n=n, batch=1, dtype="float32", nblocks=1, tied=True)
        rows.append({**base, "case": "Butterfly(n, n) eval call", "impl": "compiled", "ms": call})
        rows.append({**base, "case": "per-row arithmetic", "impl": "compiled", "ms": per_row})
        rows.append({**base, "case": "overhead = call - arithmetic", "impl": "compiled",
                     "ms": call - per_row})  # fmt: skip
        rows.append({**base, "case": "nn.Linear(n, n) eval call", "impl": "dense", "ms": dense})


def section_compile(rows: list[dict], gen: torch.Generator, repeats: int) -> None:
    n, batch = 1024, 256
    tw = twiddle(n, 1, False, torch.float32, gen).requires_grad_()
    x = torch.randn(batch, n, generator=gen)
    g = torch.randn(batch, n, generator=gen)
    step = train_step(torch.compile(butterfly_multiply_reference), tw, x, g)
    t0 = time.perf_counter()
    step()
    base = dict(section="compile", n=n, batch=batch, dtype="float32", nblocks=1, tied=False)
    rows.append({**base, "case": "first call (compiling)", "impl": "torch.compile(reference)",
                 "ms": 1e3 * (time.perf_counter() - t0)})  # fmt: skip
    rows.append({**base, "case": "Butterfly layer", "impl": "torch.compile(reference)",
                 "ms": median_ms(step, repeats)})  # fmt: skip


def environment() -> dict[str, str]:
    """Machine, library and load context printed above the tables."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "backend": backend(),
        "commit": commit,
        "load average (1 min) before": f"{os.getloadavg()[0]:.2f}",
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "-"


def markdown(rows: list[dict], env: dict[str, str]) -> str:
    """The tables of the module doc, with speed-ups."""
    get = {(r["section"], r["case"], r["impl"], r["batch"], r["dtype"], r["nblocks"],
            r["tied"]): r["ms"] for r in rows}  # fmt: skip
    out = ["# CPU butterfly timings (one thread)", "",
           "Generated by `python -m kernels.cpu.bench`; medians of repeated calls, float32 /",
           "complex64, n = 1024 unless stated.", ""]  # fmt: skip
    out += [f"- {k}: {v}" for k, v in env.items()] + [""]
    have = {r["section"] for r in rows}
    if "train" in have:
        out += ["## Training step (forward + backward), batch 256 unless stated", "",
                "| case | dtype | blocks | reference ms | compiled ms | speed-up "
                "| levels stored ms | compiled / dense (b 256) |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        dense = get[("train", "dense nn.Linear", "dense", 256, "float32", 0, False)]
        for r in rows:
            if r["section"] == "train" and r["impl"] == "compiled":
                key = ("train", r["case"], "reference", r["batch"], r["dtype"], r["nblocks"],
                       r["tied"])  # fmt: skip
                ref = get[key]
                stored = get[key[:2] + ("compiled, levels stored",) + key[3:]]
                case = r["case"] + (f" ({'tied' if r['tied'] else 'untied'})")
                ms = r["ms"]
                vs_dense = f"{ms / dense:.2f}" if r["batch"] == 256 else "-"
                out.append(f"| {case} | {r['dtype']} | {r['nblocks']} | {ref:.2f} | {ms:.2f} | "
                           f"{ratio(ref, ms)} | {stored:.2f} | {vs_dense} |")  # fmt: skip
        out += ["", "Dense nn.Linear(1024, 1024) forward + backward, batch 256: "
                f"{dense:.2f} ms.", ""]  # fmt: skip
    if "infer" in have:
        out += ["## Inference (no autograd)", "",
                "| batch | dtype | blocks | reference ms | compiled ms | speed-up "
                "| complex / real |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if r["section"] == "infer" and r["impl"] == "compiled":
                key = ("infer", r["case"], "reference", r["batch"], r["dtype"], r["nblocks"], False)
                ref = get[key]
                real = get[("infer", r["case"], "compiled", r["batch"], "float32",
                            r["nblocks"], False)]  # fmt: skip
                cr = ratio(r["ms"], real) if r["dtype"] == "complex64" else ""
                out.append(f"| {r['batch']} | {r['dtype']} | {r['nblocks']} | {ref:.4f} | "
                           f"{r['ms']:.4f} | {ratio(ref, r['ms'])} | {cr} |")  # fmt: skip
        for b in (1, 256):
            d = get[("infer", "dense nn.Linear", "dense", b, "float32", 0, False)]
            out.append(f"\nDense nn.Linear(1024, 1024) inference, batch {b}: {d:.4f} ms.")
    if "layers" in have:
        out += [
            "",
            "## Compression layers at inference (BPLayer, n = 1024)",
            "",
            "| layer | batch | torch paths ms | compiled ms | speed-up |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["section"] == "layers" and r["impl"] == "compiled":
                t = get[("layers", r["case"], "torch paths", r["batch"], "float32",
                         r["nblocks"], True)]  # fmt: skip
                out.append(f"| {r['case']} | {r['batch']} | {t:.4f} | {r['ms']:.4f} | "
                           f"{ratio(t, r['ms'])} |")  # fmt: skip
    if "overhead" in have:
        out += ["", "## Per-call overhead at batch 1 (tied Butterfly with bias, eval)", "",
                "Lowest of 20 medians of repeated calls, spread over about 2 s per n (a burst",
                "of load lifts some, not all).", "",
                "| n | Butterfly call us | arithmetic us | overhead us | nn.Linear call us |",
                "|---|---|---|---|---|"]  # fmt: skip
        for n in (64, 256, 1024):

            def us(case: str, impl: str = "compiled", n: int = n) -> float:
                hits = (r["ms"] for r in rows if r["section"] == "overhead" and r["case"] == case
                        and r["n"] == n and r["impl"] == impl)  # fmt: skip
                return 1e3 * next(hits)

            out.append(f"| {n} | {us('Butterfly(n, n) eval call'):.1f} | "
                       f"{us('per-row arithmetic'):.1f} | "
                       f"{us('overhead = call - arithmetic'):.1f} | "
                       f"{us('nn.Linear(n, n) eval call', 'dense'):.1f} |")  # fmt: skip
    nets = [r for r in rows if r["section"] == "nets"]
    if nets:
        out += ["", "## Compression network, one training step (batch 256, Adam)", "",
                "| hidden layer | ms | materialised B P + GEMM ms | speed-up | ms / dense |",
                "|---|---|---|---|---|"]  # fmt: skip
        ms = {(r["case"], r["impl"]): r["ms"] for r in nets}
        dense_net = ms.get(("dense", "as trained"))
        for method in dict.fromkeys(r["case"] for r in nets):
            now, old = ms[(method, "as trained")], ms.get((method, "materialised B P + GEMM"))
            before = "" if old is None else f"{old:.2f}"
            gain = "" if old is None else ratio(old, now)
            vs = "" if dense_net is None else f"{now / dense_net:.2f}"
            out.append(f"| {method} | {now:.2f} | {before} | {gain} | {vs} |")
    done = {r["case"]: r["ms"] for r in rows if r["section"] == "compile"}
    if done:
        out += ["", "## torch.compile of the reference (float32, 1 block, batch 256)", "",
                f"- first call, compiling: {done['first call (compiling)'] / 1e3:.1f} s "
                "(inductor's on-disk cache may hold an earlier compile of the same graph)",
                f"- forward + backward: {done['Butterfly layer']:.2f} ms"]  # fmt: skip
    return "\n".join(out + [""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/cpu_training_times", help="path without suffix")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sections", default="train,infer,layers,overhead,nets", help="and compile")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    env = environment()
    rows: list[dict] = []
    funcs = {"train": section_train, "infer": section_infer, "layers": section_layers,
             "overhead": section_overhead, "nets": section_nets,
             "compile": section_compile}  # fmt: skip
    for name in args.sections.split(","):
        funcs[name](rows, gen, args.repeats)
        print(f"{name}: done", flush=True)
    env["load average (1 min) after"] = f"{os.getloadavg()[0]:.2f}"
    out = Path(args.out)

    def table(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    atomic_save(out.with_suffix(".csv"), table)  # never half a table
    text = markdown(rows, env)
    atomic_save(out.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(out.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
