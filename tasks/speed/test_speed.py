"""The speed benchmark: one test, parametrised by providers x cases (see cases.py, providers.py).

Each case first checks the provider against a float64 oracle (a wrong kernel fails here), then
times it. With --benchmark-disable (the default in pyproject, i.e. CI) it still runs the check
and calls the timed function once. Cases that cannot run (no GPU, missing module, n above the
profile's cap, not enough memory, an out-of-memory error) are skipped with a reason that the
conftest records.

CPU: pytest-benchmark's own calibration and timer, torch on `threads` threads. GPU: every round
starts from a cold L2 (a `setup` that writes l2_flush_mb, then synchronises) and the timed call
ends with torch.cuda.synchronize(), so a round is the wall time of one complete call.
"""

from __future__ import annotations

import gc
import math
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tasks.speed.cases import Case, SpeedParams, load_grid
from tasks.speed.checks import Built
from tasks.speed.providers import PROVIDERS, Provider, is_oom, items, skip_reason

GRID = load_grid()
MAX_GPU_ROUNDS = 1000  # each round also pays an L2 flush: bound the time of tiny cases


@pytest.fixture(scope="module")
def l2_flush() -> Iterator[torch.Tensor | None]:
    """The run's thread count, and on a GPU the buffer that evicts L2 between rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(GRID.params.threads)
    flush = None
    if GRID.device == "cuda" and torch.cuda.is_available():
        flush = torch.empty(GRID.params.l2_flush_mb * 2**20 // 4, dtype=torch.int32, device="cuda")
    try:
        yield flush
    finally:
        torch.set_num_threads(threads)  # CI runs other tests in this process afterwards


def _extra_info(prov: Provider, case: Case, built: Built, params: SpeedParams) -> dict[str, Any]:
    return {
        "provider": prov.name,
        "device": case.device,
        "n": case.n,
        "batch": case.batch,
        "dtype": case.dtype,
        "direction": case.direction,
        "bytes": prov.bytes_for(case),
        "flops": prov.flops_for(case),
        "threads": params.threads if case.device == "cpu" else torch.get_num_threads(),
        "case": case.id,
        **({"note": prov.note} if prov.note else {}),
        **built.info,
    }


def _time_cuda(
    benchmark: Any, fn: Callable[[], object], flush: torch.Tensor, params: SpeedParams
) -> dict[str, Any]:
    """Cold-L2 rounds of one synchronised call each; rounds = max_time / a call's time."""

    def timed() -> None:
        fn()
        torch.cuda.synchronize()

    def setup() -> None:
        flush.zero_()
        torch.cuda.synchronize()

    if not benchmark.enabled:
        benchmark.pedantic(timed, setup=setup, rounds=1)
        return {}
    samples = []
    for _ in range(max(params.gpu_warmup_rounds, 3)):  # warm-up; the last ones estimate a call
        setup()
        t0 = time.perf_counter()
        timed()
        samples.append(time.perf_counter() - t0)
    est = sorted(samples[-3:])[1]
    rounds = min(MAX_GPU_ROUNDS, max(params.min_rounds, math.ceil(params.max_time / est)))
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1)
    return {"gpu_rounds": rounds, "l2_flush_mb": params.l2_flush_mb}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.mark.parametrize(
    ("provider", "case"), [pytest.param(p, c, id=f"{p}-{c.id}") for p, c in items(GRID)]
)
def test_speed(benchmark: Any, l2_flush: torch.Tensor | None, provider: str, case: Case) -> None:
    prov, params = PROVIDERS[provider], GRID.params
    reason = skip_reason(prov, case, params)
    if reason:
        pytest.skip(reason)
    device = torch.device(case.device)
    seed = params.seed + zlib.crc32(f"{provider}-{case.id}".encode())
    gen = torch.Generator(device=device).manual_seed(seed)
    oom = None
    try:
        built = prov.factory(
            case.n, case.batch, case.torch_dtype, device, case.direction, gen,
            check_rows=params.check_rows,
        )  # fmt: skip
        with built.context():
            built.check()  # correctness first: a wrong kernel fails before it is timed
            benchmark.extra_info.update(_extra_info(prov, case, built, params))
            if case.device == "cuda":
                assert l2_flush is not None
                benchmark.extra_info.update(_time_cuda(benchmark, built.fn, l2_flush, params))
            else:
                benchmark(built.fn)
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom = str(exc).strip().splitlines()[0][:200]
    if oom is not None:
        built = None  # type: ignore[assignment]
        _free()
        pytest.skip(f"out of memory: {oom}")
