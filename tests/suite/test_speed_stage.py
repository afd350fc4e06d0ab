"""`suite speed` / `suite compare`: post-processing, hooks, recorded skips, failures, compare."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from suite import environment, speed_report, stage_speed
from suite.cli import main

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
MACHINE_KEYS = (
    "cpu_model",
    "threads",
    "gpu_name",
    "gpu_driver",
    "cuda_version",
    "torch_version",
    "triton_version",
    "device_slug",
    "copy_bandwidth_gb_s",
)
EXTRA_KEYS = (
    "provider",
    "device",
    "n",
    "batch",
    "dtype",
    "direction",
    "bytes",
    "flops",
    "threads",
    "time_ms",
    "gb_per_s",
    "fraction_of_copy_bandwidth",
    "speedup_over_dense",
    "speedup_over_fft",
)


def _bench(provider: str, n: int, median: float, dtype: str = "float32", **extra: Any) -> dict:
    info = {
        "provider": provider,
        "device": "cpu",
        "n": n,
        "batch": 1,
        "dtype": dtype,
        "direction": "forward",
        "bytes": 8.0 * n,
        "flops": 10.0 * n,
        "threads": 1,
        **extra,
    }
    return {
        "name": f"test_speed[{provider}-{n}]",
        "extra_info": info,
        "stats": {"median": median, "rounds": 5, "data": [median] * 5},
    }


def _raw(*benches: dict, bandwidth: float = 10.0) -> dict:
    return {
        "machine_info": {"copy_bandwidth_gb_s": bandwidth},
        "benchmarks": list(benches),
        "skipped": [{"nodeid": "a", "reason": "old"}],
    }


def test_postprocess_fills_derived_metrics() -> None:
    raw = _raw(
        _bench("dense_fp32", 64, 4e-6),
        _bench("butterfly_cpu", 64, 1e-6),
        _bench("fft", 64, 2e-6),
        _bench("butterfly_cpu", 128, 1e-6),
        _bench("dense_bf16", 64, 2e-6, "bfloat16"),
        _bench("butterfly_triton", 64, 1e-6, "bfloat16"),
    )
    skips = [{"nodeid": "a", "reason": "new"}, {"nodeid": "b", "reason": "needs a GPU"}]
    out = speed_report.postprocess(raw, skips, {"device_slug": "cpu-x"})
    by = {
        (b["extra_info"]["provider"], b["extra_info"]["n"]): b["extra_info"]
        for b in out["benchmarks"]
    }
    bp = by[("butterfly_cpu", 64)]
    assert bp["time_ms"] == pytest.approx(1e-3)
    assert bp["gb_per_s"] == pytest.approx(8 * 64 / 1e-6 / 1e9)
    assert bp["fraction_of_copy_bandwidth"] == pytest.approx(bp["gb_per_s"] / 10.0)
    assert bp["speedup_over_dense"] == pytest.approx(4.0)
    assert bp["speedup_over_fft"] == pytest.approx(2.0)
    assert by[("dense_fp32", 64)]["speedup_over_dense"] == pytest.approx(1.0)
    assert by[("butterfly_cpu", 128)]["speedup_over_dense"] is None  # no dense row at n=128
    assert by[("butterfly_triton", 64)]["speedup_over_dense"] == pytest.approx(2.0)  # vs bf16
    assert by[("butterfly_triton", 64)]["dense_baseline"] == "dense_bf16"
    assert all("data" not in b["stats"] for b in out["benchmarks"])
    assert {s["nodeid"]: s["reason"] for s in out["skipped"]} == {"a": "new", "b": "needs a GPU"}
    assert out["suite"]["device_slug"] == "cpu-x"
    assert raw["benchmarks"][0]["stats"]["data"]  # the input is left alone
    df = speed_report.table(out)
    assert set(speed_report.METRICS) <= set(df.columns) and len(df) == 6


def test_postprocess_without_bandwidth_gives_none() -> None:
    out = speed_report.postprocess(_raw(_bench("fft", 64, 1e-6), bandwidth=0.0), [], {})
    assert out["benchmarks"][0]["extra_info"]["fraction_of_copy_bandwidth"] is None


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real `suite speed` (tiny grid, benchmarking on) in a scratch folder, run once."""
    tmp = tmp_path_factory.mktemp("speed")
    raw = yaml.safe_load(PARAMS.read_text())
    raw["speed"].update(min_rounds=1, max_time=0.002, warmup=False, copy_mb=8)
    raw["profiles"]["smoke"]["speed"].update(
        providers=["butterfly_cpu", "dense_fp32", "fft", "butterfly_triton"], sizes=[64, 128]
    )
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.delenv("SUITE_DEBUG", raising=False)
        rc = main(["speed", "--profile", "smoke", "--device", "cpu"])
        yield {"tmp": tmp, "rc": rc}


def _report(tmp: Path) -> dict:
    return json.loads(
        (tmp / "reports/speed" / f"{environment.device_slug('cpu')}.json").read_text()
    )


