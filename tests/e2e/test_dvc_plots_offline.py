"""`dvc plots show` works offline: the project's HTML template inlines vega (no CDN).

A tiny DVC repo in tmp gets the project's .dvc/config and .dvc/plots/offline.html; the page
DVC writes must name no remote script, and must draw the plot in a Chromium that can resolve
no host name at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import OFFLINE, Browser, require_browser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
DVC_YAML = """plots:
  - rmse.csv:
      x: n
      y: rmse
"""


def _tiny_repo(repo: Path) -> None:
    """git + dvc init, the project's plots config and template, one plots file."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    rows = [(8, 2.1e-6), (16, 3.0e-6), (32, 4.4e-6), (64, 9.8e-6)]
    (repo / "rmse.csv").write_text("n,rmse\n" + "".join(f"{n},{r}\n" for n, r in rows))


def test_plots_show_is_offline(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _tiny_repo(repo)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run(
        [dvc, "plots", "show", "-o", "plots_out"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = repo / "plots_out" / "index.html"
    text = page.read_text()
    assert "cdn.jsdelivr" not in text
    assert not re.search(r"<script[^>]*\bsrc\s*=", text), "a <script src=...> in the page"
    assert "vegaEmbed('#" in text and "rmse" in text  # the template was filled

    chromium, driver = require_browser()
    with Browser(chromium, driver, tmp_path, extra_args=OFFLINE) as b:
        b.open(page.as_uri())
        drawn = b.wait_for(
            "const c = document.querySelector('div[id] svg.marks, div[id] canvas.marks');"
            "return c ? c.tagName : '';",
            what="vega to draw the rmse plot",
        )
        assert drawn.lower() in ("svg", "canvas")
        assert b.run("return typeof vegaEmbed;") == "function"
        b.screenshot(tmp_path / "plots.png")
    if os.environ.get("SUITE_SCREENSHOT_DIR"):
        out = Path(os.environ["SUITE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp_path / "plots.png", out / "dvc-plots-offline.png")
