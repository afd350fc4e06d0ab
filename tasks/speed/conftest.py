"""pytest hooks of the speed benchmark: machine facts, recorded skips, measured copy bandwidth.

- machine_info gains the CPU model, threads, GPU name, driver, CUDA, torch and Triton versions,
  the device slug, and the machine's copy bandwidth, measured once per session (a large torch
  copy on one CPU thread, or a device-to-device copy timed with CUDA events).
- pytest-benchmark leaves skipped tests out of its JSON; a skip here is a result ("needs a
  GPU", "out of memory"), so every skip of a speed case is kept with its reason: in the JSON's
  "skipped" array, and in the file $SUITE_SPEED_SKIPS names (written even when nothing ran).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from typing import Any

import pytest
import torch

from tasks.speed.cases import SKIPS_ENV, Case, load_grid

_SKIPS = pytest.StashKey[dict[str, dict[str, Any]]]()
_MACHINE = pytest.StashKey[dict[str, Any]]()
COPY_REPEATS = 5


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SKIPS] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("case")
    if report.skipped and isinstance(case, Case):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        item.config.stash[_SKIPS][item.nodeid] = {
            "provider": params.get("provider"),
            "device": case.device,
            "n": case.n,
            "batch": case.batch,
            "dtype": case.dtype,
            "direction": case.direction,
            "reason": reason.removeprefix("Skipped: "),
            "nodeid": item.nodeid,
        }
    return report


def recorded_skips(config: pytest.Config) -> list[dict[str, Any]]:
    """The skips of this session, in the order they happened."""
    return list(config.stash.get(_SKIPS, {}).values())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(SKIPS_ENV)
    if path:  # a scratch file of `suite speed`, read back right after this process ends
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(recorded_skips(session.config), fh)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a large copy (read + write bytes over time): best of COPY_REPEATS."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and allocation are not bandwidth
    if device == "cuda":
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(COPY_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the paper's setting; the figure is one thread
        try:
            best = float("inf")
            for _ in range(COPY_REPEATS):
                t0 = time.perf_counter()
                dst.copy_(src)
                best = min(best, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
    return 2 * src.numel() * 4 / best / 1e9


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def speed_machine_info(config: pytest.Config, brand: str | None = None) -> dict[str, Any]:
    """The facts a speed number needs; the harness's fingerprint (grid.machine) wins.

    brand: pytest-benchmark's own CPU name (py-cpuinfo), the fallback for a plain pytest run.
    """
    if _MACHINE in config.stash:
        return config.stash[_MACHINE]
    grid = load_grid()
    known = grid.machine
    cuda = torch.cuda.is_available()
    nbytes = grid.params.copy_mb * 2**20
    info = {
        "cpu_model": known.get("cpu") or brand or platform.processor() or platform.machine(),
        "threads": grid.params.threads,
        "cpu_count": os.cpu_count(),
        "gpu_name": known.get("gpu") or (torch.cuda.get_device_name(0) if cuda else None),
        "gpu_driver": known.get("driver"),
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "device": grid.device,
        "device_slug": known.get("device_slug"),
        "env_id": known.get("env_id"),
        "commit": known.get("commit"),
        "copy_bytes": nbytes,
        "copy_method": "device-to-device copy, CUDA events"
        if grid.device == "cuda"
        else "torch copy_, one thread",
        "copy_bandwidth_gb_s": copy_bandwidth(grid.device, nbytes),
    }
    config.stash[_MACHINE] = info
    return info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    cpu = machine_info.get("cpu")
    brand = cpu.get("brand_raw") if isinstance(cpu, dict) else None
    machine_info.update(speed_machine_info(config, brand))


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    output_json["skipped"] = recorded_skips(config)
    grid = load_grid()
    output_json["grid"] = {"device": grid.device, "source": grid.source}
