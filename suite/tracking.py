"""The one place that talks to MLflow: one experiment per stage, a parent run per call.

Usage::

    configure(Path("."))                      # sqlite:///<abs>/mlflow.db unless the env says
    with stage_run("recover", "recover-quick", params, {"commit": c}) as run:
        run.child("dft-n8-bp", params={...}, metrics={"rmse": 1e-4}, tags={})

mlflow is imported lazily, so importing this module stays cheap.

Reliability (tests/suite/test_tracking_reliability.py): see reap_stale_runs and _init_sqlite.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

if TYPE_CHECKING:
    from mlflow import MlflowClient

MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
BATCH = 100  # params + tags per log_batch request
PROBE_TIMEOUT_S = 3.0
HOST_TAG, PID_TAG, START_TAG = "host", "pid", "pid_start"  # who owns a RUNNING parent run
_QUIET_LOGGERS = ("mlflow", "alembic", "alembic.runtime.migration", "sqlalchemy")


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def _quiet() -> None:
    """Silence MLflow's INFO chatter (alembic migrations, store creation)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _probe(uri: str) -> None:
    """Raise TrackingUnavailable unless an http(s) tracking server answers within 3 s."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered; a 4xx/5xx on /health still means a live server
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer ({reason}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None


def store_uri(default_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, or sqlite:///<abs default_dir>/mlflow.db (nothing is created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path(default_dir).resolve() / 'mlflow.db'}"


def configure(default_dir: Path) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or sqlite:///<default_dir>/mlflow.db; return it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _quiet()
    uri = store_uri(default_dir)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        _probe(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    _quiet()
    if uri.startswith("sqlite:///"):
        _init_sqlite(Path(uri[len("sqlite:///") :]))
    return uri


def _init_sqlite(db: Path) -> None:
    """Open (create, migrate) a sqlite store holding a lock on its folder: two processes opening
    a fresh store at once race through the migrations ("duplicate column name") otherwise.
    Afterwards MLflow's `PRAGMA busy_timeout = 20000` serialises writers: no retry is needed."""
    import fcntl  # POSIX only, as the suite

    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        MlflowClient().search_experiments(max_results=1)  # opens the store: schema + migrations
        _quiet()
    finally:
        os.close(fd)  # releases the lock


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _text(value: Any, limit: int) -> str:
    """Stringify a param/tag value (tuples as lists) and truncate to MLflow's limit."""
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: str) -> str:
    """A valid MLflow key: characters it refuses (e.g. '@' in 'dense_fp32@cpu') become '_'."""
    return re.sub(r"[^\w\-. /:]", "_", key)[:MAX_KEY]


def to_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten nested dicts with dotted keys; stringify and truncate values to 6000 chars."""
    return {_key(k): _text(v, MAX_PARAM_VAL) for k, v in flatten(params).items()}


def to_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Flatten and stringify tag values; None values are dropped."""
    return {_key(k): _text(v, MAX_TAG_VAL) for k, v in flatten(tags).items() if v is not None}


def to_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten and convert metric values to float; None is dropped, text is a TypeError."""
    out: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        if value is None:
            continue
        try:
            out[_key(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} must be a number, got {value!r}") from None
    return out


def artifact_root(uri: str) -> Path | None:
    """<dir of the db>/mlartifacts for a sqlite store (not the current directory); else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).parent.resolve() / "mlartifacts"


