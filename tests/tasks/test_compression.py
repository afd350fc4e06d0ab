"""The compression task: features, training with early stopping, projection, latency.

Stopping protocol: early stopping ends a run; the epoch and time caps are runaway guards whose
rows are flagged; `still_improving` marks a capped run whose best epoch was recent."""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import pytest
import torch

from tasks.compression import (
    CompressParams,
    HiddenNet,
    RunCache,
    accuracy,
    grayscale,
    make_features,
    next_lr,
    run_method,
    still_improving,
    train,
    train_all,
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
    rng = np.random.default_rng()
    many = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)  # sums up to 765: no wrap
    many[0, 0, 0] = 255
    want = many.astype(np.float32).mean(axis=-1).reshape(50, -1)  # the float32 mean
    got = grayscale(many)
    assert got.dtype == np.float32 and np.array_equal(got, want)


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
    assert out.stopped_by == "patience" and not out.capped and not out.diverged
    # patience runs out exactly at the cap: early stopping decided, not the cap
    out = train(_net(), f, 1e-12, 3, _params(patience=2), 0, lambda _: None, "t")
    assert (out.epochs, out.stopped_by) == (3, "patience")


@pytest.mark.parametrize(
    ("stopped_by", "epochs", "best", "patience", "expected"),
    [
        ("epoch_cap", 10, 10, 3, True),  # best at the last epoch: still improving
        ("epoch_cap", 10, 8, 3, True),  # 2 epochs since the best < patience 3
        ("epoch_cap", 10, 7, 3, False),  # 3 epochs without gain: early stopping would stop
        ("time_cap", 4, 4, 5, True),
        ("patience", 10, 7, 3, False),  # early stopping decided
        ("diverged", 2, 1, 3, False),
    ],
)
def test_still_improving_detector(
    stopped_by: str, epochs: int, best: int, patience: int, expected: bool
) -> None:
    assert still_improving(stopped_by, epochs, best, patience) is expected


def test_epoch_cap_is_flagged_as_still_improving() -> None:
    f = make_features(_arrays(), _params())
    out = train(_net(), f, 1e-3, 2, _params(patience=5), 0, lambda _: None, "t")
    assert (out.epochs, out.stopped_by) == (2, "epoch_cap") and out.capped
    assert still_improving(out.stopped_by, out.epochs, out.best_epoch, 5)


def test_time_cap_and_divergence_are_reasons() -> None:
    f = make_features(_arrays(), _params())
    out = train(_net(), f, 1e-3, 10, _params(patience=5, max_seconds=0.0), 0, print, "t")
    assert (out.epochs, out.stopped_by) == (1, "time_cap") and out.capped
    net = _net()
    with torch.no_grad():
        net.out.weight[0, 0] = math.nan
    out = train(net, f, 1e-3, 10, _params(patience=5), 0, lambda _: None, "t")
    assert (out.epochs, out.stopped_by) == (1, "diverged") and out.diverged and not out.capped


def test_min_delta_demands_a_real_gain() -> None:
    f = make_features(_arrays(), _params())
    out = train(_net(), f, 1e-3, 10, _params(patience=2, min_delta=100.0), 0, print, "t")
    assert out.best_epoch == 1 and out.epochs == 3 and out.stopped_by == "patience"


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown method 'dense2'"):
        _params(methods=["dense2"]).validate()
    with pytest.raises(ValueError, match="method_lrs"):
        _params(method_lrs={"dense2": [1e-3]}).validate()
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        _params(method_lrs={"dense": [0.0]}).validate()


