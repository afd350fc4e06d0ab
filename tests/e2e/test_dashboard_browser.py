"""End to end in a real browser: `suite dashboard` serves a store a reviewer can read.

Headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run) opens the
experiments list, one experiment's runs table (parent expanded) and a child run's page;
screenshots land under tmp_path (and in $SUITE_SCREENSHOT_DIR when set). Ctrl-C (SIGINT) stops
the dashboard with exit 0; a busy port and a missing store are one-line errors. Also: every
image of reports/README.md loads (the helper is in browser.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import Browser, broken_images, free_port, require_browser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")]
COMMIT = "deadbeef"
ML_VIEW = "#/experiments{}?workflowType=machine_learning"  # runs, not MLflow 3's GenAI view
# MLflow 3.17.2's UI (pinned): the assistant side panel, and the +/- button of a parent run
CLOSE_ASSISTANT = "document.querySelector('button[aria-label=Close]')?.click();"
EXPAND_PARENT = (
    "const b = document.querySelector('button[data-component-id*=runnamecellrenderer]');"
    "if (b) { b.click(); } return Boolean(b);"
)
PNG_1X1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
CELLS = {
    "recover": [
        ({"target": "dft", "n": 8, "method": "bp"}, {"rmse": 2.1e-6}),
        ({"target": "dct", "n": 8, "method": "bpbp"}, {"rmse": 3.4e-5}),
        ({"target": "dft", "n": 8, "method": "hierarchical"}, {"rmse": 1.2e-15}),
    ],
    "compress": [
        ({"method": "dense"}, {"test_accuracy": 0.512, "hidden_params": 9437184}),
        ({"method": "bp_real"}, {"test_accuracy": 0.478, "hidden_params": 36864}),
    ],
    "speed": [
        ({"provider": "torch_cpu", "n": 1024}, {"gb_per_s": 3.2}),
        ({"provider": "butterfly_cpu", "n": 1024}, {"gb_per_s": 1.7}),
    ],
}


def run_name(stage: str) -> str:
    return f"{stage}-smoke-{COMMIT}"


def _build_store(db: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Three experiments, each a parent run with children, through suite.tracking itself.

    Returns {child run name: run id}.
    """
    import mlflow

    from suite import tracking

    previous, ids = mlflow.get_tracking_uri(), {}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    try:
        tracking.configure(db.parent)
        for stage, cells in CELLS.items():
            tags = {"commit": COMMIT, "profile": "smoke", "device": "cpu-test"}
            with tracking.stage_run(stage, run_name(stage), {"profile": "smoke"}, tags) as run:
                for params, metrics in cells:
                    name = "-".join(str(v) for v in params.values())
                    ids[name] = run.child(name, params, metrics, {})
                run.log_metrics({"cells": len(cells)})
    finally:
        mlflow.set_tracking_uri(previous)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return ids


@pytest.fixture
def dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, subprocess.Popen, Path, dict[str, str]]]:
    """A running `suite dashboard` on a fresh store; yields (url, process, db, child run ids)."""
    require_browser()  # before the slow part
    db = tmp_path / "store" / "mlflow.db"
    children = _build_store(db, monkeypatch)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "suite.cli", "dashboard", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--store", f"sqlite:///{db}", "--timeout", "150"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once /health answers; EOF if it gave up
        assert "MLflow dashboard: http://" in line, proc.stderr.read()[-2000:] if not line else line
        yield line.split()[2].split("#")[0], proc, db, children
    finally:
        if proc.poll() is None:  # the test failed early: stop the server group cleanly anyway
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _api(url: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}") as resp:
        return json.loads(resp.read())


def test_dashboard_shows_experiments_and_runs(
    dashboard: tuple[str, subprocess.Popen, Path, dict[str, str]], tmp_path: Path
) -> None:
    url, proc, db, children = dashboard
    chromium, driver = require_browser()
    ids = {
        stage: _api(url, "api/2.0/mlflow/experiments/get-by-name", experiment_name=stage)[
            "experiment"
        ]["experiment_id"]
        for stage in CELLS
    }
    shot = tmp_path / "dashboard-runs.png"
    with Browser(chromium, driver, tmp_path, size=(1600, 1000)) as b:
        b.open(url + ML_VIEW.format(""))
        b.wait_for(
            "return ['recover', 'compress', 'speed']"
            ".every(n => document.body.innerText.includes(n));",
            what="the three experiment names in the list",
        )
        b.screenshot(tmp_path / "dashboard-experiments.png")
        b.open(url + ML_VIEW.format(f"/{ids['compress']}"))
        b.wait_for(
            f"return document.body.innerText.includes('{run_name('compress')}');",
            what="the compress parent run in the runs table",
        )
        b.run(CLOSE_ASSISTANT)
        assert b.run(EXPAND_PARENT), "no expand button on the parent run's row"
        b.wait_for(
            "return ['dense', 'bp_real'].every(n => document.body.innerText.includes(n));",
            what="the child runs under the expanded parent",
        )
        b.screenshot(shot)
        b.open(url + ML_VIEW.format(f"/{ids['compress']}/runs/{children['bp_real']}"))
        b.wait_for(
            "return ['test_accuracy', '0.478', 'hidden_params', '36864', 'bp_real']"
            ".every(n => document.body.innerText.includes(n));",
            what="the child run's metrics and params on its page",
        )
        b.screenshot(tmp_path / "dashboard-run.png")
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("SUITE_SCREENSHOT_DIR"):
        out = Path(os.environ["SUITE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("dashboard-*.png"):
            shutil.copy2(png, out / png.name)

    # a second dashboard on the same port: a one-line error, nothing started
    port = url.rstrip("/").rsplit(":", 1)[1]
    busy = subprocess.run(
        [sys.executable, "-m", "suite.cli", "dashboard", "--port", port, "--store", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr
    assert f"suite dashboard: error: cannot listen on 127.0.0.1:{port}" in busy.stderr

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    with pytest.raises(OSError):  # the server's whole process group is gone
        urllib.request.urlopen(url + "health", timeout=3)


def test_missing_store_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "suite.cli", "dashboard", "--store", f"sqlite:///{tmp_path}/no.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no MLflow store at" in proc.stderr


def test_broken_images_finds_the_missing_one(tmp_path: Path) -> None:
    chromium, driver = require_browser()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "ok.png").write_bytes(base64.b64decode(PNG_1X1))
    md = tmp_path / "README.md"
    md.write_text("# Report\n\n![fine](figures/ok.png)\n\n![gone](figures/missing.png)\n")
    with Browser(chromium, driver, tmp_path) as b:
        assert broken_images(md, b, tmp_path / "out") == (2, ["figures/missing.png"])


def test_report_images_render(tmp_path: Path) -> None:
    readme = REPO / "reports" / "README.md"
    if not readme.is_file():
        pytest.skip("reports/README.md not generated yet (the report stage writes it)")
    chromium, driver = require_browser()
    with Browser(chromium, driver, tmp_path) as b:
        count, broken = broken_images(readme, b, tmp_path)
    assert broken == [], f"{len(broken)} of {count} images in {readme} do not load: {broken}"
