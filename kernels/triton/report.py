"""Compile report and traffic model of the fused Triton butterfly, made without a GPU.

Compile: every (kernel, tile, dtype, config the tuner may pick) is compiled by Triton's own
compiler for sm_90a (H100 / H200) and sm_80 (A100), its PTX run through the bundled
`ptxas -v`: registers per thread, spill bytes, shared memory (Triton's metadata) and the
predicted occupancy from the SM's register file, warp and shared-memory limits. Compiles run
in a child process without TRITON_INTERPRET (the interpreter replaces @triton.jit); a child
that cannot compile yields rows with status "skipped" and the reason, never a silent pass.

Traffic: bytes a call moves through DRAM (input, output, twiddles, partials, extra passes)
against the floor 2 b n s (read x once, write y once), and the fraction of copy bandwidth
that implies if the kernel streams at copy speed. Twiddles count once per launch (they stay
in L2; re-reads by other programs are L2 traffic, not DRAM).

    python -m kernels.triton.report [--out reports] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = {  # per-SM limits (CUDA occupancy calculator): registers, warps, blocks, smem bytes
    90: dict(name="sm_90a", gpu="H100/H200", regs=65536, warps=64, blocks=32, smem=233472),
    80: dict(name="sm_80", gpu="A100", regs=65536, warps=64, blocks=32, smem=167936),
}
DTYPES = ("fp32", "bf16", "complex64")
SIZES = tuple(1 << m for m in range(6, 13)) + (1 << 13, 1 << 16)  # + multi-pass sizes
TUNER_ROWS = 1 << 20  # rows given to the tuner's pruning: no cap from the batch


@dataclass(frozen=True)
class Case:
    """One compile: kernel kind ("fwd" / "bwd"), tile (c_log levels x lob residues), dtype,
    launch config and target capability."""

    kind: str
    c_log: int
    lob: int
    dtype: str
    block_b: int
    num_warps: int
    arch: int


def tuner_configs(kind: str, c_log: int, lob: int, dtype: str, rows: int = TUNER_ROWS,
                  spills: frozenset | None = None) -> list[tuple[int, int]]:
    """(BLOCK_B, num_warps) the autotuner may pick for this tile (its early prune; spills:
    the pruned spilling configs, kernels.triton.spills.SPILLS unless given)."""
    from kernels.triton import function as f

    args = dict(C_LOG=c_log, LOB=lob, COMPLEX=dtype == "complex64", batch=rows,
                rows_per_split=rows)
    return [(c.kwargs["BLOCK_B"], c.num_warps)
            for c in f._prune_fn(kind, spills)(f._CONFIGS, args)]


def tiles(n: int, kind: str = "fwd", dtype: str = "fp32") -> list[tuple[int, int]]:
    """(c_log, lob) of each pass of size n; for the complex backward also the tiles of its
    own plan (kernels.triton.function.backward_geometry)."""
    from kernels.triton.function import BWD_MAX_TILE_COMPLEX, plan_passes

    m = n.bit_length() - 1
    out = [(p.c_log, p.lob) for p in plan_passes(m)]
    if kind == "bwd" and dtype == "complex64":
        out += [(p.c_log, p.lob) for p in plan_passes(m, BWD_MAX_TILE_COMPLEX)
                if (p.c_log, p.lob) not in out]
    return out


def all_cases(sizes: tuple[int, ...] = SIZES, archs: tuple[int, ...] = (90, 80),
              spill_sets: tuple[frozenset, ...] = (frozenset(),)) -> list[Case]:
    """Every kernel x tile x dtype x tuner config x arch, without repeats: the configs of
    the tuner's prune with no spill pruning and with each of spill_sets (the current
    SPILLS is added for launched tiles), so that both the spilling configs and their
    replacements appear."""
    from kernels.triton import function as f

    seen: dict[Case, None] = {}
    for n in sizes:
        for dtype in DTYPES:
            for kind in ("fwd", "bwd"):
                for c_log, lob in tiles(n, kind, dtype):
                    # a tile the plan never launches keeps only its unpruned configs (evidence)
                    launched = not (kind == "bwd" and dtype == "complex64"
                                    and (1 << c_log) * lob > f.BWD_MAX_TILE_COMPLEX)
                    sets = (*spill_sets, f.SPILLS) if launched else spill_sets
                    configs = {cfg for sp in sets
                               for cfg in tuner_configs(kind, c_log, lob, dtype, spills=sp)}
                    for bb, w in sorted(configs):
                        for arch in archs:
                            seen[Case(kind, c_log, lob, dtype, bb, w, arch)] = None
    return list(seen)


def spill_set(rows: list[dict]) -> frozenset:
    """(kind, COMPLEX, C_LOG, LOB, BLOCK_B, num_warps) of every config that spills on any
    target (fp32 and bf16 share a key: the prune sees only COMPLEX)."""
    return frozenset((r["kind"], r["dtype"] == "complex64", r["c_log"], r["lob"], r["block_b"],
                      r["num_warps"]) for r in rows if r.get("spills"))


def write_spills(spills: frozenset, path: Path) -> None:
    """Write kernels/triton/spills.py (the tuner's pruned set)."""
    body = "".join(f"    {t!r},\n" for t in sorted(spills))
    path.write_text(
        '"""Configs ptxas showed to spill, pruned from the autotuner (generated by\n'
        "`python -m kernels.triton.report`; see reports/triton_compile.md). Keys: (kind,\n"
        'COMPLEX, C_LOG, LOB, BLOCK_B, num_warps)."""\n\n'
        f"SPILLS: frozenset[tuple] = frozenset({{\n{body}}})\n")


# ---- compiling (child process) ------------------------------------------------------------

_PTR = {"fp32": "*fp32", "bf16": "*bf16", "complex64": "*fp32"}


def _signature(case: Case, arg_names: list[str]) -> tuple[dict, dict, dict]:
    """Signature, constexprs and 16-divisibility attrs of a launch on 16-aligned tensors."""
    cplx = case.dtype == "complex64"
    consts = dict(C_LOG=case.c_log, LOB=case.lob, TIED=False, INCREASING=True, COMPLEX=cplx,
                  X_CPLX=cplx, TW_CPLX=cplx, BLOCK_B=case.block_b)
    data = {"x", "y", "a", "g", "gx"}
    sig, attrs = {}, {}
    for i, name in enumerate(arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in data or name.startswith(("tw_", "dtw_")):
            sig[name] = _PTR[case.dtype] if name in data else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in ("batch", "n", "TW", "SEG", "rows_per_split", "L0", "blk0", "blk"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def parse_ptxas(log: str) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack (bytes) from a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    if not regs or not spill:
        raise ValueError(f"unrecognised ptxas output: {log[:200]!r}")
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))


def compile_case(case: Case) -> dict[str, object]:
    """Compile one case in this process (TRITON_INTERPRET must be unset); ptxas stats."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton import kernels as tk

    fn = tk.butterfly_fwd_kernel if case.kind == "fwd" else tk.butterfly_bwd_kernel
    sig, consts, attrs = _signature(case, fn.arg_names)
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", case.arch, 32),
                       options=dict(num_warps=case.num_warps))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(k.asm["ptx"])
        src.flush()
        run = subprocess.run([ptxas_path(), "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={ARCHS[case.arch]['name']}", src.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return {**parse_ptxas(run.stderr), "shared": int(k.metadata.shared),
            "compile_s": round(time.perf_counter() - t0, 2)}


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict[str, float]:
    """Resident blocks per SM and warp occupancy (fraction of the SM's warp slots)."""
    lim = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256  # allocated in 256-register units per warp
    by_regs = (lim["regs"] // per_warp) // num_warps
    by_smem = lim["smem"] // (shared + 1024) if shared else lim["blocks"]
    blocks = min(by_regs, by_smem, lim["blocks"], lim["warps"] // num_warps)
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * num_warps / lim["warps"], 3)}


def _child(cases: list[Case]) -> list[dict]:
    """Run in a child: compile each case; a failing one becomes an "error" row."""
    rows = []
    for c in cases:
        try:
            rows.append({**asdict(c), "status": "ok", **compile_case(c)})
        except (subprocess.CalledProcessError, RuntimeError, ValueError, OSError) as e:
            rows.append({**asdict(c), "status": "error", "reason": str(e).splitlines()[0][:200]})
    return rows


def compile_cases(cases: list[Case], timeout: float = 3600.0, jobs: int = 1) -> list[dict]:
    """Compile cases in `jobs` child processes without TRITON_INTERPRET; rows with ptxas
    stats and occupancy, or status "skipped" and the reason when a child cannot run."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    chunks = [cases[i::jobs] for i in range(jobs) if cases[i::jobs]]
    procs = [subprocess.Popen([sys.executable, "-m", "kernels.triton.report", "--child"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[2]) for _ in chunks]

    def talk(proc: subprocess.Popen, chunk: list[Case]) -> list[dict]:
        reason = None
        try:
            out, err = proc.communicate(json.dumps([asdict(c) for c in chunk]), timeout=timeout)
            if proc.returncode == 0:
                return json.loads(out.strip().splitlines()[-1])
            reason = (err.strip().splitlines() or ["no output"])[-1][:200]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            reason = f"compile child timed out after {timeout:.0f} s"
        return [{**asdict(c), "status": "skipped", "reason": reason} for c in chunk]

    with ThreadPoolExecutor(len(procs) or 1) as pool:  # the children run at once
        rows = [row for part in pool.map(talk, procs, chunks) for row in part]
    for r in rows:
        if r["status"] == "ok":
            r.update(occupancy(r["registers"], r["shared"], r["num_warps"], r["arch"]))
            r["spills"] = r["spill_stores"] + r["spill_loads"] > 0
    return rows


def kernels_sha256() -> str:
    """Hash of kernels.py: compile rows are valid for this source only."""
    import hashlib

    return hashlib.sha256(Path(__file__).with_name("kernels.py").read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    """Triton's version and the bundled ptxas's."""
    import triton

    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return {"triton": triton.__version__, "ptxas": found.group(2) if found else "unknown"}


# ---- traffic model ------------------------------------------------------------------------

ITEM = {"fp32": 4, "bf16": 2, "complex64": 8}


def traffic(kind: str, n: int, dtype: str, batch: int, sms: int = 132,
            nblocks: int = 1) -> dict[str, float]:
    """DRAM bytes of one call (untied twiddles, the launch plan of kernels.triton) against
    the floor: forward 2 b n s (read x, write y), backward 3 b n s (read x and grad y,
    write grad x). Returns the parts, total, floor, ratio and predicted copy fraction."""
    from kernels.triton.function import BWD_MAX_TILE_COMPLEX, plan_passes, split_count

    m = n.bit_length() - 1
    passes = plan_passes(m)
    if kind == "bwd" and dtype == "complex64":
        passes = [p for p in plan_passes(m, BWD_MAX_TILE_COMPLEX)] if any(
            (1 << p.c_log) * p.lob > BWD_MAX_TILE_COMPLEX for p in passes) else passes
    s = ITEM[dtype]
    tw_planes = 2 if dtype == "complex64" else 1
    plane = batch * n * s
    tw = nblocks * 4 * (m * n // 2) * 4 * tw_planes  # fp32 planes, read once per launch
    segs = 1 if len(passes) == 1 else nblocks * len(passes)
    parts = {"input": 0.0, "output": 0.0, "twiddles": 0.0, "partials": 0.0, "extra": 0.0}
    if kind == "fwd":
        parts.update(input=plane, output=plane, twiddles=tw,
                     extra=2 * plane * (segs - 1))  # intermediates: written, read back
        floor = 2 * plane
    else:
        nseg = nblocks * len(passes)
        # recompute the inputs of segments 2.. (a forward each), then per segment read a and
        # grad, write grad x; intermediates of those beyond the first segment are extra
        recompute = 2 * plane * (nseg - 1)
        per_seg = 3 * plane
        partial = 0.0
        for p in passes:
            nq = n // ((1 << p.c_log) * p.lob)
            seg_bytes = 4 * p.c_log * (n // 2) * 4 * tw_planes
            nsplit, _ = split_count(batch, nq, seg_bytes, sms)
            partial += nblocks * 2 * nsplit * seg_bytes  # written by the kernel, read by sum
        parts.update(input=2 * plane, output=plane, twiddles=3 * tw,  # read twice, grads written
                     partials=partial, extra=recompute + per_seg * (nseg - 1))
        floor = 3 * plane
    total = sum(parts.values())
    return {**parts, "total": total, "floor": floor, "ratio": round(total / floor, 4),
            "copy_fraction": round(floor / total, 4)}


def traffic_rows(batches: tuple[int, ...] = (256, 16384)) -> list[dict]:
    rows = []
    for batch in batches:
        for n in SIZES:
            for dtype in DTYPES:
                for kind in ("fwd", "bwd"):
                    rows.append({"kind": kind, "n": n, "dtype": dtype, "batch": batch,
                                 **traffic(kind, n, dtype, batch)})
    return rows


# ---- outputs ------------------------------------------------------------------------------

COLUMNS = ["kind", "n_tile", "c_log", "lob", "dtype", "block_b", "num_warps", "arch", "status",
           "registers", "spill_stores", "spill_loads", "stack", "shared", "blocks_per_sm",
           "occupancy", "tuner_may_pick", "reason"]


def pickable(kind: str, c_log: int, lob: int, dtype: str, block_b: int, num_warps: int) -> bool:
    """Whether a launch may run this config: the tuner keeps it after its prune (spills
    included) and the plan launches the tile (complex backward tiles above
    BWD_MAX_TILE_COMPLEX are split into more passes)."""
    from kernels.triton.function import BWD_MAX_TILE_COMPLEX

    if kind == "bwd" and dtype == "complex64" and (1 << c_log) * lob > BWD_MAX_TILE_COMPLEX:
        return False
    return (block_b, num_warps) in tuner_configs(kind, c_log, lob, dtype)


def annotate(rows: list[dict]) -> list[dict]:
    """Add the tile size and whether a launch may pick the config (see pickable)."""
    for r in rows:
        r["n_tile"] = (1 << r["c_log"]) * r["lob"]
        r["tuner_may_pick"] = pickable(r["kind"], r["c_log"], r["lob"], r["dtype"], r["block_b"],
                                       r["num_warps"])
    return rows


def write_reports(rows: list[dict], traffic_table: list[dict], out: Path,
                  meta: dict[str, object]) -> None:
    """reports/triton_compile.csv (one row per compile), .json (rows, traffic, versions)
    and .md (summary per kernel, tile and dtype; traffic model)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "triton_compile.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "triton_compile.json").write_text(json.dumps(
        {"meta": meta, "compiles": rows, "traffic": traffic_table}, indent=1) + "\n")
    (out / "triton_compile.md").write_text(markdown(rows, traffic_table, meta))