def test_per_method_lr_search_picks_on_validation() -> None:
    p = _params(method_lrs={"dense": [1e-12, 1e-3]}, max_epochs=3, patience=3)
    (rec,) = run_method("dense", _arrays(), p, lambda _: None)
    assert rec["lr"] == 1e-3 and rec["lr_candidates"] == [1e-12, 1e-3]
    seen = {k: float(v) for k, v in (x.split(":") for x in rec["lr_search"].split())}
    assert seen["0.001"] == pytest.approx(rec["val_accuracy"], abs=0.01)
    assert seen["0.001"] > seen["1e-12"]
    assert rec["stopped_by"] == "epoch_cap" and rec["budget_capped"] and rec["still_improving"]
    f = make_features(_arrays(), p)
    assert accuracy(rec["net"], f.x_test, f.y_test) == rec["test_accuracy"]  # the returned net


def test_a_stage_killed_half_way_keeps_the_runs_it_finished(tmp_path) -> None:
    arrays = _arrays(per_class=12, test_per_class=4)
    p = _params(lrs=[1e-3, 3e-3], max_epochs=2)
    kept = RunCache(tmp_path, {"arrays_sha256": "a", "code": "c"})

    def killed_at_the_second_run(msg: str) -> None:
        if "lr=0.003 epoch 1:" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_method("dense", arrays, p, killed_at_the_second_run, kept)
    assert [x.name.split("-")[0] for x in tmp_path.glob("dense/*.pt")] == ["lr0.001"]
    assert not list(tmp_path.glob("dense/.*"))  # no half-written file
    said: list[str] = []
    run_method("dense", arrays, p, said.append, kept)
    assert any("seed=0 lr=0.001: kept run reused" in m for m in said)
    assert not any("lr=0.001 epoch" in m for m in said) and any("lr=0.003 epoch" in m for m in said)


def test_next_lr_goes_on_past_the_edge_in_the_grid_pattern() -> None:
    grid = [3e-4, 1e-3, 3e-3, 1e-2]
    assert next_lr(grid, 1e-2) == 3e-2 and next_lr([*grid, 3e-2], 3e-2) == 0.1
    assert next_lr(grid, 3e-4) == 1e-4 and next_lr([1e-4, *grid], 1e-4) == 3e-5
    assert next_lr(grid, 1e-3) is None and next_lr(grid, 3e-3) is None
    assert next_lr([1e-3], 1e-3) is None
    assert next_lr([1e-3, 2e-3], 2e-3) == 4e-3 and next_lr([1e-3, 2e-3], 1e-3) == 5e-4


def test_lr_search_extends_past_an_edge_until_the_best_is_inside() -> None:
    """Tiny lrs barely train: the best sits at the top edge, so the search adds candidates
    (at most lr_extend) until one beyond it is worse."""
    p = _params(lrs=[1e-7, 1e-6], lr_extend=3, max_epochs=3, patience=3)
    said: list[str] = []
    (rec,) = run_method("dense", _arrays(), p, said.append)
    tried = [float(x.split(":")[0]) for x in rec["lr_search"].split()]
    assert tried[:3] == [1e-7, 1e-6, 1e-5] and tried == sorted(tried) and len(tried) <= 5
    assert sum("is at an edge: trying" in m for m in said) == len(tried) - 2
    done = [m for m in said if " runs done, " in m]  # progress: k of n, n grows per extension
    assert done[-1].startswith(f"[compress] dense: {len(tried)} of {len(tried)} runs done, ")
    assert done[-1].endswith("about 0 s left") and len(done) == len(tried)
    assert rec["lr_candidates"] == tried and rec["lr"] in tried
    (none,) = run_method("dense", _arrays(), _params(lrs=[1e-7, 1e-6], max_epochs=1), print)
    assert none["lr_candidates"] == [1e-7, 1e-6]  # lr_extend 0: the grid as given


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
    assert rec["patience"] == 2 and rec["budget_capped"]  # both caps are hit in 2 + 1 epochs
    if method == "dense_to_monarch":  # dense phase (2 epochs) + fine-tune (1 epoch)
        assert rec["epochs"] == 1 and len(rec["curve"]) == 3 and rec["max_epochs"] == 1
        assert rec["stopped_by"] == "dense phase epoch_cap; fine-tune epoch_cap"
    else:
        assert rec["stopped_by"] == "epoch_cap" and rec["max_epochs"] == 2


