"""The fields and types of a TRL config class, read from its source without importing it.

Importing `trl` pulls in torch, transformers and peft (over 10 s on a small CPU machine). To
check every section of a pipeline config in a second or two - unknown fields, ill-typed values -
:func:`static_config_class` parses the installed source of the class and of its dataclass bases
(`GRPOConfig` -> `_BaseConfig` -> transformers' `TrainingArguments`) with :mod:`ast` and returns
a plain dataclass with the same init fields and type hints. Names the hints use that are not
builtins or :mod:`typing` (enums such as `IntervalStrategy`, `torch.dtype`) become `Any`: those
values are checked again when the real TRL config is built, before any model loads.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib.util
import typing
from pathlib import Path
from typing import Any

__all__ = ["static_config_class", "trl_config_class"]


class _Names(dict):
    """Names for evaluating a hint: builtins and typing; anything else is `Any`."""

    def __missing__(self, key: str) -> Any:
        if hasattr(builtins, key):
            return getattr(builtins, key)
        return getattr(typing, key, Any)


def _hint(node: ast.expr | None) -> Any:
    if node is None:
        return Any
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return Any
    try:
        hint = eval(compile(ast.Expression(node), "<hint>", "eval"),  # noqa: S307 - names only
                    {"__builtins__": {}}, _Names())
    except Exception:  # noqa: BLE001 - an unknown construct is simply not checked here
        return Any
    return hint if hint is not None else type(None)


def _module_file(module: str) -> Path:
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)  # a top-level spec: the package is not executed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base.joinpath(*rest.split(".")) if rest else base
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _init_false(value: ast.expr | None) -> bool:
    return (isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", ""))
            == "field" and any(k.arg == "init" and isinstance(k.value, ast.Constant)
                               and k.value.value is False for k in value.keywords))


def _imported_from(tree: ast.Module, module: str, name: str, package: bool) -> str | None:
    """The module that `name` comes from in `module`'s `from X import name` lines (anywhere,
    e.g. under `if TYPE_CHECKING:` in a lazily importing package)."""
    parent = module if package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if node.level:
                parts = parent.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                return f"{base}.{node.module}" if node.module else base
            return node.module
    return None


@functools.lru_cache(maxsize=None)
def _fields(module: str, name: str) -> tuple[tuple[str, Any], ...]:
    """(field, hint) pairs of dataclass `name` in `module`, its bases' first (by source)."""
    path = _module_file(module)
    package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:  # a re-export: `from transformers import TrainingArguments`
        source = _imported_from(tree, module, name, package)
        if source is None or source == module:
            raise LookupError(f"{name} not found in {module}")
        return _fields(source, name)
    out: dict[str, Any] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            source = _imported_from(tree, module, base.id, package) or module
            out.update(_fields(source, base.id))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            hint = _hint(node.annotation)
            if typing.get_origin(hint) is typing.ClassVar or node.target.id.startswith("_") \
                    or _init_false(node.value):
                out.pop(node.target.id, None)
                continue
            out[node.target.id] = hint
    return tuple(out.items())


@functools.lru_cache(maxsize=None)
def static_config_class(module: str, name: str) -> type:
    """A dataclass with the init fields and type hints of `module.name` (not imported)."""
    fields = [(field, hint, dataclasses.field(default=None)) for field, hint in _fields(module, name)]
    return dataclasses.make_dataclass(f"{name}Fields", fields)


def trl_config_class(name: str, module: str, static: bool = False) -> type:
    """TRL's config class `name` (e.g. "SFTConfig" in `trl.trainer.sft_config`), or (`static`)
    a light copy of its fields read from its source, for checking a section without importing TRL."""
    if static:
        return static_config_class(f"trl.trainer.{module}", name)
    import trl

    return getattr(trl, name)
