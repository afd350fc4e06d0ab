"""One recovery grid spread over processes on a real PostgreSQL, as on a cluster.

`suite recover` coordinates (it opens each cell's study, runs its own worker, waits, writes);
two `suite recover-worker` processes join every cell as it opens. One worker is SIGKILLed while
it holds trials: Optuna's heartbeat fails them after the grace period and they run again
elsewhere. The same grid with the local default (a journal file, a local process pool) gives the
same numbers, so nothing changes for a single machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from postgres import MlflowServer, Postgres  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")]
CELLS = "randn:8,dft:8"  # randn first: never solved, so its whole plan runs (and is retried)
HOST = socket.gethostname()
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _params(tmp: Path, storage: str | None, workers: int) -> Path:
    """The smoke profile with a randn cell of 16 trials of 3 epochs of 200 steps (no pruning, no
    solve: every trial runs whole, so any split over workers gives the same best trial) and a
    1 s heartbeat. One trial per vectorised group: a group's batched products round by its size
    (equal to rel 1e-4, not to the bit), and a retried trial may land in a group of another size."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["recover"]["storage"] = storage
    raw["recover"]["heartbeat"] = {"interval": 1, "grace": 3, "retries": 2}
    search = raw["profiles"]["smoke"]["recover"]["search"]
    search.update(
        trials={8: 16},
        max_epochs=3,
        min_epochs=3,
        epoch_steps=200,
        patience=0,
        batch={8: 1},
        cell_seconds={8: 120},
        workers=workers,
    )
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _env(tracking: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": tracking}  # fmt: skip


def _suite(tmp: Path, *args: str, tracking: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "suite.cli", *args],
        cwd=tmp,
        env=_env(tracking or f"sqlite:///{tmp / 'mlflow.db'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _coordinate(tmp: Path, params: Path, tracking: str = "") -> subprocess.Popen:
    return _suite(
        tmp, "recover", "--params", str(params), "--profile", "smoke", "--only", CELLS,
        "--reports", str(tmp / "reports"), "--name", "grid", "--factors", str(tmp / "factors"),
        tracking=tracking,
    )  # fmt: skip


def _study(storage: str, target: str, timeout: float = 120) -> optuna.Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [
            s.study_name
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if s.study_name.startswith(f"recover/{target}/")
        ]
        if names:
            return optuna.load_study(study_name=names[0], storage=storage)
        time.sleep(0.1)
    raise AssertionError(f"no study of {target} appeared")


def _held_by(study: optuna.Study, worker: str) -> list[int]:
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.user_attrs.get("worker") == worker
    ]


def _check_once(tmp: Path, tracking: str = "") -> pd.DataFrame:
    """One table, one factors folder, one parent run and one child per row: nothing twice."""
    df = pd.read_csv(tmp / "reports" / "grid.csv")
    assert not df.duplicated(["target", "n", "method"]).any()
    assert set(df.target) == {"randn", "dft"} and len(df) == 2 * 6  # bp, discrete, 4 baselines
    assert sorted(p.name for p in (tmp / "factors").iterdir()) == [
        f"{t}-8-{m}.pt" for t in ("dft", "randn") for m in ("bp", "discrete")
    ]
    mlflow.set_tracking_uri(tracking or f"sqlite:///{tmp / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["recover"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == len(df) == len(runs) - 1
    assert len({r.info.run_name for r in children}) == len(children)
    assert all(r.info.status == "FINISHED" for r in runs)
    return df


def _row(df: pd.DataFrame, target: str) -> dict[str, Any]:
    return df[(df.target == target) & (df.method == "bp")].iloc[0].to_dict()


def test_workers_on_postgres_share_cells_and_retry_a_killed_worker(
    pg: Postgres, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Trials on PostgreSQL; the coordinator's runs on an MLflow server backed by it."""
    storage = pg.database("optuna_grid")
    params = _params(tmp_path, storage, workers=1)
    worker = ["recover-worker", "--storage", storage, "--idle", "120"]
    victim, survivor = (_suite(tmp_path, *worker, "--worker", str(k)) for k in (1, 2))
    coordinator = _coordinate(tmp_path, params, mlflow_server.url)
    try:
        randn = _study(storage, "randn")
        deadline = time.monotonic() + 120
        while not _held_by(randn, f"{HOST}/{victim.pid}"):  # kill it half-way through trials
            assert time.monotonic() < deadline and coordinator.poll() is None, "victim idle"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        out, _ = coordinator.communicate(timeout=300)
        assert coordinator.returncode == 0, out[-4000:]
    finally:
        for proc in (victim, coordinator, survivor):
            proc.kill() if proc.poll() is None else None
        log = survivor.communicate()[0]

    # every worker's trials are in the study; the dead worker's trials ran again elsewhere
    trials = randn.get_trials()
    by = {t.user_attrs.get("worker") for t in trials if t.state != optuna.trial.TrialState.WAITING}
    workers = {f"{HOST}/{p.pid}" for p in (coordinator, victim, survivor)}
    assert workers <= by, f"{by}\n{log}"
    # the trials the kill left running (failed by the heartbeat; the others told FAIL are the
    # "unused" asks past the plan): read after the run, since the victim may have asked a trial
    # and died before tagging it with its name
    killed = [
        t.number
        for t in trials
        if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("unused")
    ]
    assert killed, "the victim held no trial when killed"
    for number in killed:
        assert trials[number].user_attrs.get("worker") in (f"{HOST}/{victim.pid}", None)
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert retry.state in FINISHED and retry.user_attrs["worker"] != f"{HOST}/{victim.pid}"
    assert randn.user_attrs["state"] == "closed"
    assert not randn.get_trials(states=(optuna.trial.TrialState.RUNNING,))

    # the DFT is solved: the solve stops every worker and leaves the rest of the plan queued
    dft = _study(storage, "dft")
    assert dft.user_attrs["solved_by"] is not None and dft.user_attrs["state"] == "closed"
    states = [t.state for t in dft.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING in states

    df = _check_once(tmp_path, mlflow_server.url)
    assert bool(_row(df, "dft")["recovered"]) and not bool(_row(df, "randn")["recovered"])

    # the same grid on one machine with the local default storage: the same numbers
    local = tmp_path / "local"
    local.mkdir()
    proc = _coordinate(local, _params(local, None, workers=1))  # the smoke profile's own
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    alone = _check_once(local)
    shared, single = _row(df, "randn"), _row(alone, "randn")
    assert shared["rmse"] == pytest.approx(single["rmse"], rel=1e-6)
    assert shared["best_params"] == single["best_params"]
    assert shared["trials"] == single["trials"] + len(killed)  # the killed attempts count too
