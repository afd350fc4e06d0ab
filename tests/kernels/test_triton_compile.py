"""The GPU-free compile report and traffic model of the fused Triton butterfly.

test_no_tunable_config_spills recompiles a representative subset (Triton's compiler and the
bundled ptxas, sm_90a and sm_80, a fresh cache) in a child process; a child that cannot
compile here is a skip with its reason, never a pass.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kernels.triton import report as r

REPORT = Path(__file__).resolve().parents[2] / "reports" / "triton_compile.csv"

# (kind, c_log, lob, dtype, arch): the heaviest tiles per kernel and dtype, both targets
SUBSET = [
    ("fwd", 12, 1, "fp32", 90),
    ("fwd", 12, 1, "complex64", 80),
    ("fwd", 6, 32, "bf16", 90),  # multi-pass strided tile
    ("bwd", 12, 1, "fp32", 90),
    ("bwd", 12, 1, "bf16", 80),
    ("bwd", 11, 1, "complex64", 90),  # the largest complex backward tile (see backward_geometry)
]


def _heaviest(kind: str, c_log: int, lob: int, dtype: str) -> tuple[int, int]:
    """The pickable config with the most tile values per thread (most register pressure)."""
    return max(r.tuner_configs(kind, c_log, lob, dtype), key=lambda c: (c[0] / c[1], c[1]))


def test_no_tunable_config_spills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really recompile
    cases = [r.Case(k, c, lob, d, *_heaviest(k, c, lob, d), arch) for k, c, lob, d, arch in SUBSET]
    rows = r.compile_cases(cases, timeout=110.0)
    skipped = [row for row in rows if row["status"] != "ok"]
    if skipped:
        pytest.skip(f"compile child could not run: {skipped[0].get('reason')}")
    for row in rows:
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert 0 < row["registers"] <= 255 and row["blocks_per_sm"] >= 1, row


def test_parse_ptxas_and_occupancy() -> None:
    log = ("ptxas info    : Function properties for k\n"
           "    232 bytes stack frame, 240 bytes spill stores, 372 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers\n")
    assert r.parse_ptxas(log) == dict(registers=128, stack=232, spill_stores=240,
                                      spill_loads=372)
    with pytest.raises(ValueError, match="unrecognised"):
        r.parse_ptxas("nothing")
    # 128 regs x 512 threads = the whole 64K register file: one block, 16 of 64 warps
    assert r.occupancy(128, 16384, 16, 90) == {"blocks_per_sm": 1, "occupancy": 0.25}
    # 64 regs x 128 threads: 8 blocks by registers, 32 warps of 64
    assert r.occupancy(64, 0, 4, 80) == {"blocks_per_sm": 8, "occupancy": 0.5}
    # shared memory bound: 100 KB blocks, 2 fit in sm_90's 228 KB, 1 in sm_80's 164 KB
    assert r.occupancy(32, 100 * 1024, 4, 90)["blocks_per_sm"] == 2
    assert r.occupancy(32, 100 * 1024, 4, 80)["blocks_per_sm"] == 1


def test_committed_report_covers_tuner_and_has_no_pickable_spill() -> None:
    """reports/triton_compile.csv has a row for every case of the current config space and
    no config the tuner may pick spills (regenerate: python -m kernels.triton.report)."""
    with open(REPORT) as fh:
        rows = list(csv.DictReader(fh))
    have = {(x["kind"], int(x["c_log"]), int(x["lob"]), x["dtype"], int(x["block_b"]),
             int(x["num_warps"]), int(x["arch"])) for x in rows if x["status"] == "ok"}
    want = {(c.kind, c.c_log, c.lob, c.dtype, c.block_b, c.num_warps, c.arch)
            for c in r.all_cases()}
    assert want <= have, sorted(want - have)[:5]
    for x in rows:
        pick = r.pickable(x["kind"], int(x["c_log"]), int(x["lob"]), x["dtype"],
                          int(x["block_b"]), int(x["num_warps"]))
        assert not (pick and int(x["spill_stores"] or 0) + int(x["spill_loads"] or 0) > 0), x


@pytest.mark.parametrize("n", [64, 256, 1024, 4096])
def test_traffic_goals(n: int) -> None:
    """Forward at batch 16384: <= 1.1x the floor for fp32 and bf16, <= 1.3x for complex."""
    for dtype, goal in (("fp32", 1.1), ("bf16", 1.1), ("complex64", 1.3)):
        t = r.traffic("fwd", n, dtype, 16384)
        assert t["floor"] == 2 * 16384 * n * r.ITEM[dtype]
        assert t["ratio"] <= goal, (dtype, t)


def test_traffic_counts_extra_passes() -> None:
    """Not vacuous: two passes (n = 8192) cost an intermediate write and read; the
    backward pays partials and, for complex n = 4096, its second pass."""
    assert r.traffic("fwd", 8192, "fp32", 16384)["ratio"] >= 1.99
    assert r.traffic("fwd", 4096, "fp32", 16384)["ratio"] < 1.01
    real, cplx = (r.traffic("bwd", 4096, d, 16384) for d in ("fp32", "complex64"))
    assert real["partials"] > 0 and 1.0 < real["ratio"] < 1.2
    assert cplx["ratio"] > 2 * real["ratio"] - 1