def _same_records(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x["lr"], x["lr_search"], x["epochs"]) == (y["lr"], y["lr_search"], y["epochs"])
        assert (x["test_accuracy"], x["val_accuracy"]) == (y["test_accuracy"], y["val_accuracy"])
        assert x["projected_val_accuracy"] == y["projected_val_accuracy"] or (
            math.isnan(x["projected_val_accuracy"]) and math.isnan(y["projected_val_accuracy"])
        )
        drop = [{k: v for k, v in c.items() if k != "seconds"} for c in x["curve"]]
        assert drop == [{k: v for k, v in c.items() if k != "seconds"} for c in y["curve"]]
        assert x["stopped_by"] == y["stopped_by"]
        assert all(torch.equal(x["state"][k], y["state"][k]) for k in x["state"])


@pytest.mark.parametrize("workers", [1, 2])
def test_projected_method_reuses_the_dense_runs(tmp_path, capfd, workers: int) -> None:
    """The dense method keeps each run; dense_to_monarch takes its dense phase from there and
    ends with the records of a run that trained the dense phase itself."""
    arrays = _arrays(per_class=12, test_per_class=4)
    kw = dict(lrs=[1e-3, 3e-3], seeds=[0, 1], max_epochs=2, finetune_epochs=1, workers=workers)
    p = _params(methods=["dense", "dense_to_monarch"], **kw)
    kept = RunCache(tmp_path, {"arrays_sha256": "a", "code": "c"})
    dense = run_method("dense", arrays, p, lambda _: None, kept)
    stored = {x.name.split("-")[0] + "-" + x.name.split("-")[1] for x in tmp_path.glob("dense/*")}
    assert stored == {"lr0.001-seed0", "lr0.003-seed0", f"lr{dense[1]['lr']:g}-seed1"}
    fresh = run_method("dense_to_monarch", arrays, p, lambda _: None)
    said: list[str] = []
    capfd.readouterr()
    reused = run_method("dense_to_monarch", arrays, p, said.append, kept)
    said += capfd.readouterr().err.splitlines()  # what the worker processes logged
    assert not any("(dense phase) epoch" in m for m in said)
    same_lr = reused[1]["lr"] == dense[1]["lr"]  # seed 1 is kept at dense's chosen lr only
    assert sum("dense phase reused" in m for m in said) == 2 + same_lr
    _same_records(fresh, reused)
    other = RunCache(tmp_path, {"arrays_sha256": "a", "code": "changed"})
    said.clear()
    one = _params(methods=["dense_to_monarch"], lrs=[1e-3], max_epochs=2, finetune_epochs=1)
    run_method("dense_to_monarch", arrays, one, said.append, other)
    assert any("(dense phase) epoch" in m for m in said)  # another key: trained again