def test_speed_writes_the_device_report(speed_run: dict) -> None:
    assert speed_run["rc"] == 0
    report = _report(speed_run["tmp"])
    assert len(report["benchmarks"]) == 6  # benchmarking was re-enabled over addopts
    for b in report["benchmarks"]:
        assert set(EXTRA_KEYS) <= set(b["extra_info"])
        assert b["stats"]["rounds"] >= 1 and b["extra_info"]["time_ms"] > 0
    assert set(MACHINE_KEYS) <= set(report["machine_info"])
    assert report["machine_info"]["copy_bandwidth_gb_s"] > 0
    assert report["machine_info"]["device_slug"] == environment.device_slug("cpu")
    assert (speed_run["tmp"] / "reports/figures/speed_cpu.png").stat().st_size > 1000


def test_gpu_only_provider_on_cpu_is_a_recorded_skip(speed_run: dict) -> None:
    skipped = _report(speed_run["tmp"])["skipped"]
    triton = [s for s in skipped if s["provider"] == "butterfly_triton"]
    assert all("cuda only" in s["reason"] for s in triton)
    assert {(s["n"], s["dtype"]) for s in triton} == {
        (n, d) for n in (64, 128) for d in ("float32", "bfloat16")
    }


def test_speed_logs_mlflow_runs(speed_run: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{speed_run['tmp'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("speed")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["device"] == environment.device_slug("cpu")
    assert {r.info.run_name for r in children} == {
        f"{p}-b1-float32-forward" for p in ("butterfly_cpu", "dense_fp32", "fft")
    }
    fft = next(r for r in children if r.info.run_name.startswith("fft"))
    history = client.get_metric_history(fft.info.run_id, "time_ms")
    assert sorted(m.step for m in history) == [64, 128]


def test_all_skipped_run_still_writes_its_skips(speed_run: dict) -> None:
    out = speed_run["tmp"] / "only-gpu"
    rc = main(
        [
            "speed",
            "--profile",
            "smoke",
            "--device",
            "cpu",
            "--only-providers",
            "butterfly_triton",
            "--out-dir",
            str(out),
            "--figure",
            str(out / "f.png"),
        ]
    )
    assert rc == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    assert report["benchmarks"] == [] and len(report["skipped"]) == 4


def test_failed_run_writes_nothing(
    speed_run: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = speed_run["tmp"] / "failed"
    monkeypatch.setattr(stage_speed, "run_pytest", lambda cmd, env: 1)
    rc = main(["speed", "--profile", "smoke", "--out-dir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "benchmark run failed" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists() or not list(out.glob("*.json"))


def test_unknown_provider_is_one_line_error(speed_run: dict, capsys: pytest.CaptureFixture) -> None:
    rc = main(["speed", "--profile", "smoke", "--only-providers", "butterfly_cpu,warp_drive"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "warp_drive" in err[0] and "dense_fp32" in err[0]


def _fake_report(slug: str, scale: float) -> dict:
    benches = [
        _bench(p, n, scale * t * n / 64)
        for n in (64, 128)
        for p, t in (("dense_fp32", 4e-6), ("butterfly_cpu", 1e-6), ("fft", 2e-6))
    ]
    benches.append(_bench("fft", 64, 3e-6, direction="forward_backward"))
    return speed_report.postprocess(_raw(*benches), [], {"device_slug": slug})


def test_compare_two_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    speed = tmp_path / "speed"
    speed.mkdir()
    for slug, scale in (("cpu-fake-a", 1.0), ("nvidia-fake-b", 0.1)):
        (speed / f"{slug}.json").write_text(json.dumps(_fake_report(slug, scale)))
    out, figs = tmp_path / "compare.csv", tmp_path / "figs"
    rc = main(["compare", "--speed-dir", str(speed), "--out", str(out), "--figures-dir", str(figs)])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns[:5]) == list(speed_report.KEYS)
    for slug in ("cpu-fake-a", "nvidia-fake-b"):
        assert {f"{slug}:{m}" for m in speed_report.METRICS} <= set(df.columns)
    row = df[(df.provider == "butterfly_cpu") & (df.n == 64)].iloc[0]
    assert row["cpu-fake-a:time_ms"] == pytest.approx(10 * row["nvidia-fake-b:time_ms"])
    assert row["cpu-fake-a:speedup_over_dense"] == pytest.approx(4.0)
    pngs = sorted(p.name for p in figs.glob("*.png"))
    assert pngs == [
        "speed_compare_b1_float32_forward.png",
        "speed_compare_b1_float32_forward_backward.png",
    ]


def test_compare_without_reports_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["compare", "--speed-dir", str(tmp_path / "none")]) == 2
    assert "no speed reports" in capsys.readouterr().err


def test_rows_from_mlflow_runs() -> None:
    runs = [
        {
            "tags": {
                "provider": "fft",
                "batch": "1",
                "dtype": "float32",
                "direction": "forward",
                "device": "gpu-x",
            },
            "history": {"time_ms": {64: 0.5, 128: 0.7}, "gb_per_s": {64: 1.0}},
        }
    ]
    df = speed_report.rows_from_runs(copy.deepcopy(runs))
    assert df.n.tolist() == [64, 128] and df.time_ms.tolist() == [0.5, 0.7]
    assert df.gb_per_s.isna().tolist() == [False, True]
