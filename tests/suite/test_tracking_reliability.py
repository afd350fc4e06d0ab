"""suite.tracking under failure: killed processes, concurrent writers, a dead server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from suite import tracking  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

KILLED_WRITER = """
import sys, time
from pathlib import Path
from suite import tracking
tracking.configure(Path("unused"))
with tracking.stage_run("recover", "doomed", {"n": 8}, {"profile": "smoke"}) as run:
    run.child("done-cell", {"n": 8}, {"rmse": 1e-5}, {})
    run.client.create_run(  # a child caught half-way, without owner tags of its own
        run.experiment_id, run_name="half-cell", tags={"mlflow.parentRunId": run.run_id}
    )
    Path(sys.argv[1]).write_text(run.run_id)
    time.sleep(600)
"""

CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
import mlflow
from suite import tracking


def barrier(name):
    Path(f"{go}.{name}.{who}").touch()
    while not Path(f"{go}.{name}").exists():
        time.sleep(0.01)


who, go = sys.argv[1], sys.argv[2]
barrier("open")  # both open the fresh store at once: schema creation races
tracking.configure(Path("unused"))
barrier("write")  # both write at once
with tracking.stage_run("speed", f"writer-{who}", {"who": who}, {}) as run:
    for j in range(30):
        run.child(f"{who}-{j}", {"j": j}, {"value": j, "twice": 2 * j}, {"who": who})
    run.log_metrics({"cells": 30})
"""


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite store under tmp_path, shared with subprocesses through the env."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _runs(stage: str) -> list:
    return mlflow.search_runs(experiment_names=[stage], output_format="list")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_sigkilled_run_is_marked_killed_by_the_next_stage_run(store: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(ready)],
        cwd=tmp_path,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(ready, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    doomed = ready.read_text()
    tracking.configure(tmp_path)
    assert {r.info.status for r in _runs("recover")} == {"RUNNING", "FINISHED"}

    with tracking.stage_run("recover", "next", {}, {}) as run:
        pass
    runs = {r.info.run_id: r for r in _runs("recover")}
    assert all(r.info.status != "RUNNING" for r in runs.values())
    assert runs[doomed].info.status == "KILLED" and "suite.reaped" in runs[doomed].data.tags
    by_name = {r.info.run_name: r.info.status for r in runs.values()}
    assert by_name == {
        "doomed": "KILLED",
        "half-cell": "KILLED",
        "done-cell": "FINISHED",
        "next": "FINISHED",
    }
    tags = runs[run.run_id].data.tags
    assert tags["pid"] == str(os.getpid()) and tags["host"]


def test_live_and_foreign_runs_are_left_alone(store: str, tmp_path: Path) -> None:
    tracking.configure(tmp_path)
    client = mlflow.MlflowClient()
    exp = client.create_experiment("compress")
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = {**tracking.owner_tags(), "pid": str(gone.pid)}
    mine.pop("pid_start", None)
    live = client.create_run(exp, run_name="live", tags=tracking.owner_tags()).info.run_id
    foreign = client.create_run(
        exp, run_name="foreign", tags={"host": "elsewhere", "pid": str(gone.pid)}
    ).info.run_id
    untagged = client.create_run(exp, run_name="untagged").info.run_id
    dead = client.create_run(exp, run_name="dead", tags=mine).info.run_id
    assert tracking.reap_stale_runs(client, exp) == [dead]
    status = {r: client.get_run(r).info.status for r in (live, foreign, untagged, dead)}
    assert status == {live: "RUNNING", foreign: "RUNNING", untagged: "RUNNING", dead: "KILLED"}


@pytest.mark.slow
def test_two_processes_write_the_same_store_at_once(store: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = {
        who: subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, who, str(go)],
            cwd=tmp_path,
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    }
    try:
        for name in ("open", "write"):
            for who, proc in procs.items():
                _wait_for(Path(f"{go}.{name}.{who}"), proc)
            Path(f"{go}.{name}").touch()
        for proc in procs.values():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:  # a writer that failed leaves the other waiting at a barrier
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    tracking.configure(tmp_path)
    runs = _runs("speed")
    assert len(runs) == 62 and {r.info.status for r in runs} == {"FINISHED"}
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"writer-a", "writer-b"}
    for who in ("a", "b"):
        assert parents[f"writer-{who}"].data.metrics == {"cells": 30.0}
        kids = [r for r in runs if r.data.tags.get("who") == who]
        assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {
            parents[f"writer-{who}"].info.run_id
        }
        got = sorted((int(r.data.params["j"]), r.data.metrics) for r in kids)
        assert got == [(j, {"value": float(j), "twice": 2.0 * j}) for j in range(30)]
    spans = [
        [r.info.start_time for r in runs if r.data.tags.get("who") == who] for who in ("a", "b")
    ]
    assert max(min(s) for s in spans) < min(max(s) for s in spans), "the writers never overlapped"


def test_unreachable_server_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as info:
        tracking.configure(Path("unused"))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "http://127.0.0.1:9 does not answer" in message and "MLFLOW_TRACKING_URI" in message
