"""The cluster recipes in deploy/: valid shell and YAML that start `suite recover-worker`."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from suite.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_slurm_script_is_valid_bash_that_starts_workers() -> None:
    script = DEPLOY / "slurm-workers.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "#SBATCH --cpus-per-task=1" in text and "SLURM_ARRAY_TASK_ID" in text
    call = re.search(r"exec \.venv/bin/suite (recover-worker.*?)\n(?!\s)", text, re.S)
    assert call, "the script should exec suite recover-worker"
    words = shlex.split(call.group(1).replace("\\\n", " "))
    args = build_parser().parse_args([w if not w.startswith("$") else "1" for w in words])
    assert args.command == "recover-worker" and args.study is None  # joins every open cell


def test_kubernetes_job_runs_workers_against_the_shared_storage() -> None:
    (job,) = list(yaml.safe_load_all((DEPLOY / "k8s-workers.yaml").read_text()))
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["parallelism"] >= 2 and spec["completionMode"] == "Indexed"
    (box,) = spec["template"]["spec"]["containers"]
    assert box["command"] == ["suite", "recover-worker"]
    env = {e["name"]: e for e in box["env"]}
    assert env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert env["OMP_NUM_THREADS"]["value"] == "1"
    args = [re.sub(r"\$\((\w+)\)", "1", a) for a in box["args"]]
    parsed = build_parser().parse_args(box["command"][1:] + args)
    assert parsed.storage == "1" and parsed.idle > 0 and parsed.study is None
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["scratch"]  # node-local scratch: no shared files
