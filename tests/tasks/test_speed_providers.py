"""tasks/speed: providers build, pass their float64 checks, and a wrong kernel fails; the grid."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from suite import params
from tasks.speed import cases, checks, providers
from tasks.speed.cases import Case, Grid, SpeedParams
from tasks.speed.providers import PROVIDERS, skip_reason

PARAMS_YAML = Path(__file__).resolve().parents[2] / "params.yaml"
CPU_RUNS = [
    (name, direction)
    for name, prov in PROVIDERS.items()
    if "cpu" in prov.devices and prov.unavailable() is None
    for direction in prov.directions
]


def _build(name: str, direction: str, n: int = 64, batch: int = 3) -> providers.Built:
    gen = torch.Generator().manual_seed(0)
    return PROVIDERS[name].factory(
        n, batch, torch.float32, torch.device("cpu"), direction, gen, check_rows=2
    )


@pytest.mark.parametrize(("name", "direction"), CPU_RUNS)
def test_cpu_provider_passes_its_check(name: str, direction: str) -> None:
    built = _build(name, direction)
    with built.context():
        built.check()
        out = built.fn()
    y = out[0] if direction == "forward_backward" else out
    assert isinstance(y, torch.Tensor) and y.shape[0] == 3


def test_registry_entries_are_well_formed() -> None:
    for prov in PROVIDERS.values():
        assert set(prov.devices) <= set(cases.DEVICES)
        assert set(prov.directions) <= set(cases.DIRECTIONS)
        assert set(prov.dtypes) <= set(cases.DTYPES)
        for direction in prov.directions:
            case = Case(prov.devices[0], 1024, 256, prov.dtypes[0], direction)
            assert prov.flops_for(case) > 0 and prov.bytes_for(case) > 0
    fb = Case("cpu", 1024, 256, "float32", "forward_backward")
    assert PROVIDERS["dense_fp32"].flops_for(fb) == 3 * 2.0 * 256 * 1024**2
    # the butterfly floor of docs/protocol.md section 6: read x, write y (+ small twiddles)
    fwd = Case("cuda", 1024, 16384, "float32", "forward")
    assert PROVIDERS["butterfly_triton"].bytes_for(fwd) == pytest.approx(
        2 * 16384 * 1024 * 4, rel=0.01
    )


def test_wrong_forward_fails_the_check() -> None:
    x = torch.randn(4, 16)
    w = torch.randn(16, 16)
    bad = lambda x, w: x @ w  # noqa: E731  forgot the transpose
    built = checks.autograd_case(
        bad, lambda x, w: x @ w.t(), x, [w], "forward", torch.Generator(), (1e-5, 1e-5, 1e-5)
    )
    with pytest.raises(AssertionError, match="output: relative error"):
        built.check()


def test_wrong_gradient_fails_the_check() -> None:
    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(x)

        @staticmethod
        def backward(ctx, gy: torch.Tensor) -> torch.Tensor:
            return torch.zeros(gy.shape[0], 2 * (gy.shape[1] - 1))

    built = checks.numpy_case(
        NoGrad.apply,
        torch.randn(4, 16),
        "forward_backward",
        torch.Generator(),
        np.fft.rfft,
        lambda gy: checks.rfft_grad(gy, 16),
        1e-5,
    )
    with pytest.raises(AssertionError, match="grad x"):
        built.check()


def test_gradient_oracles_match_torch_float64() -> None:
    n = 16
    x = torch.randn(3, n, dtype=torch.complex128, requires_grad=True)
    gy = torch.randn(3, n, dtype=torch.complex128)
    (g,) = torch.autograd.grad(torch.fft.fft(x), x, gy)
    assert np.allclose(g.numpy(), checks.fft_grad(gy.numpy()))
    xr = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    gh = torch.randn(3, n // 2 + 1, dtype=torch.complex128)
    (gr,) = torch.autograd.grad(torch.fft.rfft(xr), xr, gh)
    assert np.allclose(gr.numpy(), checks.rfft_grad(gh.numpy(), n))
    ct = checks.dct2(np.eye(n))  # row j is the transform of e_j: the rows of C^T
    gd = np.random.default_rng(0).standard_normal((3, n))
    assert np.allclose(checks.dct2_grad(gd), gd @ ct.T)  # (C^T g) per row


def test_hadamard_oracle_large_n_route(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(1).standard_normal((2, 64))
    monkeypatch.setattr(checks, "HADAMARD_MATRIX_MAX_N", 8)
    assert np.allclose(checks.hadamard(x), x @ scipy.linalg.hadamard(64))


def test_tolerance_orders() -> None:
    t32 = checks.tolerance("float32", "float32", 10, 2)
    assert (
        t32
        < checks.tolerance("tf32", "float32", 10, 2)
        < checks.tolerance("bfloat16", "float32", 10, 2)
    )
    assert t32 < checks.tolerance("float32", "float32", 14, 2) < 1e-5
    assert checks.rows_to_check(100, 4).tolist() == [0, 1, 2, 99]
    assert checks.rows_to_check(1, 64).tolist() == [0]


def test_skip_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    p = dataclasses.replace(cases.CI_PARAMS, max_n={"dense_fp32@cpu": 128})
    cpu = Case("cpu", 256, 1, "float32", "forward")
    reason = skip_reason(PROVIDERS["butterfly_triton"], cpu, p)
    assert reason and "cuda only" in reason
    assert "max_n=128" in (skip_reason(PROVIDERS["dense_fp32"], cpu, p) or "")
    ghost = dataclasses.replace(PROVIDERS["fft"], module="kernels.no_such_module")
    assert (skip_reason(ghost, cpu, p) or "").startswith("not available: ModuleNotFoundError")
    monkeypatch.setattr(providers, "available_memory", lambda device: 1e3)
    assert "GiB" in (skip_reason(PROVIDERS["fft"], cpu, p) or "")
    tri = PROVIDERS["butterfly_triton"].unavailable()
    assert tri is None or tri.startswith("not available:")


def test_is_oom() -> None:
    assert providers.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert providers.is_oom(RuntimeError("DefaultCPUAllocator: not enough memory"))
    assert not providers.is_oom(RuntimeError("shape mismatch"))
    assert not providers.is_oom(ValueError("out of memory"))


def test_items_follow_declared_dtypes_and_directions() -> None:
    got = providers.items(Grid(cases.CI_PARAMS, "cpu"))
    by = {(name, c.dtype, c.direction) for name, c in got}
    assert ("butterfly_cpu", "float32", "forward_backward") not in by  # forward only
    assert ("dense_bf16", "bfloat16", "forward") in by  # GPU-only: a recorded skip on a CPU
    assert ("fft", "bfloat16", "forward") not in by
    assert all(c.device == "cpu" and c.batch in (1, 4) for _, c in got)


def test_params_profiles_load_and_validate() -> None:
    for profile in params.PROFILES:
        _, p = params.load_stage(PARAMS_YAML, "speed", SpeedParams, profile)
        assert p.providers and p.sizes
    _, smoke = params.load_stage(PARAMS_YAML, "speed", SpeedParams, "smoke")
    assert max(smoke.sizes) <= 256 and smoke.batches["cpu"] == [1]
    _, quick = params.load_stage(PARAMS_YAML, "speed", SpeedParams, "quick")
    assert quick.threads == 1 and {64, 8192} <= set(quick.sizes)
    for bad, match in [
        (dict(providers=["nope"]), "unknown provider"),
        (dict(sizes=[100]), "powers of two"),
        (dict(max_n={"fft@tpu": 8}), "max_n key"),
        (dict(directions=["sideways"]), "unknown direction"),
    ]:
        with pytest.raises(ValueError, match=match):
            wrong = dataclasses.replace(cases.CI_PARAMS, **bad)
            wrong.validate()
            providers.check_params(wrong)  # the names, which need the provider registry


def test_grid_round_trips_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = Grid(dataclasses.replace(cases.CI_PARAMS, sizes=[8]), "cpu", {"device_slug": "x"})
    path = tmp_path / "grid.json"
    path.write_text(cases.dump_grid(grid))
    monkeypatch.setenv(cases.GRID_ENV, str(path))
    back = cases.load_grid()
    assert back.params == grid.params and back.device == "cpu" and back.machine["device_slug"]
    assert json.loads(path.read_text())["params"]["sizes"] == [8]
    monkeypatch.delenv(cases.GRID_ENV)
    assert cases.load_grid().params == cases.CI_PARAMS


TRITON_SCRIPT = """
import torch
from tasks.speed.providers import PROVIDERS
for dtype, direction in [(torch.float32, "forward_backward"), (torch.bfloat16, "forward")]:
    built = PROVIDERS["butterfly_triton"].factory(
        32, 3, dtype, torch.device("cpu"), direction, torch.Generator().manual_seed(0),
        check_rows=2)
    built.check()
    built.fn()
    assert built.info["launch_config"]["num_launches"] >= 1, built.info
print("triton provider ok")
"""


def test_triton_provider_wiring_under_the_interpreter() -> None:
    """The GPU-only provider's factory, check and launch record, on a CPU via TRITON_INTERPRET.

    Timing needs CUDA; this only proves the wiring (shapes, tolerances, gradients) so that a
    GPU run does not fail on its first case. A subprocess: the flag is read at import time.
    """
    if PROVIDERS["butterfly_triton"].unavailable():
        pytest.skip(f"butterfly_triton {PROVIDERS['butterfly_triton'].unavailable()}")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton provider ok" in proc.stdout
