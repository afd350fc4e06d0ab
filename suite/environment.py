"""Hardware and software fingerprint: every number carries the machine it came from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "triton", "numpy", "optuna", "mlflow", "dvc", "pandas")
_REPO = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    """Run git in this file's repository; None outside git or on any failure."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_version(name: str) -> str:
    """Installed version of a distribution, read from metadata (never imports it)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_driver() -> str:
    """GPU driver version via nvidia-smi, or "unknown"."""
    if shutil.which("nvidia-smi") is None:
        return "unknown"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def slugify(name: str) -> str:
    """Normalise a hardware name: lowercase, [a-z0-9-], no (R)/(TM), no clock suffix."""
    s = name.lower()
    s = re.sub(r"\((r|tm|c)\)", " ", s)
    s = re.sub(r"@?\s*\b[\d.]+\s*[gm]hz\b", " ", s)
    s = re.sub(r"\b\d+-core processor\b", " ", s)
    s = re.sub(r"\bcpu\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s)
    return s.strip("-") or "unknown"


def device_slug(device: str | None = None) -> str:
    """Slug of a device: "cpu-<model>" or the CUDA device name. Default: cuda if present."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        return slugify(torch.cuda.get_device_name(dev))
    if dev.type == "cpu":
        return "cpu-" + slugify(cpu_model())
    return slugify(dev.type)


def env_id(fp: dict[str, Any]) -> str:
    """First 12 hex chars of sha256 over the canonical JSON of fp (minus volatile keys)."""
    core = {k: v for k, v in fp.items() if k not in ("env_id", "git_dirty")}
    blob = json.dumps(core, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fingerprint() -> dict[str, Any]:
    """Commit, library versions, OS, CPU and GPU (gpu/cuda/driver None without CUDA)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    fp: dict[str, Any] = {
        "commit": commit or "unknown",
        "git_dirty": bool(status),
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "os": platform.platform(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "cuda": None,
        "driver": None,
    }
    if fp["cuda_available"]:
        fp["gpu"] = torch.cuda.get_device_name(0)
        fp["cuda"] = torch.version.cuda or "unknown"
        fp["driver"] = _nvidia_driver()
    fp["device"] = device_slug()
    fp["env_id"] = env_id(fp)
    return fp


def run_tags(fp: dict[str, Any], stage: str, profile: str, **extra: Any) -> dict[str, Any]:
    """The context every MLflow run carries: commit, stage, profile, device, env_id (+ extra)."""
    base = {"commit": fp["commit"], "stage": stage, "profile": profile, "device": fp["device"]}
    return {**base, "env_id": fp["env_id"], **extra}