def markdown(rows: list[dict], traffic_table: list[dict], meta: dict[str, object]) -> str:
    """The summary tables of the report."""
    lines = [
        "# Triton butterfly: compile report and traffic model (no GPU)",
        "",
        f"Generated by `{meta['command']}` with Triton {meta['triton']} and ptxas "
        f"{meta['ptxas']} (bundled with Triton), on a CPU-only machine: nothing here ran "
        "on a GPU. Kernels compiled with untied twiddles, increasing stride, 16-aligned "
        "pointers; one row per tuner config in `triton_compile.csv`.",
        "",
        f"{meta['reused_rows']} of the rows were kept from an earlier run (`--reuse`) over the "
        f"same kernels.py (sha256 {str(meta['kernels_sha256'])[:12]}).",
        "",
        f"{meta['ok']} compiles ok, {meta['skipped']} skipped, {meta['error']} errors; "
        f"{meta['spilling']} spill, {meta['spilling_pickable']} of them pickable by the tuner.",
        "",
        "## Registers, spills and occupancy per config",
        "",
        "regs / spill bytes (stores+loads) / blocks per SM / warp occupancy; `x` marks a "
        "config no launch uses (the tuner prunes it: it spills, or it is under a quarter of the "
        "heaviest kept config's load; or a complex backward tile the plan splits).",
        "",
        "| kernel | tile | dtype | BLOCK_B x warps | sm_90a | sm_80 | shared (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (r["kind"], r["n_tile"], r["c_log"], r["lob"], r["dtype"], r["block_b"],
               r["num_warps"])
        by_key.setdefault(key, {})[r["arch"]] = r
    for key in sorted(by_key, key=lambda k: (k[0] == "bwd", k[1], k[2], DTYPES.index(k[4]), k[5],
                                             k[6])):
        kind, nt, c_log, lob, dtype, bb, w = key
        cells, shared = [], ""
        for arch in (90, 80):
            r = by_key[key].get(arch)
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
                continue
            spill = r["spill_stores"] + r["spill_loads"]
            mark = "" if r["tuner_may_pick"] else " x"
            cells.append(f"{r['registers']} / {spill} / {r['blocks_per_sm']} / "
                         f"{r['occupancy']:.2f}{mark}")
            shared = str(r["shared"])
        tile = f"2^{c_log}" + (f" x {lob}" if lob > 1 else "")
        lines.append(f"| {kind} | {tile} | {dtype} | {bb} x {w} | {cells[0]} | {cells[1]} | "
                     f"{shared} |")
    lines += [
        "",
        "## Traffic model (DRAM bytes per call against the floor)",
        "",
        "Forward floor 2 b n s (read x, write y); backward floor 3 b n s (read x and grad y, "
        "write grad x); s = 4 (fp32), 2 (bf16), 8 (complex64). Untied twiddles (fp32 planes, "
        "read once per launch), 132 SMs (H100 SXM) for the backward's partials. copy = the "
        "predicted fraction of copy bandwidth (floor / bytes) if the kernel streams at copy "
        "speed. Goal: forward <= 1.1x the floor (fp32), <= 1.3x (complex), n <= 4096.",
        "",
        "| batch | n | dtype | fwd x floor | fwd copy | bwd x floor | bwd copy | bwd partials MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tr = {(t["batch"], t["n"], t["dtype"], t["kind"]): t for t in traffic_table}
    for batch, n, dtype in sorted({(t["batch"], t["n"], t["dtype"]) for t in traffic_table},
                                  key=lambda k: (k[0], k[1], DTYPES.index(k[2]))):
        f, b = tr[(batch, n, dtype, "fwd")], tr[(batch, n, dtype, "bwd")]
        lines.append(f"| {batch} | {n} | {dtype} | {f['ratio']:.3f} | {f['copy_fraction']:.2f} | "
                     f"{b['ratio']:.3f} | {b['copy_fraction']:.2f} | {b['partials'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--quick", action="store_true", help="sm_90a only, n <= 1024")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--reuse", type=Path, help="a previous triton_compile.json: keep its rows "
                    "when kernels.py is unchanged (its sha256 matches)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cases = [Case(**c) for c in json.loads(sys.stdin.read())]
        print(json.dumps(_child(cases)))
        return 0
    sizes, archs = (SIZES[:5], (90,)) if args.quick else (SIZES, (90, 80))
    t0 = time.perf_counter()
    from kernels.triton import function as f

    # fixpoint: prune what spills, compile the configs that take their place, repeat
    rows: dict[Case, dict] = {}
    if args.reuse:  # rows of an earlier run on the same kernel source
        old = json.loads(args.reuse.read_text())
        if old.get("meta", {}).get("kernels_sha256") == kernels_sha256():
            for row in old["compiles"]:
                if row["status"] == "ok":
                    rows[Case(**{k: row[k] for k in Case.__dataclass_fields__})] = row
    reused = len(rows)
    while True:
        todo = [c for c in all_cases(sizes, archs) if c not in rows]
        if not todo:
            break
        for row in compile_cases(todo, jobs=args.jobs):
            rows[Case(**{k: row[k] for k in Case.__dataclass_fields__})] = row
        f.SPILLS = frozenset(f.SPILLS | spill_set(list(rows.values())))
    if not args.quick:
        write_spills(f.SPILLS, Path(__file__).with_name("spills.py"))
    table = annotate(list(rows.values()))
    status = [r["status"] for r in table]
    spilling = [r for r in table if r.get("spills")]
    meta = {**versions(), "command": "python -m kernels.triton.report" + (" --quick" * args.quick),
            "ok": status.count("ok"), "skipped": status.count("skipped"),
            "error": status.count("error"), "spilling": len(spilling),
            "spilling_pickable": sum(r["tuner_may_pick"] for r in spilling),
            "seconds": round(time.perf_counter() - t0, 1), "reused_rows": reused,
            "kernels_sha256": kernels_sha256()}
    write_reports(table, traffic_rows(), args.out, meta)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
