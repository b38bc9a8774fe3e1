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
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_strict_loader())  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(p, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    load_config_plugins(data.pop("plugins", None), p)
    resolve_input_paths(data, p)
    return data


#: config fields that name an input file or folder: read relative to the config file
INPUT_PATH_FIELDS = ("model", "dataset", "eval_dataset", "reward_model", "reward_adapter")


def resolve_input_paths(data: dict[str, Any], config: Path, where: str = "") -> None:
    """Rewrite each relative input path of a config read from `config` (`INPUT_PATH_FIELDS`, in
    sections too) to the file or folder it names beside the config file.

    A value that names nothing there is left as it is: a hub id, `synthetic` or `default`, or a
    path relative to the working directory - the old reading, which still works with a warning
    when that path exists. `output_dir` is not an input: it stays relative to the working
    directory, as `--output-dir` is (docs/troubleshooting.md, "Paths in a config").
    """
    import logging

    base = config.parent
    for key, value in data.items():
        if isinstance(value, dict):
            resolve_input_paths(value, config, f"{where}{key}.")
            continue
        if key not in INPUT_PATH_FIELDS or not isinstance(value, str) or not value.strip() \
                or Path(value).is_absolute():
            continue
        near = base / value
        if near.exists():
            data[key] = str(near.resolve())
        elif Path(value).exists() and Path.cwd().resolve() != base.resolve():
            logging.getLogger(__name__).warning(
                "%s: %s%s: %r is read relative to the working directory (deprecated): paths in a "
                "config are relative to the config file (%s)", config, where, key, value,
                near.resolve())


def _strict_loader() -> type:
    """yaml.SafeLoader that rejects a key given twice in one mapping (YAML keeps the last one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def yaml_error_message(path: Path, exc: Exception) -> str:
    """`file:LINE:COLUMN: invalid YAML: problem` (1-based, where the parser stopped)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def load_config_plugins(plugins: Any, path: Path) -> None:
    """Import a config's `plugins:` list (modules or .py files, relative to the config file)."""
    if plugins is None:
        return
    if isinstance(plugins, str) or not isinstance(plugins, list) \
            or not all(isinstance(x, str) for x in plugins):
        raise ConfigError(f"{path}: plugins: expected a list of module names or .py paths")
    from .decorators import load_plugin_module

    for spec in plugins:
        local = (path.parent / spec) if spec.endswith(".py") else None
        if local is not None and not local.is_file() and not Path(spec).is_file():
            relative = "" if Path(spec).is_absolute() else ", relative to the config file"
            raise ConfigError(f"{path}: plugins: {spec}: file not found (looked for "
                              f"{local.resolve()}{relative})")
        try:
            load_plugin_module(str(local) if local is not None and local.is_file() else spec)
        except ConfigError as exc:
            raise ConfigError(f"{path}: plugins: {exc}") from None


def at(where: str, key: str) -> str:
    """`file: section.field` style location: `where` is a file (or `file: path`), `key` a field."""
    if not where:
        return key
    in_file = ": " in where or not (os.sep in where or where.endswith((".yaml", ".yml", ".json")))
    return f"{where}.{key}" if in_file else f"{where}: {key}"

#: integer fields that must be >= 1 whatever config class they belong to (TRL lets some through
#: until a Trainer or DataLoader fails on them)
POSITIVE_INTS = ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "num_generations", "max_completion_length",
                 "max_prompt_length", "max_length", "num_iterations", "generation_batch_size",
                 "steps_per_generation", "batch_size", "num_samples", "max_new_tokens")


def check_positive(data: Mapping[str, Any], where: str) -> None:
    """ConfigError for a non-positive value of a known count field."""
    for key in POSITIVE_INTS:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"{at(where, key)}: expected a positive integer, got {value!r}")


