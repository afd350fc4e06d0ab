"""Tests for suite.environment: slugs, env_id stability, fingerprint keys."""

from __future__ import annotations

import re

import pytest

from suite import environment
from suite.environment import device_slug, env_id, fingerprint, slugify


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "intel-xeon-platinum-8375c"),
        ("Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", "intel-core-i7-8700k"),
        ("Intel(R) Xeon(R) Processor", "intel-xeon-processor"),
        ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763"),
        ("AMD Ryzen 9 5950X 16-Core Processor", "amd-ryzen-9-5950x"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb"),
        ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("  weird__name (TM)  ", "weird-name"),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_cpu_device_slug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        environment, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    )
    assert device_slug("cpu") == "cpu-intel-xeon-platinum-8375c"


def test_device_slug_is_clean() -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", device_slug())


def test_fingerprint_keys() -> None:
    fp = fingerprint()
    keys = {
        "commit",
        "git_dirty",
        "python",
        "torch",
        "triton",
        "numpy",
        "optuna",
        "mlflow",
        "dvc",
        "pandas",
        "os",
        "cpu",
        "cpu_count",
        "torch_threads",
        "gpu",
        "cuda",
        "driver",
        "device",
        "env_id",
    }
    assert keys <= fp.keys()
    assert isinstance(fp["git_dirty"], bool)
    assert re.fullmatch(r"[0-9a-f]{12}", fp["env_id"])
    assert fp["env_id"] == env_id(fp)


def test_env_id_stable_and_sensitive() -> None:
    a, b = fingerprint(), fingerprint()
    assert env_id(a) == env_id(b) == a["env_id"]
    assert env_id({**a, "git_dirty": not a["git_dirty"]}) == a["env_id"]
    assert env_id({**a, "torch": a["torch"] + "+other"}) != a["env_id"]


def test_package_version_absent() -> None:
    assert environment.package_version("no-such-package-xyz") == "absent"
