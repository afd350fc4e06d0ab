"""MLflow 3 entities from suite.tracking: dataset inputs and logged models (throwaway store)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from suite.tracking import DatasetRef, configure, stage_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
CHECKSUM = "e8" * 32  # TEST DATA: a 64-hex sha256


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = configure(tmp_path / "unused")
    yield uri
    mlflow.set_tracking_uri(previous)


def _dataset(source: str = "data/cifar10-jpeg.tar.gz") -> DatasetRef:
    return DatasetRef("cifar10", CHECKSUM, source, profile={"n_train": 42500})


def test_dataset_input_name_digest_source_context(store: str) -> None:
    with stage_run("compress", "c", {}, {"profile": "smoke"}) as run:
        rid = run.child("dense-seed0", {"lr": 1e-3}, {"acc": 40.0}, {}, datasets=[_dataset()])
    (inp,) = mlflow.MlflowClient().get_run(rid).inputs.dataset_inputs
    assert inp.dataset.name == "cifar10" and inp.dataset.digest == CHECKSUM[:36]
    assert "data/cifar10-jpeg.tar.gz" in inp.dataset.source
    assert '"n_train": 42500' in inp.dataset.profile
    tags = {t.key: t.value for t in inp.tags}
    assert tags == {"mlflow.data.context": "training", "checksum": CHECKSUM}
    url = DatasetRef("c", CHECKSUM, "https://example.org/c.tar.gz").entity()
    assert url.dataset.source_type == "http"


def test_child_logs_models_in_the_stage_experiment_with_linked_metrics(store: str) -> None:
    client = mlflow.MlflowClient()
    nets = {}
    with stage_run("compress", "c", {}, {"profile": "smoke", "commit": "abc"}) as run:
        for seed, acc in ((0, 41.0), (1, 47.5)):  # TEST DATA
            torch.manual_seed(seed)
            nets[seed] = torch.nn.Linear(4, 3)
            run.child(
                f"m-seed{seed}", {"lr": 1e-3, "seed": seed}, {"test_accuracy": acc},
                {"method": "m"}, datasets=[_dataset()], models={f"m-seed{seed}": nets[seed]},
                model_type="hidden-layer-net", io_shapes=((-1, 4), (-1, 3)),
            )  # fmt: skip
        exp = run.experiment_id
        ids = dict(run.model_ids)
    order = [{"field_name": "metrics.test_accuracy", "ascending": False}]
    found = client.search_logged_models([exp], order_by=order)
    assert [m.name for m in found] == ["m-seed1", "m-seed0"]  # best first, as the UI sorts
    best = found[0]
    assert best.model_id == ids["m-seed1"] and str(best.status) == "READY"
    assert best.tags["method"] == "m" and best.tags["profile"] == "smoke"
    assert best.params["lr"] == "0.001" and best.model_type == "hidden-layer-net"
    (metric,) = best.metrics
    assert (metric.key, metric.value, metric.dataset_name) == ("test_accuracy", 47.5, "cifar10")
    assert metric.dataset_digest == CHECKSUM[:36]
    run_ = client.get_run(best.source_run_id)
    assert run_.data.metrics["test_accuracy"] == 47.5  # still a run metric too
    assert [o.model_id for o in run_.outputs.model_outputs] == [best.model_id]
    loaded = mlflow.pytorch.load_model(f"models:/{best.model_id}")
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), nets[1](x))


def test_log_factors_model(store: str, tmp_path: Path) -> None:
    from kernels.butterfly import ButterflyStack, save_factors

    model = ButterflyStack(8, "bp", generator=torch.Generator().manual_seed(0))
    path = tmp_path / "factors.pt"
    save_factors(model, path)
    with stage_run("recover", "r", {}, {"profile": "smoke"}) as run:
        rid = run.child("dft-n8-bp", {"n": 8}, {"rmse": 1e-6}, {"target": "dft"})
        mid = run.log_factors_model(rid, "dft-n8-bp", path, metrics={"rmse": 1e-6})
    m = mlflow.MlflowClient().get_logged_model(mid)
    assert m.source_run_id == rid and m.model_type == "butterfly-factors"
    assert [x.key for x in m.metrics] == ["rmse"]
    loaded = mlflow.pytorch.load_model(f"models:/{mid}")
    x = torch.randn(3, 8, dtype=torch.complex64)
    assert torch.allclose(loaded(x), model.eval()(x))