def check_strings(obj: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """ConfigError for a field of `obj` that is not a non-empty string (`optional` ones may be None)."""
    for name in required + optional:
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def suggest(key: str, names: list[str]) -> str:
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


#: names every command accepts for our fields (TRL-style), mapped to the field they set
FIELD_ALIASES: dict[str, str] = {"split": "dataset_split"}


def apply_aliases(data: Mapping[str, Any], names: Any, where: str) -> dict[str, Any]:
    """`data` with :data:`FIELD_ALIASES` keys renamed to the field of `names` they stand for."""
    out = dict(data)
    for alias, target in FIELD_ALIASES.items():
        if alias in out and alias not in names and target in names:
            if target in out:
                raise ConfigError(f"{at(where, alias)}: give either {alias!r} or {target!r}, not both")
            out[target] = out.pop(alias)
    return out


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Make `cls(**data)`, recursing into dataclass-typed fields; unknown keys are ConfigErrors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    from .options import coerce, field_hints

    names = _field_names(cls)
    hints = field_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in apply_aliases(data, names, where).items():
        if key not in names:
            raise ConfigError(f"{at(where, str(key))}: unknown field{suggest(str(key), names)}")
        nested = _nested_type(cls, key)
        if nested is not None and isinstance(value, Mapping):
            value = build_dataclass(nested, value, at(where, key))
        elif nested is None:  # a section may also be true/false (the settings resolve it)
            value = coerce(hints.get(key, Any), value, at(where, key))
        kwargs[key] = value
    check_positive(kwargs, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_locate_message(str(exc), names, where)) from None


def _locate_message(message: str, names: list[str], where: str) -> str:
    """`field: text` from a settings check -> `where.field: text` (else `where: message`)."""
    if message.startswith(where):
        return message
    head, sep, rest = message.partition(":")
    if sep and head.strip() in names:
        return f"{at(where, head.strip())}:{rest}"
    return f"{where}: {message}"


#: TRL `ModelConfig` / peft field names -> (our section, our field); see docs/pipeline.md
MODEL_CONFIG_NAMES: dict[str, tuple[str, str]] = {
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_target_modules": ("lora", "target_modules"),
    "lora_modules_to_save": ("lora", "modules_to_save"),
    "load_in_4bit": ("quantization", "load_in_4bit"),
    "bnb_4bit_quant_type": ("quantization", "quant_type"),
    "use_bnb_nested_quant": ("quantization", "double_quant"),
    "bnb_4bit_compute_dtype": ("quantization", "compute_dtype"),
    "bnb_4bit_quant_storage": ("quantization", "quant_storage"),
}


def map_model_config_names(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """TRL `ModelConfig` names (`use_peft`, `lora_r`, `load_in_4bit`, ...) as our `lora`/`quantization`."""
    out = dict(data)
    use_peft = out.pop("use_peft", None)
    moved: dict[str, dict[str, Any]] = {}
    for name, (section, field) in MODEL_CONFIG_NAMES.items():
        if name in out:
            moved.setdefault(section, {})[field] = out.pop(name)
    if use_peft is not None and not isinstance(use_peft, bool):
        raise ConfigError(f"{at(where, 'use_peft')}: expected true or false, got {use_peft!r}")
    if use_peft or "lora" in moved:
        moved.setdefault("lora", {})
    if use_peft is False and "lora" in moved and len(moved["lora"]) > 0:
        raise ConfigError(f"{at(where, 'use_peft')}: false, but LoRA fields are set")
    if "quantization" in moved and moved["quantization"].get("load_in_4bit") is False \
            and len(moved["quantization"]) == 1:
        moved.pop("quantization")  # load_in_4bit: false alone means no quantization
    for section, fields in moved.items():
        current = out.get(section)
        if current not in (None, True) and not isinstance(current, Mapping):
            raise ConfigError(f"{at(where, section)}: cannot combine {current!r} with "
                              f"{', '.join(n for n, (s, _) in MODEL_CONFIG_NAMES.items() if s == section)}")
        out[section] = {**(current if isinstance(current, Mapping) else {}), **fields}
    return out


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
    if {"lora", "quantization"} <= our_names:
        data = map_model_config_names(data, where)
    data = apply_aliases(data, our_names, where)
    trl_names = set(_field_names(trl_cls)) if trl_cls is not None else set()
    mine, trl = {}, {}
    for key, value in data.items():
        if key in our_names:
            mine[key] = value
        elif key in trl_names:
            trl[key] = value
        else:
            raise ConfigError(f"{at(where, str(key))}: unknown field"
                              f"{suggest(str(key), sorted(our_names | trl_names))}")
    settings = build_dataclass(ours, mine, where)
    if trl_cls is not None:
        trl = _located(trl_cls, trl, where)
        check_positive(trl, where)
    return settings, trl


def _located(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`data` coerced to `cls`'s field types, errors located as `where: field`."""
    from .options import coerce, field_hints

    hints = field_hints(cls)
    return {key: coerce(hints.get(key, Any), value, at(where, key)) for key, value in data.items()}


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
