"""Typed values: one coercion rule for component options and config fields.

Component options and stage config fields are dataclass fields. `coerce` checks a value against
a field's type hint and converts only where YAML is ambiguous (YAML 1.1 reads ``1e-4`` as a
string; an int is a valid float). Everything else that does not fit is a :class:`ConfigError`
naming the place (``where``), e.g. ``sft.yaml: max_steps: expected an integer, got 'ten'``.

Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import types
import typing
from typing import Any, Literal, Mapping, Union

from .errors import ConfigError

_MISSING = dataclasses.MISSING


def _type_label(hint: Any, words: bool = False) -> str:
    """A short human name for a type hint (`int`, `float | None`, `one of 'a', 'b'`)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        if words:  # "an integer or null" reads better in an error than "an integer | None"
            return " or ".join("null" if a is type(None) else _type_label(a, words)
                               for a in typing.get_args(hint))
        return " | ".join(_type_label(a, words) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_label(a, words) for a in typing.get_args(hint) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]" if args else origin.__name__
    if hint is type(None):
        return "None"
    if words and hint in _WORDS:
        return _WORDS[hint]
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


class _Mismatch(Exception):
    pass


def _coerce(hint: Any, value: Any) -> Any:
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # exact type matches first, so `int | str` keeps 3 an int and "3" a string
        for arg in args:
            if isinstance(arg, type) and arg is not type(None) and type(value) is arg:
                return value
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise _Mismatch
    if origin in (list, tuple, set, frozenset, typing.Sequence, typing.Iterable):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise _Mismatch
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = args[0] if len(args) == 1 or (origin is tuple and len(set(args)) == 1) else Any
        items = [_coerce(item, v) for v in value] if item is not Any else list(value)
        return tuple(items) if origin is tuple else items
    if origin in (dict, typing.Mapping, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _Mismatch
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, numbers.Integral):
            return int(value)  # an int is a valid float (PEP 484); TRL treats some as step counts
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise _Mismatch from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # unknown typing construct: trust the consumer's own validation


def coerce(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against `hint` (YAML-friendly conversions); ConfigError naming `where`."""
    try:
        return _coerce(hint, value)
    except _Mismatch:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        if isinstance(value, float) and math.isnan(value):
            shown = "nan"
        raise ConfigError(f"{where}: expected {_type_label(hint, words=True)}, got {shown}") from None


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (forward references evaluated)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable hint is not checked
        return {f.name: (f.type if not isinstance(f.type, str) else Any) for f in dataclasses.fields(cls)}


def coerce_fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every value of `data` coerced to the type of `cls`'s field of the same name."""
    hints = field_hints(cls)
    return {key: coerce(hints.get(key, Any), value, f"{where}.{key}" if where else key)
            for key, value in data.items()}


def options_schema(cls: type, instance: Any = None) -> list[dict[str, Any]]:
    """name/type/default/help of each init field of dataclass `cls` (the current value if given)."""
    hints = field_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if isinstance(default, tuple):
            default = list(default)
        elif not isinstance(default, (int, float, str, bool, list, dict, type(None))):
            default = repr(default)
        out.append({"name": f.name, "type": _type_label(hints.get(f.name, Any)), "default": default,
                    "help": f.metadata.get("help", "")})
    return out


def option(default: Any = None, help: str = "", **kwargs: Any) -> Any:  # noqa: A002 - like argparse
    """A dataclass field with a `help` text (shown by `rlhf-plugins components --json`)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
