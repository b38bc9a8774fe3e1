"""YAML configs mapped onto dataclasses; unknown keys are errors with a did-you-mean.

A stage config mixes our own fields (template, masking, model, dataset, peft, ...) with the
fields of the TRL config class the stage trains with (SFTConfig, GRPOConfig, ...), so TRL users
can write the arguments they know. `load_stage_config` splits and validates them.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from `path` (ConfigError naming the file when it is not one)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _nested_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, when it is one (or Optional of one)."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if dataclasses.is_dataclass(c) and isinstance(c, type):
            return c
    return None


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Make `cls(**data)`, recursing into dataclass-typed fields; unknown keys are ConfigErrors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = _field_names(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown field {key!r}{_suggest(str(key), names)}")
        nested = _nested_type(cls, key)
        if nested is not None and isinstance(value, Mapping):
            value = build_dataclass(nested, value, f"{where}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_stage_config(source: str | os.PathLike | Mapping[str, Any], ours: type[T],
                      trl_cls: type | None = None, *, where: str | None = None,
                      ) -> tuple[T, dict[str, Any]]:
    """Split a stage config into our dataclass and keyword arguments for `trl_cls`.

    Keys that are fields of `ours` build `ours`; keys that are fields of `trl_cls` are returned
    as a dict (the caller builds the TRL config, usually adding `output_dir`). Anything else is a
    ConfigError with a did-you-mean over both sets of names.
    """
    if isinstance(source, Mapping):
        data, where = dict(source), where or "config"
    else:
        data, where = load_yaml(source), where or str(source)
    our_names = set(_field_names(ours))
    trl_names = set(_field_names(trl_cls)) if trl_cls is not None else set()
    mine, trl = {}, {}
    for key, value in data.items():
        if key in our_names:
            mine[key] = value
        elif key in trl_names:
            trl[key] = value
        else:
            raise ConfigError(f"{where}: unknown field {key!r}"
                              f"{_suggest(str(key), sorted(our_names | trl_names))}")
    return build_dataclass(ours, mine, where), trl


def config_hash(*parts: Any) -> str:
    """A stable short hash of JSON-able config parts (used to skip/resume stages and caches)."""
    import hashlib
    import json

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        return repr(o)

    blob = json.dumps(parts, sort_keys=True, default=default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
