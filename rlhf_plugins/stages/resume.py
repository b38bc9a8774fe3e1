"""Resume safety for stage commands: an output dir remembers the config that wrote it.

Every stage (``sft``, ``rm``, ``sample``, ``ppo``, run alone or by the pipeline) records in
``<output_dir>/rlhf_plugins_run.json`` a hash of its whole config (our settings and the TRL
fields, ``resume`` left out) and of the versions of the plugins that provide the components it
uses (template, masking, head, reward functions, selection rule, estimator, policy loss, ...).

- Same hash: an interrupted run resumes from its last checkpoint.
- Different hash (a changed field or an upgraded plugin), or checkpoints with no record: the
  stage **starts clean** - the old ``checkpoint-*`` folders are removed (logged as a warning)
  and training starts at step 0. Other files in the folder are left alone (the artifact and
  metrics are rewritten at the end). This mirrors the pipeline, which clears a stage's folder
  when its hash changes.
- ``sample`` keeps its cache: each chunk's key already holds everything it depends on
  (including these plugin versions), so only provably identical work is reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["COMPONENT_FIELDS", "RUN_FILE", "check_run_config", "plugin_versions", "run_hash",
           "settings_components"]

RUN_FILE = "rlhf_plugins_run.json"

#: settings fields that name components, and their family
COMPONENT_FIELDS: dict[str, str] = {
    "template": "chat_templates",
    "masking": "masking_strategies",
    "head": "reward_heads",
    "selection": "selection_rules",
    "advantage_estimator": "advantage_estimators",
    "reward_functions": "reward_functions",
    "policy_loss": "policy_losses",
}


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        name = value.get("name")
        return [name] if isinstance(name, str) else []
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _names(v)]
    return []


def settings_components(settings: Any) -> dict[str, list[str]]:
    """family -> component names a stage's settings use (fields of :data:`COMPONENT_FIELDS`)."""
    out: dict[str, list[str]] = {}
    for field, family in COMPONENT_FIELDS.items():
        names = _names(getattr(settings, field, None))
        if names:
            out.setdefault(family, []).extend(names)
    return out


def plugin_versions(components: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """``family/name`` -> ``plugin (distribution version)`` of the plugin providing each component."""
    from .. import registry

    reg = registry()
    out: dict[str, str] = {}
    for family, names in components.items():
        fam = reg.family(family)
        for name in names:
            if name in fam:
                out[f"{family}/{name}"] = fam.provenance(name).label()
    return dict(sorted(out.items()))


def _stable(value: Any) -> Any:
    """JSON-able `value`, callables by qualified name (their repr holds a memory address)."""
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if callable(value) and not isinstance(value, type):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        module = getattr(value, "__module__", None) or type(value).__module__
        return f"<callable {module}.{name}>"
    return value


def _settings_dict(settings: Any) -> dict[str, Any]:
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    data.pop("resume", None)
    return _stable(data)


def run_hash(stage: str, settings: Any, trl_kwargs: Mapping[str, Any] | None = None) -> tuple[str, dict[str, str]]:
    """(hash of the stage's config and its components' plugin versions, those versions)."""
    from ..config import config_hash

    versions = plugin_versions(settings_components(settings))
    trl = _stable({k: v for k, v in dict(trl_kwargs or {}).items() if k != "resume_from_checkpoint"})
    return config_hash(stage, _settings_dict(settings), trl, versions), versions


def _recorded(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_run_config(output_dir: str | os.PathLike, stage: str, settings: Any,
                     trl_kwargs: Mapping[str, Any] | None = None) -> str:
    """Record this run's config hash in `output_dir`; clear checkpoints another config left.

    Returns the hash. Only the main process touches files (under accelerate the others wait).
    """
    from ..cache import atomic_write_json
    from .distributed import is_main_process, main_process_first

    out = Path(output_dir)
    digest, versions = run_hash(stage, settings, trl_kwargs)
    with main_process_first():
        if not is_main_process():
            return digest
        record = _recorded(out / RUN_FILE)
        checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir()) if out.is_dir() else []
        if checkpoints and (record is None or record.get("hash") != digest):
            why = ("its config or plugin versions changed" if record is not None
                   else "they were written by an unrecorded config")
            changed = sorted(k for k in set(versions) | set((record or {}).get("plugins", {}))
                             if versions.get(k) != (record or {}).get("plugins", {}).get(k))
            logger.warning("%s: %s holds checkpoints but %s; starting afresh (removing %d "
                           "checkpoint(s)%s)", stage, out, why, len(checkpoints),
                           f"; plugins changed: {', '.join(changed)}" if record and changed else "")
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, {"stage": stage, "hash": digest, "plugins": versions})
    return digest
