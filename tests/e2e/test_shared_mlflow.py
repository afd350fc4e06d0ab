"""Speed runs of several machines on one MLflow server backed by PostgreSQL, side by side in
`suite compare`; an unreachable server is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import free_port  # noqa: E402
from postgres import MlflowServer  # noqa: E402

from suite import speed_report, stage_speed, tracking  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "reports" / "speed" / "cpu-intel-xeon-processor.json"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")]


def _log_speed_run(slug: str, scale: float) -> None:
    """What `suite speed` logs on machine `slug`: a parent run and one child per cell family,
    each metric over step = n (times scaled, as a faster or slower device)."""
    report = json.loads(LOCAL.read_text())
    df = speed_report.table(report, slug)
    df["time_ms"] = df.time_ms * scale
    tags = {"device": slug, "stage": "speed", "profile": "quick", "commit": "deadbeef"}
    with tracking.stage_run("speed", f"speed-{slug}", {"profile": "quick"}, tags) as run:
        stage_speed._children(run, df, slug)


def _compare(tmp: Path, speed_dir: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "suite.cli", "compare", "--speed-dir", str(speed_dir),
           "--out", str(tmp / "compare.csv"), "--figures-dir", str(tmp / "figs")]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def test_compare_reads_devices_from_the_shared_server(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    try:
        tracking.configure(tmp_path)
        for slug, scale in (("nvidia-fake-h100", 0.05), ("nvidia-fake-a100", 0.1)):
            _log_speed_run(slug, scale)
    finally:
        mlflow.set_tracking_uri(previous)
    local = tmp_path / "speed"
    local.mkdir()
    (local / LOCAL.name).write_text(LOCAL.read_text())  # this machine's file
    proc = _compare(tmp_path, local, mlflow_server.url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "compare.csv")
    devices = {c.split(":")[0] for c in df.columns if ":" in c}
    assert devices == {"nvidia-fake-h100", "nvidia-fake-a100", LOCAL.stem}
    row = df[(df.provider == "butterfly_cpu") & (df.batch == 1)].dropna().iloc[0]
    assert row["nvidia-fake-a100:time_ms"] == pytest.approx(2 * row["nvidia-fake-h100:time_ms"])
    assert row[f"{LOCAL.stem}:time_ms"] == pytest.approx(20 * row["nvidia-fake-h100:time_ms"])


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    proc = _compare(tmp_path, REPO / "reports" / "speed", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not answer" in lines[0], proc.stderr