def test_kept_runs_resume_and_a_wider_grid_trains_only_its_new_candidates(tmp_path) -> None:
    arrays = _arrays(per_class=12, test_per_class=4)
    kw = dict(methods=["bp_real_learned"], seeds=[0, 1], max_epochs=2, patience=2)
    kept = RunCache(tmp_path, {"arrays_sha256": "a", "code": "c"})
    said: list[str] = []
    first = run_method("bp_real_learned", arrays, _params(lrs=[1e-3, 3e-3], **kw), said.append,
                       kept)  # fmt: skip
    assert sum(" epoch 1:" in m for m in said) == 3 and not any("kept run" in m for m in said)
    assert (first[0]["stage_runs"], first[0]["stage_runs_reused"]) == (3, 0)
    said.clear()
    again = run_method("bp_real_learned", arrays, _params(lrs=[1e-3, 3e-3], **kw), said.append,
                       kept)  # fmt: skip
    assert not any(" epoch " in m for m in said)  # nothing trained: every run was kept
    _same_records(first, again)
    assert all((r["stage_runs"], r["stage_runs_reused"]) == (3, 3) for r in again)
    assert 0 < again[0]["stage_seconds"] == again[1]["stage_seconds"]
    assert again[0]["net"].hidden.learned  # a usable net of the method, with its state
    f = make_features(arrays, _params(**kw))
    assert all(accuracy(r["net"], f.x_test, f.y_test) == r["test_accuracy"] for r in again)
    said.clear()
    wider = run_method("bp_real_learned", arrays, _params(lrs=[1e-3, 3e-3, 1e-2], **kw),
                       said.append, kept)  # fmt: skip
    trained = {m.split(" epoch")[0] for m in said if " epoch 1:" in m}
    assert trained <= {"[compress] bp_real_learned seed=0 lr=0.01",
                       f"[compress] bp_real_learned seed=1 lr={wider[1]['lr']:g}"}  # fmt: skip
    assert "[compress] bp_real_learned seed=0 lr=0.01" in trained
    longer = run_method(
        "bp_real_learned", arrays, _params(lrs=[1e-3], **{**kw, "max_epochs": 3}), said.append, kept
    )  # another knob: another key
    assert longer[0]["epochs"] == 3


@pytest.mark.parametrize("method", ["bp_complex", "dense_to_butterfly"])
def test_parallel_workers_give_the_sequential_records(method: str) -> None:
    """The lr candidates and the other seeds train in `workers` processes: same records."""
    arrays = _arrays(per_class=12, test_per_class=4)
    kw = dict(methods=[method], lrs=[1e-3, 3e-3], seeds=[0, 1], max_epochs=2, finetune_epochs=1)
    seq = run_method(method, arrays, _params(**kw), lambda _: None)
    par = run_method(method, arrays, _params(**kw, workers=2), lambda _: None)
    assert [r["seed"] for r in par] == [0, 1] and par[0]["lr"] == par[1]["lr"]
    for a, b in zip(seq, par, strict=True):
        assert (a["lr"], a["lr_search"], a["epochs"]) == (b["lr"], b["lr_search"], b["epochs"])
        assert a["test_accuracy"] == b["test_accuracy"]
        drop = [{k: v for k, v in c.items() if k != "seconds"} for c in a["curve"]]
        assert drop == [{k: v for k, v in c.items() if k != "seconds"} for c in b["curve"]]
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        f = make_features(arrays, _params(**kw))
        assert accuracy(b["net"], f.x_test, f.y_test) == b["test_accuracy"]  # a usable net
    with pytest.raises(ValueError, match="workers must be >= 1"):
        _params(workers=0).validate()


def test_train_all_fills_one_pool_and_the_methods_then_find_their_runs(tmp_path, capfd) -> None:
    """compress-train: every method's search and seeds in one pool; run_method then trains
    nothing and returns the records of a run that trained alone."""
    arrays = _arrays(per_class=12, test_per_class=4)
    methods = ["dense", "bp_real", "dense_to_monarch"]
    p = _params(methods=methods, lrs=[1e-3, 3e-3], seeds=[0, 1], max_epochs=2, workers=2)
    kept = RunCache(tmp_path, {"arrays_sha256": "a", "code": "c"})
    said: list[str] = []
    summary = train_all(arrays, p, said.append, kept)
    said += capfd.readouterr().err.splitlines()  # what the worker processes logged
    assert summary["runs"] == 9 and summary["runs_reused"] == 0 and summary["workers"] == 2
    assert "[compress] all methods: 9 of 9 runs done" in " ".join(said)
    # every dense phase of dense_to_monarch is a dense run of the pool, none trained twice
    assert sum("dense_to_monarch" in m and "dense phase reused" in m for m in said) == 3
    assert not any("(dense phase) epoch" in m for m in said)
    dense = re.findall(r"\] dense seed=(\d+) lr=(\S+) epoch 1:", "\n".join(said))
    assert len(dense) == len(set(dense)) >= 3
    for method in methods:
        said.clear()
        alone = run_method(method, arrays, _params(methods=methods, lrs=[1e-3, 3e-3],
                                                   seeds=[0, 1], max_epochs=2), lambda _: None)
        loaded = run_method(method, arrays, p, said.append, kept)
        assert not any(" epoch " in m for m in said)  # every run was kept
        assert loaded[0]["lr"] == summary["lr"][method]
        assert all(r["stage_runs_reused"] == r["stage_runs"] == 3 for r in loaded)
        _same_records(alone, loaded)
    again = train_all(arrays, p, said.append, kept)
    assert (again["runs"], again["runs_reused"]) == (9, 9) and again["lr"] == summary["lr"]
    assert set(summary["step_ms"]) == set(methods) and min(summary["step_ms"].values()) > 0
    assert any(m.startswith("[compress] training step (ms), the costliest first") for m in said)


