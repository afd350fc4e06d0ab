"""End to end: fetch-data + `dvc repro compress-report` on the smoke profile in a repo copy.

The data is a small synthetic image-folder archive (the real one is not in git), given through
CIFAR10_SOURCE exactly as a user would point at their own file.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from suite.results import COMPRESSION_COLUMNS
from suite.stage_compress import PROTOCOL_COLUMNS
from tasks.cifar10 import CLASSES

sys.path.insert(0, str(Path(__file__).parent))
from test_dvc_recover import _copy_repo  # noqa: E402

pytestmark = pytest.mark.slow
METHODS = [
    "dense",
    "lowrank_r1",
    "bp_real",
    "bpbp_complex_learned",
    "monarch",
    "dense_to_butterfly",
]


def image_folder_archive(path: Path, train: int, test: int, seed: int = 0) -> None:
    """A tar.gz of random 32x32 PNGs laid out as train/<class>/*.png, test/<class>/*.png."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train), ("test", test)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    # class-dependent brightness so that the tiny net has something to learn
                    img = rng.integers(0, 100, (32, 32, 3)) + 15 * label
                    buf = io.BytesIO()
                    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def _run(cmd: list[str], repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_dvc_repro_compress_smoke(tmp_path: Path) -> None:
    import mlflow
    import mlflow.pytorch

    repo = tmp_path / "repo"
    _copy_repo(repo)
    committed = pd.read_csv(repo / "reports" / "compression.csv")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = "smoke"
    params["compress"]["methods"] = METHODS
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)
    archive = tmp_path / "mini-cifar.tar.gz"
    image_folder_archive(archive, train=12, test=4)
    store = tmp_path / "mlflow.db"
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "CIFAR10_SOURCE": str(archive),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    _run([str(bindir / "suite"), "fetch-data"], repo, env)
    assert (repo / "data" / archive.name).is_file()
    assert (
        archive.name in (repo / "data.dvc").read_text() or "data" in (repo / "data.dvc").read_text()
    )
    proc = _run([str(bindir / "dvc"), "repro", "compress-report"], repo, env)
    # dense keeps its run; dense_to_butterfly's dense phase is that run, loaded, not retrained
    assert len(list((repo / ".suite-tmp/compress-runs/dense").glob("lr0.001-seed0-*.pt"))) == 1
    said = proc.stdout + proc.stderr
    assert "dense_to_butterfly seed=0 lr=0.001: dense phase reused" in said
    assert "dense_to_butterfly seed=0 lr=0.001 (dense phase) epoch" not in said

    prov = json.loads((repo / "reports" / "data_provenance.json").read_text())
    assert prov["source_kind"] == "image-folder" and prov["n_train"] == 120
    table = pd.read_csv(repo / "reports" / "compression.csv")
    assert set(COMPRESSION_COLUMNS) <= set(table.columns)
    # the committed rows of the other profiles stay beside the smoke run's (persist)
    others = committed[committed.profile != "smoke"]
    kept = table[table.profile != "smoke"]
    assert len(kept) == len(others) and set(kept.run_id) == set(others.run_id)
    df = table[table.profile == "smoke"]
    assert list(df.method) == METHODS and (df.seed == 0).all()
    assert (df.data_sha256 == prov["source_sha256"]).all()
    dense = df[df.method == "dense"].iloc[0]
    assert dense.hidden_params == 1024 * 1024
    assert dense.compression_factor == pytest.approx(1024**2 / (1024**2 + 10 * 1024 + 10))
    assert df.test_accuracy.between(0, 100).all() and (df.latency_hidden_b1_ms > 0).all()
    assert (df.n_val == 18).all() and (df.n_train == 102).all()  # 15% of 120 held out
    assert (repo / "reports" / "figures" / "compression.png").read_bytes()[:4] == b"\x89PNG"
    # smoke stops at its 2-epoch cap (patience 2 cannot run out first): every row is flagged,
    # and so the headline verdict is provisional, never exceeded or reproduced
    assert set(PROTOCOL_COLUMNS) <= set(df.columns)
    assert df.stopped_by.str.contains("epoch_cap").all() and df.budget_capped.all()
    assert df.still_improving.all() and (df.patience == 2).all()
    # the headline uses the best profile present (the committed quick rows outrank smoke's);
    # on smoke rows alone it is provisional, never exceeded or reproduced
    from suite.compression_report import best_profile, headline

    metrics = json.loads((repo / "reports" / "compression_metrics.json").read_text())
    best = best_profile(table)
    assert metrics["profile"] == best and "gap_points" in metrics
    md = (repo / "reports" / "compression.md").read_text()
    assert f"Measured (profile {best};" in md and "Profile `smoke`" in md
    assert headline(df)["gap_verdict"].startswith("provisional (")
    assert (repo / "outputs" / "compress" / "bp_real" / "seed0.pt").is_file()
    assert not list((repo / "outputs" / "compress").glob(".*"))  # no work folder left
    # each method's stage cost: one value for its rows, summed per profile in the report
    assert (df.stage_runs == 1).all() and (df.stage_seconds > 0).all()
    assert (df.stage_runs_reused == 1).all()  # compress-train trained them, in its pool
    assert f"Stage wall time: {df.stage_seconds.sum() / 60:.1f} min over 6 method(s)" in md
    manifest = json.loads((repo / "outputs" / "compress-train.json").read_text())
    assert manifest["profile"] == "smoke" and manifest["methods"] == METHODS
    assert (manifest["runs"], manifest["runs_reused"]) == (6, 0)
    assert manifest["lr"] == {m: 0.001 for m in METHODS}
    assert manifest["arrays_sha256"] == prov["arrays_sha256"]
    assert f"{manifest['wall_seconds'] / 60:.1f} min wall for 6 runs of 6 methods" in md
    assert metrics["train_wall_minutes"] == round(manifest["wall_seconds"] / 60, 2)
    status = _run([str(bindir / "dvc"), "status", "--with-deps", "compress-report"], repo, env)
    assert "up to date" in status.stdout, status.stdout

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["compress"], output_format="list")
    assert all(r.info.status == "FINISHED" for r in runs)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["method"] for r in children) == sorted(METHODS)
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(children[0].info.run_id, "val_accuracy")
    assert {1, 2} <= {m.step for m in curve}  # the learning curve, one point per epoch
    for child in children:  # the data as an MLflow dataset input of every training run
        (inp,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert inp.dataset.digest == prov["source_sha256"][:36]
        assert f"data/{archive.name}" in inp.dataset.source
    # one logged model per method and seed, ranked by test accuracy in the stage's experiment
    exp = client.get_experiment_by_name("compress").experiment_id
    order = [{"field_name": "metrics.test_accuracy", "ascending": False}]
    models = client.search_logged_models([exp], order_by=order)
    assert sorted(m.name for m in models) == sorted(f"{m}-seed0" for m in METHODS)
    best = df.sort_values("test_accuracy", ascending=False, kind="stable").test_accuracy.iloc[0]
    top = {x.key: x.value for x in models[0].metrics}
    assert top["test_accuracy"] == pytest.approx(best) and str(models[0].status) == "READY"
    net = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert net(torch.zeros(2, 1024)).shape == (2, 10)