def _experiment_id(client: MlflowClient, stage: str) -> str:
    """Id of the experiment named stage, created (or restored) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(stage)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        root = artifact_root(client.tracking_uri)  # beside the db file, one folder per stage
        location = None if root is None else (root / stage).as_uri()
        return client.create_experiment(stage, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(stage)
        if exp is None:
            raise
        return exp.experiment_id


class StageRun:
    """A live parent run: log to it, and add one finished child run per measured cell."""

    def __init__(
        self, client: MlflowClient, experiment_id: str, run_id: str, tags: dict[str, str]
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self._tags = tags

    def _log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Log params, metrics and tags in batches of at most BATCH entities each."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in to_params(params or {}).items()]
        ts = [RunTag(k, v) for k, v in to_tags(tags or {}).items()]
        ms = [Metric(k, v, now, 0) for k, v in to_metrics(metrics or {}).items()]
        for i in range(0, max(len(ps), len(ts), len(ms)), BATCH):
            self.client.log_batch(
                run_id,
                metrics=ms[i : i + BATCH],
                params=ps[i : i + BATCH],
                tags=ts[i : i + BATCH],
                synchronous=True,
            )

    def _log_history(self, run_id: str, history: Sequence[Mapping[str, Any]]) -> None:
        """Log step-indexed metrics (e.g. loss per epoch) so MLflow draws them as curves."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [
            Metric(k, v, now, int(row["step"]))
            for row in history
            for k, v in to_metrics({k: v for k, v in row.items() if k != "step"}).items()
        ]
        for i in range(0, len(ms), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self.client.log_batch(run_id, metrics=ms[i : i + 1000], synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params on the parent run."""
        self._log(self.run_id, params=params)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Log metrics on the parent run."""
        self._log(self.run_id, metrics=metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the parent run."""
        self._log(self.run_id, tags=tags)

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        """Upload one file to the parent run's artifacts."""
        self.client.log_artifact(self.run_id, str(path))

    def child(
        self,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        tags: Mapping[str, Any],
        artifacts: Sequence[str | os.PathLike[str]] = (),
        history: Sequence[Mapping[str, Any]] = (),
    ) -> str:
        """Create a nested run, log everything, end it FINISHED; return its run id.

        The child inherits the parent's tags (commit, profile, device...); tags override them.
        history: per-step metrics (a learning curve), one mapping per step with a "step" key.
        """
        all_tags = {**self._tags, **to_tags(tags), "mlflow.parentRunId": self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        status = "FAILED"
        try:
            self._log(run_id, params=params, metrics=metrics)
            self._log_history(run_id, history)
            for path in artifacts:
                self.client.log_artifact(run_id, str(path))
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status)
        return run_id


def _started(pid: int) -> str | None:
    """Start time (clock ticks after boot) of live process pid, from /proc; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if stat[0] in ("Z", "X") else stat[19]  # a zombie is gone too


def owner_tags() -> dict[str, str]:
    """host, pid and process start time: who owns a run while it is RUNNING."""
    start = _started(os.getpid()) or ""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), START_TAG: start}


def _gone(tags: Mapping[str, str], host: str) -> bool:
    """Was the run owned by a process of this host that is no longer running?"""
    ours = tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit()
    if not ours or not Path("/proc/self/stat").exists():  # no procfs (macOS): never reap
        return False
    now = _started(int(tags[PID_TAG]))
    return now is None or now != (tags.get(START_TAG) or now)  # a recycled pid counts as gone


def reap_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose owner process on this host is gone (e.g. SIGKILL).

    Runs of other hosts or without owner tags are left alone; a RUNNING child of a reaped
    parent goes with it. Returns the reaped run ids.
    """
    runs = client.search_runs([experiment_id], "status = 'RUNNING'", max_results=50_000)
    dead = {r.info.run_id for r in runs if _gone(r.data.tags, socket.gethostname())}
    dead |= {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") in dead}
    for run_id in sorted(dead):
        client.set_tag(run_id, "suite.reaped", f"owner process gone; seen by pid {os.getpid()}")
        client.set_terminated(run_id, "KILLED")
    if dead:
        logging.getLogger(__name__).warning("marked %d stale RUNNING run(s) KILLED", len(dead))
    return sorted(dead)


def _status(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED"


@contextmanager
def stage_run(
    stage: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any]
) -> Iterator[StageRun]:
    """Parent run in experiment `stage`; FINISHED on success, FAILED on error, KILLED on ^C.

    Call configure() first. Terminated on every exit path Python sees; see reap_stale_runs.
    """
    from mlflow import MlflowClient

    _quiet()
    client = MlflowClient()
    experiment_id = _experiment_id(client, stage)
    reap_stale_runs(client, experiment_id)
    run_tags = {**to_tags(tags), "stage": stage, **owner_tags()}
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        handle = StageRun(client, experiment_id, run_id, run_tags)
        handle.log_params(params)
        yield handle
        status = "FINISHED"
    except BaseException as exc:
        status = _status(exc)
        raise
    finally:
        client.set_terminated(run_id, status)


__all__ = [
    *("StageRun", "TrackingUnavailable", "artifact_root", "configure", "flatten", "owner_tags"),
    *("reap_stale_runs", "stage_run", "store_uri", "to_params", "to_metrics", "to_tags"),
]
