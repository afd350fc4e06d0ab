"""suite.params on copies of the real params.yaml: profiles load, user mistakes are one line."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from suite.params import PROFILES, ParamsError, load_stage
from tasks.recovery import RecoverParams, SearchParams

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def _load(
    tmp_path: Path,
    raw: dict,
    mutate: Callable[[dict], Any] = lambda r: None,
    profile: str | None = None,
) -> RecoverParams:
    data = copy.deepcopy(raw)
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_stage(path, "recover", RecoverParams, profile)[1]


def _error(
    tmp_path: Path, raw: dict, mutate: Callable[[dict], Any], profile: str | None = "quick"
) -> str:
    with pytest.raises(ParamsError) as info:
        _load(tmp_path, raw, mutate, profile)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _search(r: dict, profile: str = "quick") -> dict:
    return r["profiles"][profile]["recover"]["search"]


@pytest.mark.parametrize("profile", PROFILES)
def test_real_params_load_every_profile(profile: str) -> None:
    name, p = load_stage(PARAMS, "recover", RecoverParams, profile)
    assert name == profile
    assert isinstance(p.search, SearchParams)
    for ns in p.sizes.values():
        for n in ns:  # every size of the grid has a budget
            assert p.search.trials_for(n) >= 1
            assert p.search.seconds_for(n) > 0
    assert set(p.sizes) <= set(p.models)


def test_default_profile_comes_from_the_file(tmp_path: Path, raw: dict) -> None:
    for profile in PROFILES:
        data = copy.deepcopy(raw)
        data["profile"] = profile
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data))
        name, p = load_stage(path, "recover", RecoverParams)
        assert name == profile
        want = raw["profiles"][profile]["recover"]["search"]
        assert {k: v for k, v in asdict(p.search).items() if k in want} == want


def test_paper_profile_matches_the_protocol() -> None:
    sp = load_stage(PARAMS, "recover", RecoverParams, "paper")[1].search
    sizes = (8, 16, 32, 64, 128, 256, 512, 1024)
    assert [sp.trials[n] for n in sizes] == [20, 20, 40, 60, 80, 160, 160, 320]
    assert (sp.max_epochs, sp.epoch_steps, sp.polish_every, sp.polish_steps) == (200, 400, 5, 15)
    assert (sp.lr_min, sp.lr_max, sp.final_top, sp.final_steps) == (1e-4, 0.5, 16, 50)
    assert sp.threshold_mse == 1e-8 and sorted(sp.share_logits) == [False, True]


def test_mistyped_key(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r).update(trails=_search(r).pop("trials")))
    assert "recover.search.trails" in msg
    assert "trials" in msg  # the allowed keys are listed


def test_mistyped_top_level_key(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: r["recover"].update(basleines=["sparse"]))
    assert "recover.basleines" in msg


def test_mistyped_key_names_its_path_in_the_file(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r).update(trails=_search(r).pop("trials")))
    assert "profiles.quick.recover.search.trails" in msg


@pytest.mark.parametrize("value", ["100", 1.5, True, None, [100]])
def test_wrong_type(tmp_path: Path, raw: dict, value: Any) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r).update(epoch_steps=value))
    assert "recover.search.epoch_steps" in msg and "integer" in msg


def test_wrong_type_in_nested_mapping(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r)["trials"].update({8: "many"}))
    assert "recover.search.trials.8" in msg


def test_number_field_accepts_int(tmp_path: Path, raw: dict) -> None:
    p = _load(tmp_path, raw, lambda r: _search(r).update(lr_max=1), "quick")
    assert p.search.lr_max == 1.0 and isinstance(p.search.lr_max, float)


@pytest.mark.parametrize(
    ("section", "key"), [("search", "max_epochs"), ("search", "seed"), (None, "sizes")]
)
def test_missing_key(tmp_path: Path, raw: dict, section: str | None, key: str) -> None:
    def mutate(r: dict) -> None:
        (_search(r) if section else r["profiles"]["quick"]["recover"]).pop(key)

    msg = _error(tmp_path, raw, mutate)
    assert "missing" in msg and f"recover.{section + '.' if section else ''}{key}" in msg


def test_missing_shared_key(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: r["recover"].pop("baselines"))
    assert "missing" in msg and "recover.baselines" in msg


def test_unknown_profile_argument(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: None, profile="fast")
    assert "'fast'" in msg and "smoke" in msg


def test_unknown_profile_in_file(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: r.update(profile="fast"), profile=None)
    assert "'fast'" in msg


def test_unknown_profile_section(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: r["profiles"].update(qiuck={}))
    assert "profiles.qiuck" in msg


@pytest.mark.parametrize("text", ["recover: [unclosed\n", "profile: quick\n  bad: indent\n"])
def test_malformed_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="malformed YAML") as info:
        load_stage(path, "recover", RecoverParams, "quick")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- quick\n- paper\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_stage(path, "recover", RecoverParams, "quick")


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_stage(tmp_path / "nope.yaml", "recover", RecoverParams, "quick")


@pytest.mark.parametrize("key", ["models", "search"])
def test_key_in_both_places(tmp_path: Path, raw: dict, key: str) -> None:
    def mutate(r: dict) -> None:
        if key == "models":
            r["profiles"]["quick"]["recover"]["models"] = copy.deepcopy(r["recover"]["models"])
        else:
            r["recover"]["search"] = copy.deepcopy(_search(r))

    msg = _error(tmp_path, raw, mutate)
    assert f"recover.{key}" in msg and "profiles.quick" in msg


def test_key_in_both_places_other_profile_is_fine(tmp_path: Path, raw: dict) -> None:
    def mutate(r: dict) -> None:
        r["recover"]["search"] = copy.deepcopy(_search(r, "paper"))
        for p in PROFILES:
            del r["profiles"][p]["recover"]["search"]

    sp = _load(tmp_path, raw, mutate, "smoke").search
    assert sp.max_epochs == raw["profiles"]["paper"]["recover"]["search"]["max_epochs"]


@pytest.mark.parametrize("budget", ["trials", "cell_seconds"])
def test_size_without_budget(tmp_path: Path, raw: dict, budget: str) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r)[budget].pop(64))
    assert "n=64" in msg and f"profiles.quick.recover.search.{budget}" in msg


def test_size_without_budget_smoke(tmp_path: Path, raw: dict) -> None:
    def mutate(r: dict) -> None:
        r["profiles"]["smoke"]["recover"]["sizes"]["dft"] = [8, 16]

    msg = _error(tmp_path, raw, mutate, profile="smoke")
    assert "n=16" in msg


@pytest.mark.parametrize("n", [12, 4, 0])
def test_non_power_of_two_size(tmp_path: Path, raw: dict, n: int) -> None:
    msg = _error(
        tmp_path, raw, lambda r: r["profiles"]["quick"]["recover"]["sizes"]["dft"].append(n)
    )
    assert "sizes.dft" in msg and str(n) in msg


def test_size_for_target_without_model(tmp_path: Path, raw: dict) -> None:
    msg = _error(tmp_path, raw, lambda r: r["recover"]["models"].pop("randn"))
    assert "randn" in msg


@pytest.mark.parametrize(
    ("key", "value", "word"),
    [
        ("lr_min", 1.0, "lr_min"),
        ("inits", ["zeros"], "inits"),
        ("workers", 0, "workers"),
        ("share_logits", [], "share_logits"),
    ],
)
def test_search_validate(tmp_path: Path, raw: dict, key: str, value: Any, word: str) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r).update({key: value}))
    assert word in msg


@pytest.mark.parametrize(
    ("where", "value"), [("model", "fft"), ("baseline", "dense"), ("target", "wavelet")]
)
def test_recover_validate(tmp_path: Path, raw: dict, where: str, value: str) -> None:
    def mutate(r: dict) -> None:
        if where == "model":
            r["recover"]["models"]["dft"] = value
        elif where == "baseline":
            r["recover"]["baselines"].append(value)
        else:
            r["recover"]["models"][value] = "bp"

    assert value in _error(tmp_path, raw, mutate)


def test_private_field_is_not_a_key(tmp_path: Path, raw: dict) -> None:
    _error(tmp_path, raw, lambda r: r["recover"].update(_search=None))


def test_profile_section_not_a_mapping(tmp_path: Path, raw: dict) -> None:
    assert "profiles.quick" in _error(
        tmp_path, raw, lambda r: r["profiles"].update(quick=["recover"])
    )


@pytest.mark.parametrize("key", ["polish_steps", "final_top", "final_steps"])
def test_negative_counts_rejected(tmp_path: Path, raw: dict, key: str) -> None:
    assert key in _error(tmp_path, raw, lambda r: _search(r).update({key: -1}))


@pytest.mark.parametrize(
    ("value", "where"),
    [({"bpbp": "corner"}, "perm_init.bpbp"), ({"bpq": "corners"}, "perm_init.bpq")],
)
def test_bad_perm_init(tmp_path: Path, raw: dict, value: dict, where: str) -> None:
    msg = _error(tmp_path, raw, lambda r: _search(r).update(perm_init=value))
    assert f"recover.search.{where}" in msg and "corners" in msg


def test_kept_cells_are_keyed_by_their_model_s_perm_init(tmp_path: Path, raw: dict) -> None:
    """A kept cell is reused only by a run whose search agrees on that cell: perm_init is keyed
    by model, so corners for bpbp changes the key of a bpbp cell and not of a bp cell."""
    from suite.stage_recover import _cell_key

    plain = _load(tmp_path, raw, lambda r: _search(r).update(perm_init={}), "quick")
    corners = _load(tmp_path, raw, lambda r: _search(r).update(perm_init={"bpbp": "corners"}))
    for name, model, differs in (("convolution", "bpbp", True), ("dft", "bp", False)):
        a, b = (_cell_key(p, name, 64, model, "code") for p in (plain, corners))
        assert (a != b) == differs
