"""Typed params with profiles: params.yaml -> a frozen dataclass per stage.

params.yaml holds `profile` (smoke | quick | paper), one section per stage for knobs that every
profile shares, and `profiles.<name>.<stage>` for the knobs a profile sets (grid, budget). A key
may live in only one of the two places, so `dvc exp run -S <path>=<value>` always takes effect.
Unknown, missing or mistyped keys are a ParamsError naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PROFILES = ("smoke", "quick", "full", "paper")
T = TypeVar("T")


class ParamsError(ValueError):
    """A user mistake in params.yaml; the message is one line naming the key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParamsError(f"{path}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def stage_section(
    raw: dict[str, Any], stage: str, profile: str | None = None
) -> tuple[str, dict, dict[str, str]]:
    """Merge `raw[stage]` with `raw['profiles'][profile][stage]`.

    Returns (profile, merged, origins): origins maps each key to the section it came from, so
    that errors name the key's real path in params.yaml.
    """
    profile = profile or raw.get("profile")
    if profile not in PROFILES:
        raise ParamsError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    shared = raw.get(stage) or {}
    profiles = raw.get("profiles") or {}
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise ParamsError(
            f"unknown profile 'profiles.{unknown[0]}' (allowed: {', '.join(PROFILES)})"
        )
    if not isinstance(profiles, dict):
        raise ParamsError("'profiles' must be a mapping")
    prof = profiles.get(profile) or {}
    if not isinstance(prof, dict):
        raise ParamsError(f"'profiles.{profile}' must be a mapping")
    own = prof.get(stage) or {}
    for name, section in ((stage, shared), (f"profiles.{profile}.{stage}", own)):
        if not isinstance(section, dict):
            raise ParamsError(f"'{name}' must be a mapping")
    both = sorted(set(shared) & set(own))
    if both:
        raise ParamsError(
            f"'{stage}.{both[0]}' is set both in '{stage}' and in 'profiles.{profile}'"
        )
    origins = {k: stage for k in shared} | {k: f"profiles.{profile}.{stage}" for k in own}
    return profile, {**shared, **own}, origins


def _check(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ParamsError(f"'{key}' must be a mapping, got {value!r}")
        return build(tp, value, key)  # a nested section: strict too, errors name its path
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg, key)
            except ParamsError:
                continue
        raise ParamsError(f"'{key}' has the wrong type: {value!r} is not {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"'{key}' must be null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"'{key}' must be a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"'{key}' must be a mapping, got {value!r}")
        return {
            _check(k, args[0], f"{key}.{k}"): _check(v, args[1], f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ParamsError(f"'{key}' must be a {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp} for {key}")


def build(
    cls: type[T], data: dict[str, Any], where: str, origins: dict[str, str] | None = None
) -> T:
    """Construct dataclass `cls` from `data`, strictly: every key known, present and typed.

    where: the section's path in params.yaml; origins: per-key paths where they differ. The
    object's `validate()` (if any) runs last; a ValueError it raises with a `field` attribute
    (a key, or a dotted path into a nested section) is reported at that key's path.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    origins = origins or {}

    def path(name: str) -> str:
        return f"{origins.get(name, where)}.{name}"

    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key '{path(unknown[0])}' (allowed: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ParamsError(f"missing key '{path(name)}'")
        values[name] = _check(data[name], hints[name], path(name))
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ParamsError:
            raise
        except ValueError as exc:
            key = getattr(exc, "field", None)
            if key is None:
                raise ParamsError(f"{where}: {exc}") from None
            head = key.split(".")[0]
            raise ParamsError(f"'{origins.get(head, where)}.{key}': {exc}") from None
    return obj


def load_stage(
    path: str | Path, stage: str, cls: type[T], profile: str | None = None
) -> tuple[str, T]:
    """Read params.yaml and return (profile, typed params of `stage`)."""
    profile, section, origins = stage_section(load_yaml(path), stage, profile)
    return profile, build(cls, section, stage, origins)
