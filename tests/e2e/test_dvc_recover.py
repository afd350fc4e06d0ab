"""End to end: `dvc repro` runs the recover stage on the smoke profile in a copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from suite.results import RECOVERY_COLUMNS

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _copy_repo(dst: Path) -> None:
    """The files git would commit (tracked and untracked-but-not-ignored), nothing else."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_dvc_repro_recover_smoke(tmp_path: Path) -> None:
    import mlflow

    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = "smoke"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for d in ("reports", "outputs"):
        shutil.rmtree(repo / d, ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)
    store = tmp_path / "mlflow.db"
    proc_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    dvc = [str(Path(sys.executable).parent / "dvc")]
    proc = subprocess.run(
        [*dvc, "repro", "recover-report"],
        cwd=repo,
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    df = pd.read_csv(repo / "reports" / "recovery.csv")
    assert set(RECOVERY_COLUMNS) <= set(df.columns)
    smoke = params["profiles"]["smoke"]["recover"]["sizes"]
    methods = {params["recover"]["models"][t] for t in smoke} | set(params["recover"]["baselines"])
    methods |= {"discrete"} if params["recover"].get("discrete") is not None else set()
    assert set(df.target) == set(smoke) and set(df.method) == methods
    if "discrete" in methods:  # the DFT's permutation found level by level, in closed form
        assert df[(df.target == "dft") & (df.method == "discrete")].iloc[0].rmse < 1e-12
    dft = df[(df.target == "dft") & (df.method == "bp")].iloc[0]
    assert dft.rmse <= 1e-4 and bool(dft.recovered)  # the real training loop recovers the DFT
    hier = df[(df.target == "dft") & (df.method == "hierarchical")].iloc[0]
    assert hier.rmse < 1e-12
    assert (df.profile == "smoke").all() and df.run_id.nunique() == 1
    png = (repo / "reports" / "figures" / "recovery.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (repo / "outputs" / "recover" / "factors" / "dft-8-bp.pt").is_file()
    assert (repo / "dvc.lock").is_file()
    env = json.loads((repo / "reports" / "recovery_environment.json").read_text())
    assert env["env_id"] == df.env_id.iloc[0] and env["torch"] and env["cpu"]
    status = subprocess.run(
        [*dvc, "status", "--with-deps", "recover-report"],
        cwd=repo,
        env=proc_env,
        capture_output=True,
        text=True,
    )
    assert "up to date" in status.stdout, status.stdout
    assert (repo / "reports" / "recovery.md").read_text().count("|") > 10
    assert {"rmse_paper", "solved_by"} <= set(df.columns)
    assert (df.rmse_paper[df.target == "dft"] < df.rmse[df.target == "dft"]).all()  # complex


    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["recover"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == df.run_id.iloc[0]
    assert len(children) == len(df)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["profile"] for r in runs} == {"smoke"}
    learned = [r for r in children if r.data.params["method"] == "bp"]
    arts = mlflow.artifacts.list_artifacts(run_id=learned[0].info.run_id)
    assert any(a.path.endswith(".pt") for a in arts)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("recover").experiment_id
    models = client.search_logged_models([exp])
    assert sorted(m.name for m in models) == ["dft-n8-bp", "hadamard-n8-bp"]
    assert all(m.model_type == "butterfly-factors" for m in models)

    # a re-run of the same code and params keeps the finished cells instead of searching again
    again = subprocess.run(
        [*dvc, "repro", "-f", "recover"], cwd=repo, env=proc_env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("kept from an earlier run") == len(smoke), again.stderr[-3000:]
    assert pd.read_csv(repo / "reports" / "recovery.csv").rmse.tolist() == df.rmse.tolist()
