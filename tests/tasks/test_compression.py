"""The compression task: features, training with early stopping, projection, latency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.compression import (
    CompressParams,
    HiddenNet,
    accuracy,
    grayscale,
    make_features,
    run_method,
    train,
)


def _arrays(per_class: int = 30, test_per_class: int = 10, seed: int = 0) -> dict:
    """Images whose mean brightness pattern depends on the class: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 120, (10, 32, 32, 1))

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(10), count)
        x = patterns[y] + rng.integers(0, 136, (len(y), 32, 32, 3))
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = split(per_class)
    x_test, y_test = split(test_per_class)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _params(**kw) -> CompressParams:
    base = dict(
        methods=["dense"],
        seeds=[0],
        lrs=[1e-3],
        max_epochs=3,
        patience=2,
        finetune_epochs=1,
        threads=1,
        latency_repeats=3,
        batch_size=64,
    )
    return CompressParams(**{**base, **kw})


def test_grayscale_is_the_channel_average() -> None:
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 0, 0] = (30, 60, 90)
    assert grayscale(img)[0, 0] == pytest.approx(60.0) and grayscale(img).shape == (1, 1024)


def test_features_split_and_standardise_with_training_statistics() -> None:
    arrays = _arrays()
    f = make_features(arrays, _params())
    assert f.counts() == {"train": 255, "val": 45, "test": 100}  # 15% of 300 held out
    assert f.x_train.mean(0).abs().max() < 1e-4
    assert (f.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert f.x_val.mean(0).abs().max() > 1e-3  # validation is normalised, not standardised
    g = make_features(arrays, _params())
    assert torch.equal(f.x_val, g.x_val) and torch.equal(f.y_train, g.y_train)
    h = make_features(arrays, _params(split_seed=1))
    assert not torch.equal(f.y_val, h.y_val)


def test_subsample_is_class_stratified() -> None:
    f = make_features(_arrays(), _params(n_train=100, n_test=50))
    labels = torch.cat([f.y_train, f.y_val])
    assert len(labels) == 100 and torch.bincount(labels).tolist() == [10] * 10
    assert torch.bincount(f.y_test).tolist() == [5] * 10


def _net() -> HiddenNet:
    from kernels.structured import make_layer

    torch.manual_seed(0)
    return HiddenNet(make_layer("dense", 1024, torch.Generator().manual_seed(0)))


def test_training_learns_and_keeps_the_best_validation_checkpoint() -> None:
    f = make_features(_arrays(), _params())
    net = _net()
    before = accuracy(net, f.x_val, f.y_val)
    out = train(net, f, 1e-3, 4, _params(patience=4), 0, lambda _: None, "t")
    assert out.val_accuracy > max(50.0, before)  # chance is 10%
    assert accuracy(net, f.x_val, f.y_val) == out.val_accuracy  # restored best checkpoint
    assert [c["epoch"] for c in out.curve] == list(range(1, out.epochs + 1))
    assert out.curve[-1]["train_loss"] < out.curve[0]["train_loss"]


def test_early_stopping_after_patience_epochs_without_gain() -> None:
    f = make_features(_arrays(), _params())
    net = _net()
    out = train(net, f, 1e-12, 20, _params(patience=2), 0, lambda _: None, "t")
    assert out.best_epoch == 1 and out.epochs == 3  # best at 1, then 2 epochs without gain


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown method 'dense2'"):
        _params(methods=["dense2"]).validate()


@pytest.mark.parametrize("method", ["bp_real", "dense_to_monarch"])
def test_run_method_records(method: str) -> None:
    from kernels.structured import param_formula

    p = _params(methods=[method], max_epochs=2, finetune_epochs=1)
    (rec,) = run_method(method, _arrays(per_class=12, test_per_class=4), p, lambda _: None)
    kind = "monarch" if method == "dense_to_monarch" else method
    assert rec["hidden_params"] == param_formula(kind, 1024)
    assert rec["total_params"] == rec["hidden_params"] + 1024 + 10 * 1024 + 10
    assert 0 <= rec["test_accuracy"] <= 100 and rec["n_val"] == 18
    assert math.isnan(rec["projected_val_accuracy"]) == (method == "bp_real")
    assert all(rec[f"latency_{w}_b{b}_ms"] > 0 for w in ("hidden", "net") for b in (1, 256))
    if method == "dense_to_monarch":  # dense phase (2 epochs) + fine-tune (1 epoch)
        assert rec["epochs"] == 1 and len(rec["curve"]) == 3
