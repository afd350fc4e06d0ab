"""The one place that talks to MLflow: one experiment per stage, a parent run per call.

Usage::

    configure(Path("."))                      # sqlite:///<abs>/mlflow.db unless the env says
    with stage_run("recover", "recover-quick", params, {"commit": c}) as run:
        run.child("dft-n8-bp", params={...}, metrics={"rmse": 1e-4}, tags={})

MLflow 3 entities: a child run can take dataset inputs (`DatasetRef`: name, digest = the data
checksum, source) and logged models (`models=`, one nn.Module each, whose metrics are linked
to the model and the dataset so that the UI's Models tab can rank them);
`StageRun.log_factors_model` logs a learned-factors file (kernels.save_factors) the same way.

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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput
    from torch import nn

MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_DIGEST = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
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


@dataclass(frozen=True)
class DatasetRef:
    """A run's dataset input as MLflow 3 shows it: name, digest, source, context.

    checksum: the data's full hex digest (e.g. the archive's sha256); MLflow stores at most
    36 characters as the digest, so the full value also goes into the input's "checksum" tag.
    source: a local path or an http(s) URL. profile: small JSON-able facts (counts, splits).
    """

    name: str
    checksum: str
    source: str
    context: str = "training"
    profile: Mapping[str, Any] | None = None

    @property
    def digest(self) -> str:
        return self.checksum[:MAX_DIGEST]

    def entity(self) -> DatasetInput:
        """The mlflow.entities.DatasetInput to pass to MlflowClient.log_inputs."""
        import json

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": local path
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(self.source)
        ds = MetaDataset(source, name=self.name, digest=self.digest)
        e = ds._to_mlflow_entity()  # what mlflow.log_input logs
        profile = None if self.profile is None else json.dumps(dict(self.profile), sort_keys=True)
        entity = Dataset(e.name, e.digest, e.source_type, e.source, e.schema, profile)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, self.context), InputTag("checksum", self.checksum)]
        return DatasetInput(entity, tags)


def _signature(io_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None) -> Any:
    """A float32 tensor-in, tensor-out ModelSignature (-1 = any batch), or None."""
    if io_shapes is None:
        return None
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    x, y = (Schema([TensorSpec(np.dtype("float32"), shape)]) for shape in io_shapes)
    return ModelSignature(inputs=x, outputs=y)


@contextmanager
def _no_pickle_warning() -> Iterator[None]:
    """mlflow.pytorch warns on every pickled model; the suite pickles on purpose (its layers
    call compiled code that torch.export cannot trace)."""
    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class StageRun:
    """A live parent run: log to it, and add one finished child run per measured cell."""

    def __init__(
        self, client: MlflowClient, experiment_id: str, run_id: str, tags: dict[str, str]
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self._tags = tags
        self.model_ids: dict[str, str] = {}  # logged model name -> MLflow model id

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

    def log_dataset(self, run_id: str, dataset: DatasetRef) -> None:
        """Log a dataset input (name, digest, source, context) on a run."""
        self.client.log_inputs(run_id, datasets=[dataset.entity()])

    def log_model(
        self,
        run_id: str,
        name: str,
        model: nn.Module,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        io_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
        extra_files: Sequence[str | os.PathLike[str]] = (),
    ) -> str:
        """Log `model` as an MLflow 3 logged model of this experiment, produced by run_id.

        The module is pickled (mlflow.pytorch, `serialization_format="pickle"`): load it with
        `mlflow.pytorch.load_model("models:/<model_id>")` where the suite is installed. Returns
        the model id; the model ends READY, or FAILED if saving raised.
        """
        import mlflow.pytorch
        import torch

        model_tags = {**self._tags, **to_tags(tags or {})}
        model_tags = {k: v for k, v in model_tags.items() if not k.startswith("mlflow.")}
        logged = self.client.create_logged_model(
            self.experiment_id,
            name=_key(name),
            source_run_id=run_id,
            tags=model_tags,
            params=to_params(params or {}),
            model_type=model_type,
        )
        status = "FAILED"
        try:
            with _no_pickle_warning():
                mlflow.pytorch.log_model(
                    model,
                    name=_key(name),
                    run_id=run_id,
                    model_id=logged.model_id,
                    serialization_format="pickle",
                    signature=_signature(io_shapes),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    extra_files=[str(f) for f in extra_files] or None,
                )
            status = "READY"
        finally:
            self.client.finalize_logged_model(logged.model_id, status)
        return logged.model_id

    def log_model_metrics(
        self,
        run_id: str,
        model_id: str,
        metrics: Mapping[str, Any],
        dataset: DatasetRef | None = None,
    ) -> None:
        """Log metrics on run_id linked to a logged model (and the dataset they were measured
        on): the UI's Models tab shows and sorts by them. Keys the model already has (MLflow
        copies a run's step-0 metrics onto a model logged after them) are skipped."""
        from mlflow.entities import Metric

        have = {m.key for m in self.client.get_logged_model(model_id).metrics or []}
        metrics = {k: v for k, v in to_metrics(metrics).items() if k not in have}
        now = int(time.time() * 1000)
        where = {} if dataset is None else {"dataset_name": dataset.name,
                                            "dataset_digest": dataset.digest}  # fmt: skip
        ms = [Metric(k, v, now, 0, model_id=model_id, **where)
              for k, v in to_metrics(metrics).items()]  # fmt: skip
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i : i + 1000], synchronous=True)

    def log_factors_model(
        self,
        run_id: str,
        name: str,
        factors: str | os.PathLike[str],
        *,
        metrics: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Log a learned-factors file (kernels.save_factors) as a logged model of run_id.

        The model is the module kernels.load_factors rebuilds (y = model(x) for x of shape
        (batch, n)); the original file rides along as an extra file. metrics (e.g. rmse) are
        linked to the model. Returns the model id.
        """
        from kernels import load_factors

        module = load_factors(factors)
        model_id = self.log_model(
            run_id, name, module, params=params, tags=tags, model_type="butterfly-factors",
            extra_files=[factors],
        )  # fmt: skip
        if metrics:
            self.log_model_metrics(run_id, model_id, metrics)
        return model_id

    def child(
        self,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        tags: Mapping[str, Any],
        artifacts: Sequence[str | os.PathLike[str]] = (),
        history: Sequence[Mapping[str, Any]] = (),
        *,
        datasets: Sequence[DatasetRef] = (),
        models: Mapping[str, nn.Module] | None = None,
        model_type: str | None = None,
        io_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> str:
        """Create a nested run, log everything, end it FINISHED; return its run id.

        The child inherits the parent's tags (commit, profile, device...); tags override them.
        history: per-step metrics (a learning curve), one mapping per step with a "step" key.
        datasets: dataset inputs of the run. models: name -> module, each logged as an MLflow 3
        logged model with the run's params and tags; the metrics are then linked to each model
        and to the first dataset. The ids are in `self.model_ids[name]`.
        """
        all_tags = {**self._tags, **to_tags(tags), "mlflow.parentRunId": self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        status = "FAILED"
        try:
            self._log(run_id, params=params)
            for ds in datasets:
                self.log_dataset(run_id, ds)
            ids = [
                self.log_model(run_id, model_name, module, params=params, tags=tags,
                               model_type=model_type, io_shapes=io_shapes)
                for model_name, module in (models or {}).items()
            ]  # fmt: skip
            self.model_ids.update(zip(models or {}, ids, strict=True))
            if ids:
                for model_id in ids:
                    self.log_model_metrics(run_id, model_id, metrics, next(iter(datasets), None))
            else:
                self._log(run_id, metrics=metrics)
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
    *(
        "DatasetRef",
        "StageRun",
        "TrackingUnavailable",
        "artifact_root",
        "configure",
        "flatten",
        "owner_tags",
    ),
    *("reap_stale_runs", "stage_run", "store_uri", "to_params", "to_metrics", "to_tags"),
]


def speed_runs(stage: str = "speed") -> list[dict[str, Any]]:
    """The speed cells of every device on the tracking store, for `suite compare`.

    Per device (the parent run's `device` tag), the newest finished parent run; of it, every
    child run as {"tags": its tags, "history": {metric: {n: value}}} (`suite speed` logs each
    metric over step = n). Call `configure` first: an unreachable server is a one-line error.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(stage)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
            order_by=["attributes.start_time DESC"], page_token=token,
        )  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            break
    newest: dict[str, str] = {}  # device -> parent run id (runs come newest first)
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags and tags.get("device"):
            newest.setdefault(tags["device"], run.info.run_id)
    chosen = set(newest.values())
    out = []
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") not in chosen:
            continue
        history = {
            key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics
        }
        out.append({"tags": dict(run.data.tags), "history": history})
    return out
