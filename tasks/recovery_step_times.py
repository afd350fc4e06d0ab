"""Milliseconds per Adam step of transform recovery (learned matrix + MSE + backward + step).

`python -m tasks.recovery_step_times` times, on one thread, one Adam step of ButterflyStack for
bp / bpp / bpbp at n = 8 .. 1024: the learned matrix as built at commit `OLD_COMMIT` (its code
read with `git show`, so both run in this process under the same load), and now, unbatched and
batched (`trials` trials in one vectorised model, n <= `max_batched_n`). Targets: complex for bp
(the DFT's case), real with `real_output` for bpp and bpbp (DCT, convolution). Writes
reports/recovery_step_times.{csv,md}.
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.butterfly import ButterflyStack

OLD_COMMIT = "60984eb"
COLUMNS = ("model", "n", "trials", "ms_per_step", "ms_per_trial_step", "before_ms", "speedup")
MatrixFn = Callable[[ButterflyStack], torch.Tensor]


def _git_show(path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def old_matrix_fn() -> MatrixFn:
    """ButterflyStack.matrix() as it was at OLD_COMMIT, applied to a stack of today's layout."""
    perm = types.ModuleType("old_permutation")
    exec(compile(_git_show("kernels/permutation.py"), "old_permutation", "exec"), perm.__dict__)
    tree = ast.parse(_git_show("kernels/butterfly.py"))
    func = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tied_bp_matrix"
    )
    scope = {
        "torch": torch,
        "log2_exact": perm.log2_exact,
        "permute_level_transpose": perm.permute_level_transpose,
    }
    exec(compile(ast.Module(body=[func], type_ignores=[]), "old_butterfly", "exec"), scope)
    tied_bp_matrix = scope["tied_bp_matrix"]

    def matrix(stack: ButterflyStack) -> torch.Tensor:  # the old method body
        mat = None
        for p, bfly in zip(stack.perms, stack.butterflies, strict=True):
            block = tied_bp_matrix(bfly.twiddle_tensor()[0], p.probs())
            mat = block if mat is None else block @ mat
        if stack.extra_perm is not None:
            probs = stack.extra_perm.probs()
            if stack.extra_perm.top_only:
                mat = perm.permute_level_transpose(mat, probs[0].to(mat.real.dtype), stack.n)
            else:
                mat = perm.permute_columns(mat, probs)
        return mat.real if stack.real_output else mat

    return matrix


def mse(approx: torch.Tensor, target: torch.Tensor, loss: str = "view") -> torch.Tensor:
    """Mean of |approx - target|^2 over the last two dims, summed over any trial dims.

    view: one real view of the difference (as tasks/recovery.train.mse computes it);
    parts: real and imaginary parts squared separately (what it computed before: the same number
    with more passes).
    """
    d = approx - target
    if d.is_complex() and loss == "view":
        return torch.view_as_real(d).square().sum(dim=(-3, -2, -1)).sum() / d[0].numel()
    sq = d.real.square() + d.imag.square() if d.is_complex() else d.square()
    return sq.mean(dim=(-2, -1)).sum()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_steps(
    stack: ButterflyStack,
    matrix: MatrixFn,
    min_seconds: float,
    clock: str = "cpu",
    loss: str = "view",
) -> float:
    """Best ms of one Adam step: matrix, MSE against a fixed random target, backward, step.

    clock "cpu" is this process's CPU time (what one free core would take: robust on a shared
    machine), "wall" the elapsed time. The minimum over >= 5 steps: on a shared machine other
    processes only ever add time.
    """
    now = CLOCKS[clock]
    g = torch.Generator().manual_seed(0)
    shape = matrix(stack).shape
    target = torch.randn(shape, generator=g)
    if not stack.real_output:
        target = torch.complex(target, torch.randn(shape, generator=g))
    opt = torch.optim.Adam(stack.parameters(), lr=1e-3)

    def step() -> float:
        t0 = now()
        opt.zero_grad()
        mse(matrix(stack), target, loss).backward()
        opt.step()
        return now() - t0

    for _ in range(2):
        step()
    times: list[float] = []
    while sum(times) < min_seconds or len(times) < 5:
        times.append(step())
    return 1e3 * min(times)


def build(model: str, n: int, trials: int | None) -> ButterflyStack:
    gens = [torch.Generator().manual_seed(t) for t in range(trials or 1)]
    return ButterflyStack(
        n,
        model,
        real_output=model != "bp",
        trials=trials,
        generator=gens if trials else gens[0],
    )


def measure(
    models: list[str],
    sizes: list[int],
    trials: int,
    max_batched_n: int,
    min_seconds: float,
    clock: str,
    loss: str,
) -> list[dict[str, object]]:
    old = old_matrix_fn()
    rows: list[dict[str, object]] = []
    for model in models:
        for n in sizes:
            before = time_steps(build(model, n, None), old, min_seconds, clock, loss)
            for t in [None] + ([trials] if n <= max_batched_n else []):
                stack = build(model, n, t)
                ms = time_steps(stack, ButterflyStack.matrix, min_seconds, clock, loss)
                per_trial = ms / (t or 1)
                rows.append(
                    dict(
                        model=model,
                        n=n,
                        trials=t or 1,
                        ms_per_step=round(ms, 3),
                        ms_per_trial_step=round(per_trial, 3),
                        before_ms=round(before, 3),
                        speedup=round(before / per_trial, 2),
                    )
                )
                print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def write(rows: list[dict[str, object]], out: Path, command: str, clock: str, loss: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Recovery: milliseconds per Adam step (matrix + MSE + backward + step)",
        "",
        f"Command: `{command}`; one thread (torch {torch.__version__}), float32, complex",
        "twiddles; bp fits a complex target, bpp and bpbp a real one (real_output). before_ms:",
        f"ButterflyStack.matrix() as at commit {OLD_COMMIT}, timed in the same process;",
        "speedup = before_ms / ms_per_trial_step. Best of >= 5 steps after 2 warm-up steps,",
        f"clock {clock!r} ({'CPU time of the process' if clock == 'cpu' else 'elapsed time'});",
        f"complex MSE written as {loss!r} (see tasks/recovery_step_times.py: mse).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at the end; HEAD {commit} (plus working tree).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bp", "bpp", "bpbp"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--trials", type=int, default=8, help="trials of the batched runs")
    ap.add_argument("--max-batched-n", type=int, default=256)
    ap.add_argument("--min-seconds", type=float, default=0.3, help="timing per case")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    ap.add_argument("--loss", choices=["parts", "view"], default="view", help="see mse()")
    ap.add_argument("--out", type=Path, default=Path("reports/recovery_step_times"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(
        args.models,
        args.sizes,
        args.trials,
        args.max_batched_n,
        args.min_seconds,
        args.clock,
        args.loss,
    )
    command = "python -m tasks.recovery_step_times " + " ".join(argv or sys.argv[1:])
    write(rows, args.out, command.strip(), args.clock, args.loss)


if __name__ == "__main__":
    main()