def test_scheduler_starts_runs_by_rank_and_trains_a_run_asked_twice_once() -> None:
    """compress-train's order: dense, the projections, later phases, then searches; within a
    rank the costlier method first, then FIFO."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.compression import _Scheduler

    gate, ran = threading.Event(), []

    def fit(method: str, lr: float, seed: int, p, pre) -> str:
        if method == "blocker":
            gate.wait(10)
        if method == "broken":
            raise RuntimeError("diverged")
        ran.append((method, lr))
        return f"{method}:{lr}"

    p = _params()
    with ThreadPoolExecutor(1) as threads:
        pool = _Scheduler(threads, 1, cost={"monarch": 0.05, "bp_real": 0.01})
        first = pool.submit(fit, "blocker", 1.0, 0, p, None)  # holds the only worker
        asked = [
            pool.submit(fit, "bp_real", 1.0, 0, p, None),
            pool.submit(fit, "bp_real", 3.0, 0, p, None),
            pool.submit(fit, "bp_real", 2.0, 1, p, None, later=True),
            pool.submit(fit, "monarch", 1.0, 0, p, None),
            pool.submit(fit, "dense_to_monarch", 1.0, 0, p, None),
            pool.submit(fit, "dense", 1.0, 0, p, None),
            pool.submit(fit, "dense", 2.0, 0, p, None),
        ]
        assert pool.submit(fit, "dense", 1.0, 0, p, None) is asked[5]  # trained once
        broken = pool.submit(fit, "broken", 1.0, 0, p, None)
        gate.set()
        assert first.result() == "blocker:1.0" and asked[5].result() == "dense:1.0"
        assert all(f.result() for f in asked)
        with pytest.raises(RuntimeError, match="diverged"):
            broken.result()
    assert ran == [
        ("blocker", 1.0), ("dense", 1.0), ("dense", 2.0), ("dense_to_monarch", 1.0),
        ("bp_real", 2.0), ("monarch", 1.0), ("bp_real", 1.0), ("bp_real", 3.0),
    ]  # fmt: skip

    ran.clear()  # members: nothing starts before every member has asked (or ended)
    with ThreadPoolExecutor(1) as threads:
        pool = _Scheduler(threads, 1, members=3)
        with pool.member():
            search = pool.submit(fit, "bp_real", 1.0, 0, p, None)
        with pool.member():
            pass  # a member whose runs were all kept
        assert len(pool.waiting) == 1 and not search.done()
        with pool.member():
            dense = pool.submit(fit, "dense", 1.0, 0, p, None)  # asked last, starts first
        assert search.result() and dense.result()
    assert ran == [("dense", 1.0), ("bp_real", 1.0)]

    gate.clear()
    with ThreadPoolExecutor(1) as threads:
        pool = _Scheduler(threads, 1)
        pool.submit(fit, "blocker", 1.0, 0, p, None)
        waiting = pool.submit(fit, "dense", 3.0, 0, p, None)
        pool.cancel()  # a failed run: the waiting runs never start
        gate.set()
    assert waiting.cancelled() and ("dense", 3.0) not in ran
