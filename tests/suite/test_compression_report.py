"""Headline of the compression report: profile choice, selection on validation, the paired
gap with its interval, speed-ups, and when a verdict must stay provisional.

Every accuracy and latency below is TEST DATA, not a measurement.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from suite import compression_report as cr
from suite import paper

T975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _rows(
    methods: dict[str, tuple[list[float], list[float], float]],
    profile: str = "quick",
    **overrides,
) -> pd.DataFrame:
    """method: (test accuracies per seed, val accuracies per seed, hidden b1 ms)."""
    base = dict(
        lr=1e-3, lr_search="0.001:40.00", epochs=20, best_epoch=12, stopped_by="patience",
        diverged=False, budget_capped=False, still_improving=False, seconds=10.0,
        latency_threads=1, profile=profile, data_source="x", data_sha256="ab" * 32,
        device="cpu-fixture",
    )  # fmt: skip
    rows = []
    for m, (tests, vals, ms) in methods.items():
        p = 1024 * 1024 if m == "dense" else 8192
        for seed, (t, v) in enumerate(zip(tests, vals, strict=True)):
            rows.append({**base, "method": m, "seed": seed, "hidden_params": p,
                         "total_params": p + 10250, "compression_factor":
                         paper.compression_factor(p), "test_accuracy": t, "val_accuracy": v,
                         "latency_hidden_b1_ms": ms, "latency_hidden_b256_ms": 8 * ms,
                         "latency_net_b1_ms": ms + 1.0, "latency_net_b256_ms": 8 * ms + 4.0,
                         **overrides.get(m, {})})  # fmt: skip
    return pd.DataFrame(rows)


FINAL = {
    "dense": ([46.0, 45.0, 47.0], [45.0, 44.0, 46.0], 1.0),
    "bp_real": ([47.0, 47.0, 50.0], [46.0, 46.0, 49.0], 0.1),  # diffs 1, 2, 3
    "bpbp_real": ([52.0, 52.0, 52.0], [40.0, 40.0, 40.0], 0.2),  # best on test, not on val
}


def test_paired_gap_and_its_95_interval() -> None:
    h = cr.headline(_rows(FINAL))
    assert h["best_butterfly"] == "bp_real" and h["selected_on"] == "validation accuracy"
    assert h["gap_points"] == 2.0 and h["gap_seeds"] == 3 and h["gap_sd"] == 1.0
    half = T975_2DF * 1.0 / math.sqrt(3)
    assert h["gap_ci95_low"] == round(2.0 - half, 2) and h["gap_ci95_high"] == round(2.0 + half, 2)
    assert "95% CI -0.48 .. +4.48, paired over 3 seeds" in cr.gap_text(h)


def test_speedups_of_hidden_layer_and_whole_net_at_both_batches() -> None:
    h = cr.headline(_rows(FINAL))
    assert (h["hidden_speedup_b1"], h["hidden_speedup_b256"]) == (10.0, 10.0)
    assert h["net_speedup_b1"] == round(2.0 / 1.1, 2)
    assert h["net_speedup_b256"] == round(12.0 / 4.8, 2)


def test_final_rows_get_a_plain_verdict() -> None:
    h = cr.headline(_rows(FINAL))
    assert h["provisional_reasons"] == []
    assert h["gap_verdict"] == cr.verdict(2.0, paper.abstract_claim("accuracy_gain_points").value)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"dense": {"still_improving": True, "budget_capped": True, "stopped_by": "epoch_cap"}},
         "dense stopped by a cap while still improving"),
        ({"dense": {"budget_capped": True, "stopped_by": "time_cap"}},
         "dense hit a cap in 3 of 3 seed(s)"),
        ({"bp_real": {"budget_capped": True, "stopped_by": "epoch_cap"}},
         "best butterfly bp_real hit a cap in 3 of 3 seed(s)"),
        ({"bpbp_real": {"budget_capped": True, "stopped_by": "epoch_cap"}},
         "1 other butterfly candidate(s) hit a cap: bpbp_real"),
    ],
)  # fmt: skip
def test_capped_or_still_improving_rows_make_the_verdict_provisional(
    overrides: dict, reason: str
) -> None:
    h = cr.headline(_rows(FINAL, **overrides))
    assert reason in h["provisional_reasons"]
    assert h["gap_verdict"].startswith("provisional (") and reason in h["gap_verdict"]
    assert "exceeded" not in h["gap_verdict"] and "reproduced" not in h["gap_verdict"]


def test_an_lr_at_the_edge_of_its_grid_is_marked_and_keeps_the_claim_provisional() -> None:
    grid = "0.0003:44.00 0.001:45.00 0.003:43.00"
    assert cr.lr_edge(1e-3, grid) == "" and cr.lr_edge(1e-3, "0.001:45.00") == ""
    assert cr.lr_edge(3e-4, grid) == "lowest" and cr.lr_edge(3e-3, grid) == "highest"
    interior = {m: {"lr_search": grid} for m in FINAL}
    assert cr.headline(_rows(FINAL, **interior))["provisional_reasons"] == []
    low = {**interior, "dense": {"lr": 3e-4, "lr_search": grid}}
    h = cr.headline(_rows(FINAL, **low))
    assert h["provisional_reasons"] == ["dense's lr 0.0003 is the lowest of its search grid"]
    assert "| 0.0003 (0.0003:44.00 0.001:45.00 0.003:43.00) ↓ |" in cr.markdown(_rows(FINAL, **low))
    other = {**interior, "bpbp_real": {"lr": 3e-3, "lr_search": grid}}  # not the claim's rows
    assert cr.headline(_rows(FINAL, **other))["provisional_reasons"] == []
    top = {**interior, "bp_real": {"lr": 3e-3, "lr_search": grid}}
    assert "bp_real's lr 0.003 is the highest" in cr.headline(_rows(FINAL, **top))["gap_verdict"]


def test_rows_from_before_the_protocol_are_provisional() -> None:
    old = _rows(FINAL).drop(columns=["stopped_by", "still_improving", "lr_search"])
    h = cr.headline(old)
    assert h["gap_verdict"] == "provisional (rows do not record how training stopped)"
    assert "| 12/20 | unknown |" in cr.markdown(old)


def test_best_available_profile_is_used_and_named() -> None:
    smoke = _rows({"dense": ([90.0], [90.0], 1.0), "bp_real": ([10.0], [10.0], 0.1)}, "smoke")
    both = pd.concat([smoke, _rows(FINAL)], ignore_index=True)
    h = cr.headline(both)
    assert h["profile"] == "quick" and h["gap_points"] == 2.0
    no_dense = _rows({"bp_real": ([50.0], [50.0], 0.1)}, "paper")
    assert cr.headline(pd.concat([both, no_dense]))["profile"] == "quick"
    assert "Measured (profile quick;" in cr.markdown(both)


def test_table_marks_caps_and_still_improving_runs() -> None:
    dense = {"still_improving": True, "budget_capped": True, "stopped_by": "epoch_cap",
             "best_epoch": 20}  # fmt: skip
    bpbp = {"budget_capped": True, "stopped_by": "time_cap", "best_epoch": 15}
    df = _rows(FINAL, dense=dense, bpbp_real=bpbp)
    text = cr.markdown(df)
    assert "| 20/20** | epoch_cap |" in text and "| 15/20* | time_cap |" in text
    assert "| 12/20 | patience |" in text


def test_both_profiles_side_by_side_and_the_headline_on_the_best(tmp_path) -> None:
    from suite import results
    from suite.stage_compress import keep_other_profiles

    extra = dict(projected_val_accuracy=math.nan, n_train=1, n_val=1, n_test=1, run_id="r",
                 env_id="e", commit="c")  # fmt: skip
    quick = _rows({m: (t[:1], v[:1], ms) for m, (t, v, ms) in FINAL.items()}, "quick")
    quick = quick.assign(**extra)
    path = tmp_path / "compression.csv"
    results.write_table(quick, path, results.COMPRESSION_COLUMNS)
    paper_rows = _rows(FINAL, "paper").assign(**extra)
    both = keep_other_profiles(paper_rows, path, results.COMPRESSION_COLUMNS)
    assert sorted(both.groupby("profile").size().items()) == [("paper", 9), ("quick", 3)]
    rerun = keep_other_profiles(quick, path, results.COMPRESSION_COLUMNS)
    assert len(rerun) == 3  # a run replaces its own profile's rows
    md = cr.markdown(both)
    assert "| dense | 46.03 | 46.00 ± 1.00 (3) | 46.00 (1) |" in md  # paper, then quick
    assert md.index("Profile `paper`") < md.index("Profile `quick`")
    assert "Measured (profile paper;" in md and cr.headline(both)["gap_seeds"] == 3


def test_a_partial_run_is_listed_and_its_claim_is_provisional(tmp_path) -> None:
    from suite import results
    from suite.stage_compress import CURVE_COLUMNS, collect

    rows = _rows(FINAL, "paper")
    assert "not run yet" not in " ".join(cr.headline(rows)["provisional_reasons"])
    h = cr.headline(rows, ("paper", ["bpbp_complex", "circulant"]))
    assert h["provisional_reasons"] == ["butterfly candidate(s) not run yet: bpbp_complex"]
    assert h["gap_verdict"].startswith("provisional")
    assert cr.headline(rows, ("quick", ["bpbp_complex"]))["provisional_reasons"] == []
    md = cr.markdown(rows, ("paper", ["bpbp_complex", "circulant"]))
    assert "Profile `paper` is partial: not run yet: bpbp_complex, circulant." in md
    extra = dict(projected_val_accuracy=math.nan, n_train=1, n_val=1, n_test=1, run_id="r",
                 env_id="e", commit="c")  # fmt: skip
    folder = tmp_path / "dense"
    folder.mkdir()
    results.write_table(rows[rows.method == "dense"].assign(**extra), folder / "rows.csv",
                        results.COMPRESSION_COLUMNS)  # fmt: skip
    curve = pd.DataFrame([dict(method="dense", seed=0, lr=1e-3, epoch=1, train_loss=1.0,
                               val_accuracy=40.0, seconds=1.0)])  # fmt: skip
    results.write_table(curve, folder / "curves.csv", CURVE_COLUMNS)
    with pytest.raises(FileNotFoundError, match="bp_real"):
        collect(tmp_path, ["dense", "bp_real"], "paper")
    df, curves, missing = collect(tmp_path, ["dense", "bp_real"], "paper", allow_missing=True)
    assert missing == ["bp_real"] and set(df.method) == {"dense"}
    assert (curves.profile == "paper").all()
    with pytest.raises(FileNotFoundError, match="no method"):
        collect(tmp_path, ["bp_real"], "paper", allow_missing=True)
    # a folder left by another profile's run is not this profile's result
    with pytest.raises(ValueError, match="holds rows of profile \\['paper'\\], not 'quick'"):
        collect(tmp_path, ["dense"], "quick")
    with pytest.raises(FileNotFoundError, match="no method"):
        collect(tmp_path, ["dense"], "quick", allow_missing=True)


def test_an_unfinished_profile_kept_in_the_table_stays_partial() -> None:
    """A quick report keeps the rows of a paper run that stopped early: the claim uses the paper
    rows, so the paper profile is the partial one, whichever profile ran the report."""
    from suite.stage_compress import not_run

    methods = ["dense", "bp_real", "bpbp_real", "circulant"]
    quick = _rows({m: (t[:1], v[:1], ms) for m, (t, v, ms) in FINAL.items()}, "quick")
    paper = _rows({m: FINAL[m] for m in ("dense", "bp_real")}, "paper")
    assert not_run(quick, methods) == ("quick", ["circulant"])
    assert not_run(quick, methods[:3]) is None
    assert not_run(pd.concat([quick, paper]), methods) == ("paper", ["bpbp_real", "circulant"])
    assert not_run(pd.concat([quick, paper]), ["dense", "bp_real"]) is None


def test_one_seed_has_no_interval_and_stays_provisional() -> None:
    one = _rows({m: (t[:1], v[:1], ms) for m, (t, v, ms) in FINAL.items()})
    h = cr.headline(one)
    assert h["gap_seeds"] == 1 and h["provisional_reasons"] == ["1 paired seed(s): no interval"]
    assert h["gap_verdict"] == "provisional (1 paired seed(s): no interval)"
    assert cr.headline(_rows(FINAL))["provisional_reasons"] == []  # three seeds pair up


def test_stage_wall_time_sums_one_value_per_method_and_names_untimed_ones() -> None:
    timed = {"stage_seconds": 120.0, "stage_runs": 6, "stage_runs_reused": 2}
    df = _rows(FINAL, dense=timed, bp_real={**timed, "stage_seconds": 60.0})
    line = cr.stage_time(cr.profile_rows(df, "quick"))
    # three seed rows per method carry the method's one stage value: 120 + 60 s, not x3
    assert line.startswith("Stage wall time: 3.0 min over 2 method(s)")
    assert "slowest dense 2.0 min" in line and "12 runs, 4 of them kept runs reused" in line
    assert line.endswith("Not recorded for: bpbp_real.")
    assert cr.stage_time(_rows(FINAL)).startswith("Stage wall time: not recorded")
    assert line in cr.markdown(df)
