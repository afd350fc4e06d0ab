"""Tests for suite.tracking against a throwaway sqlite store."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from suite.tracking import (  # noqa: E402
    TrackingUnavailable,
    configure,
    stage_run,
    to_metrics,
    to_params,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite tracking store under tmp_path; the old tracking URI is restored."""
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = configure(tmp_path / "unused")
    yield uri
    mlflow.set_tracking_uri(previous)


def _runs(stage: str) -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[stage], output_format="pandas")


def test_stage_run_with_children(store: str, tmp_path: Path) -> None:
    art = tmp_path / "cell.json"
    art.write_text('{"ok": true}')
    params = {"recover": {"n": [8, 16], "lr": 0.1}, "long": "x" * 7000}
    tags = {"commit": "deadbeef", "profile": "smoke", "device": "cpu-test"}
    with stage_run("recover", "recover-smoke", params, tags) as run:
        a = run.child("dft-n8", {"n": 8}, {"rmse": 1e-5}, {"target": "dft"}, [art])
        b = run.child("dft-n16", {"n": 16}, {"rmse": 2e-5, "recovered": True}, {})
        run.log_metrics({"cells": 2})
        run.log_artifact(art)
        parent = run.run_id

    df = _runs("recover").set_index("run_id")
    assert set(df.index) == {parent, a, b}
    assert (df["status"] == "FINISHED").all()
    assert df.loc[parent, "tags.stage"] == "recover"
    assert df.loc[parent, "tags.commit"] == "deadbeef"
    assert df.loc[parent, "tags.mlflow.runName"] == "recover-smoke"
    assert df.loc[parent, "params.recover.n"] == "[8, 16]"
    assert len(df.loc[parent, "params.long"]) == 6000
    assert df.loc[parent, "metrics.cells"] == 2
    for child in (a, b):
        assert df.loc[child, "tags.mlflow.parentRunId"] == parent
        assert df.loc[child, "tags.profile"] == "smoke"
    assert df.loc[a, "params.n"] == "8" and df.loc[b, "params.n"] == "16"
    assert df.loc[a, "metrics.rmse"] == pytest.approx(1e-5)
    assert df.loc[b, "metrics.recovered"] == 1.0
    assert df.loc[a, "tags.target"] == "dft"

    client = mlflow.MlflowClient()
    assert [f.path for f in client.list_artifacts(a)] == ["cell.json"]
    assert [f.path for f in client.list_artifacts(parent)] == ["cell.json"]
    assert client.list_artifacts(b) == []
    assert str(tmp_path) in client.get_run(a).info.artifact_uri


def test_exception_marks_failed(store: str) -> None:
    with pytest.raises(ValueError, match="bad cell"):
        with stage_run("compress", "compress-smoke", {}, {}) as run:
            run.child("ok", {}, {"acc": 0.5}, {})
            raise ValueError("bad cell")
    df = _runs("compress").set_index("run_id")
    assert df.loc[run.run_id, "status"] == "FAILED"
    assert (df.drop(index=run.run_id)["status"] == "FINISHED").all()


def test_keyboard_interrupt_marks_killed(store: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        with stage_run("speed", "speed-smoke", {}, {}) as run:
            raise KeyboardInterrupt
    assert _runs("speed").set_index("run_id").loc[run.run_id, "status"] == "KILLED"


def test_closed_port_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}"):
        configure(tmp_path)
    assert time.monotonic() - start < 10


def test_default_uri_is_absolute_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        uri = configure(tmp_path / "store")
    finally:
        mlflow.set_tracking_uri(previous)
    assert uri == f"sqlite:///{(tmp_path / 'store').resolve()}/mlflow.db"


def test_value_conversion() -> None:
    assert to_params({"a": {"b": 1, "c": (1, 2)}, "d": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
    }
    assert to_metrics({"x": True, "y": None, "z": {"w": 2}}) == {"x": 1.0, "z.w": 2.0}
    with pytest.raises(TypeError, match="'m'"):
        to_metrics({"m": "high"})


def test_keys_mlflow_refuses_are_made_valid() -> None:
    from suite.tracking import to_metrics, to_params, to_tags

    assert to_params({"max_n": {"dense_fp32@cpu": 8192}}) == {"max_n.dense_fp32_cpu": "8192"}
    assert to_tags({"a@b": "x"}) == {"a_b": "x"} and to_metrics({"t/ms": 1}) == {"t/ms": 1.0}
