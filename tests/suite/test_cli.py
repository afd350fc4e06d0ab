"""suite.cli in-process: bad input is one line on stderr and exit 2; a matrix gets factors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kernels import load_factors
from suite.cli import main
from tasks.targets import rmse, target_matrix

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as cwd, with params.yaml, a local MLflow store and one thread."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("SUITE_DEBUG", raising=False)
    return tmp_path


def _bad_case(tmp: Path, case: str) -> list[str]:
    """Write the bad input of `case` into tmp; return the `suite recover` arguments."""
    matrix = "m.npy"
    if case == "not_power_of_two":
        np.save(tmp / matrix, np.random.randn(12, 12))
    elif case == "not_square":
        np.save(tmp / matrix, np.random.randn(8, 16))
    elif case == "nan":
        a = np.random.randn(8, 8)
        a[np.random.randint(8), np.random.randint(8)] = np.nan
        np.save(tmp / matrix, a)
    elif case == "no_budget_for_n":
        np.save(tmp / matrix, np.random.randn(16, 16))  # smoke has trials for n=8 only
    elif case == "mistyped_key":
        np.save(tmp / matrix, np.random.randn(8, 8))
        raw = yaml.safe_load((tmp / "params.yaml").read_text())
        search = raw["profiles"]["smoke"]["recover"]["search"]
        search["trails"] = search.pop("trials")
        (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    elif case == "missing_matrix":
        matrix = "absent.npy"
    else:
        raise AssertionError(case)
    return ["recover", "--profile", "smoke", "--matrix", matrix, "--out", "OUT", "--model", "bp"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("not_power_of_two", ["m.npy", "power of two", "12"]),
        ("not_square", ["m.npy", "square", "(8, 16)"]),
        ("nan", ["m.npy", "NaN"]),
        ("no_budget_for_n", ["n=16", "smoke"]),
        ("mistyped_key", ["search.trails"]),
        ("missing_matrix", ["absent.npy", "not found"]),
    ],
)
def test_recover_bad_input(
    workdir: Path, capsys: pytest.CaptureFixture[str], case: str, words: list[str]
) -> None:
    argv = _bad_case(workdir, case)
    before = sorted(workdir.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("suite recover: error:")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(workdir.rglob("*")) == before  # no output folder, no scratch, no db
    assert not (workdir / "OUT").exists()


def test_env_prints_fingerprint(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert {"commit", "device", "torch"} <= fp.keys()
    assert fp["torch"] == torch.__version__
    assert fp["device"] and isinstance(fp["device"], str)


@pytest.fixture
def keep_threads():
    """The in-process trial runner sets torch's thread count; restore it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_recover_matrix_dft8(
    workdir: Path, capsys: pytest.CaptureFixture[str], keep_threads: None
) -> None:
    f = target_matrix("dft", 8)
    np.save(workdir / "dft8.npy", f.numpy())
    code = main(
        [
            *("recover", "--profile", "smoke", "--matrix", "dft8.npy", "--out", "OUT"),
            *("--model", "bp", "--method", "learned"),  # the discrete row is exact in ms here
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "OUT/result.json" in captured.out

    out = workdir / "OUT"
    assert sorted(p.name for p in out.iterdir()) == ["factors.pt", "result.json"]
    res = json.loads((out / "result.json").read_text())
    assert res["n"] == 8 and res["model"] == "bp" and res["profile"] == "smoke"
    assert res["method"] == "learned"
    assert res["complex_input"] is True
    assert res["seconds"] > 0
    assert res["rmse"] <= 1e-4 and res["recovered"] is True
    assert res["mse"] == pytest.approx(res["rmse"] ** 2, rel=1e-9)

    model = load_factors(out / "factors.pt")
    assert not model.training
    with torch.no_grad():
        # the saved factors are the ones that were scored
        assert rmse(model.matrix(), f) == pytest.approx(res["rmse"], rel=1e-2, abs=1e-6)
        x = torch.randn(32, 8, dtype=torch.complex64)
        y = model(x)
    want = x @ f.to(torch.complex64).T
    assert y.shape == (32, 8) and y.dtype == torch.complex64
    torch.testing.assert_close(y, want, atol=1e-3, rtol=0)
    # ||X (M - F)^T||_F <= ||X||_F ||M - F||_F = ||X||_F * n * rmse (plus float32 rounding)
    bound = float(torch.linalg.norm(x)) * 8 * res["rmse"] + 1e-4 * math.sqrt(x.numel())
    assert float(torch.linalg.norm(y - want)) <= bound

    # leftovers: scratch is cleaned, no staging folder next to OUT, no MLflow db written
    assert list((workdir / ".suite-tmp").iterdir()) == []
    assert not [p for p in workdir.iterdir() if p.name.startswith(".recover-")]


def test_a_named_recovery_run_keeps_its_factors_apart() -> None:
    """`suite recover --name recovery_full` must not overwrite the recover stage's DVC output."""
    from suite.stage_recover import _factors_folder

    assert _factors_folder("recovery") == "factors"
    assert _factors_folder("recovery_full") == "factors_full"
    assert _factors_folder("mine") == "factors_mine"
