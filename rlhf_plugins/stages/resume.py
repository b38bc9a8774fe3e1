"""Resume safety for stage commands: an output dir remembers the config that wrote it, and
nothing in it that the project did not write is ever removed.

Every stage (``sft``, ``rm``, ``sample``, ``ppo``, run alone or by the pipeline) records in
``<output_dir>/rlhf_plugins_run.json`` a hash of its whole config (our settings and the TRL
fields, ``resume`` and ``overwrite`` left out) and of the versions of the plugins that provide the
components it uses (template, masking, head, reward functions, selection rule, estimator, policy
loss, ...). A finished run adds ``"finished": true`` and the names of the entries it left.

What a run finds in its output folder decides what it does (:func:`output_state`, before any
model loads; :func:`check_run_config` acts on it just before training):

- nothing (or no folder): a fresh run;
- a finished run of the same hash: nothing to do - the stage says so and returns its recorded
  result without a training step (``overwrite`` retrains);
- an interrupted run of the same hash: it resumes from its last checkpoint;
- a run of another hash (a changed field or an upgraded plugin) whose entries are all ours: the
  folder is **cleared** (logged) and training starts at step 0;
- anything no record of ours claims (:func:`unclaimed_entries`): a ConfigError naming the first
  few, exit 2, before any model loads; ``overwrite: true`` / ``--overwrite`` empties the folder.

Ours means: the folder holds one of our records (this file, ``rlhf_plugins_stage.json``, the
pipeline's ``stage_started.json`` / ``stage_done.json``). A record of a finished run lists the
entries it left, and only those (and the records) are ours; while a run is unfinished everything
in its folder appeared after its record was written, so all of it is ours.
``sample`` keeps its ``cache`` when clearing: each chunk's key already holds everything it
depends on (including these plugin versions), so only provably identical work is reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

from ..errors import ConfigError
from ..models import STAGE_FILE

__all__ = ["COMPONENT_FIELDS", "DONE_FILE", "RECORD_FILES", "RUN_FILE", "STARTED_FILE",
           "OutputState", "check_run_config", "clear_folder", "finish_run", "folder_entries",
           "output_state",
           "plugin_versions", "run_hash", "settings_components", "unclaimed_entries",
           "unclaimed_error"]

RUN_FILE = "rlhf_plugins_run.json"
#: the pipeline's records of one stage's folder (stage_runs.py)
DONE_FILE = "stage_done.json"
STARTED_FILE = "stage_started.json"
#: the records our runs write; a folder holding one of them is a run folder of ours
RECORD_FILES = (RUN_FILE, STAGE_FILE, STARTED_FILE, DONE_FILE)
#: how many unclaimed entries an error names
_NAMED = 5

#: settings fields that name components, and their family
COMPONENT_FIELDS: dict[str, str] = {
    "template": "chat_templates",
    "masking": "masking_strategies",
    "head": "reward_heads",
    "selection": "selection_rules",
    "advantage_estimator": "advantage_estimators",
    "reward_functions": "reward_functions",
    "policy_loss": "policy_losses",
    "group_filter": "selection_rules",
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
    data.pop("overwrite", None)  # how the folder is treated, not what is trained
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


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def unclaimed_entries(folder: str | os.PathLike) -> list[str]:
    """Names of the entries of `folder` that no record of ours claims (sorted; [] when none).

    A folder without a readable record of ours claims nothing. Records of a finished run list
    the entries it left (``entries``): then those and the records are claimed, nothing else.
    Records without a list (a run not finished) claim the whole folder: everything in it
    appeared after the record was written, since a run records itself only in a folder with
    nothing unclaimed (or one it was told to empty).
    """
    out = Path(folder)
    names = _entries(out)
    records = [r for r in (_recorded(out / name) for name in RECORD_FILES if name in names)
               if r is not None]
    if not records:
        return names
    listed = [set(r["entries"]) for r in records if isinstance(r.get("entries"), list)]
    if not listed:
        return []
    claimed = set(RECORD_FILES).union(*listed)
    return [name for name in names if name not in claimed]


def folder_entries(folder: str | os.PathLike) -> list[str]:
    """The names in `folder` (sorted; [] when it does not exist), as a record lists them."""
    return _entries(Path(folder))


def unclaimed_error(folder: str | os.PathLike, names: list[str],
                    where: str = "output_dir") -> ConfigError:
    """The one-line error for `names`, entries of `folder` that no record of ours claims."""
    shown = ", ".join(names[:_NAMED])
    if len(names) > _NAMED:
        shown += f" (and {len(names) - _NAMED} more)"
    count = f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
    return ConfigError(f"{where}: {folder} holds {count} that no run of rlhf-plugins recorded: "
                       f"{shown}; move them away, choose another output_dir, or pass --overwrite "
                       "(overwrite: true) to replace them")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _check_overwritable(folder: Path, where: str, settings: Any) -> None:
    """ConfigError when emptying `folder` would remove the working directory, home, or an input
    of this run (a setting naming an existing path inside it: the dataset, the model, ...)."""
    target = folder.expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == home or target == cwd or target in cwd.parents or target == Path(target.anchor):
        raise ConfigError(f"{where}: overwrite would empty {target}, which holds the working "
                          "directory (or is home); give a folder of its own")
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}
    for text in _strings(data):
        try:
            path = Path(text).expanduser().resolve()
            inside = path.exists() and (path == target or target in path.parents)
        except (OSError, ValueError):
            continue
        if inside:
            raise ConfigError(f"{where}: overwrite would empty {target}, which holds {text}, an "
                              "input of this run; give the outputs a folder of their own")


def clear_folder(folder: str | os.PathLike, keep: Iterable[str] = ()) -> list[str]:
    """Remove every entry of `folder` but those named in `keep`; returns the names removed."""
    out = Path(folder)
    removed = []
    for name in _entries(out):
        if name in keep:
            continue
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(name)
    return removed


@dataclass
class OutputState:
    """What a stage's output folder holds for this config (see the module docstring)."""

    digest: str
    versions: dict[str, str]
    #: "fresh" (nothing of ours), "finished" (this config's run is done: nothing to do),
    #: "resume" (this config's run was interrupted) or "clear" (another config's, or overwrite)
    action: str
    #: the previous run's record (None: none)
    record: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Whether the folder holds a finished run of this config (nothing to do)."""
        return self.action == "finished"


def output_state(output_dir: str | os.PathLike, stage: str, settings: Any,
                 trl_kwargs: Mapping[str, Any] | None = None, *,
                 where: str = "output_dir") -> OutputState:
    """What `output_dir` holds for this run (reads only). ConfigError, before any model loads,
    when it holds entries no record of ours claims and `settings.overwrite` is not set."""
    out = Path(output_dir)
    digest, versions = run_hash(stage, settings, trl_kwargs)
    overwrite = bool(getattr(settings, "overwrite", False))
    record = _recorded(out / RUN_FILE)
    same = record is not None and record.get("hash") == digest
    if overwrite and _entries(out):
        _check_overwritable(out, where, settings)
        return OutputState(digest, versions, "clear", record)
    if same and record.get("finished"):
        return OutputState(digest, versions, "finished", record)
    foreign = unclaimed_entries(out)
    if foreign:
        raise unclaimed_error(out, foreign, where)
    if same:
        return OutputState(digest, versions, "resume", record)
    leftovers = [n for n in _entries(out) if n not in (STARTED_FILE, DONE_FILE)]
    return OutputState(digest, versions, "clear" if leftovers else "fresh", record)


def check_run_config(output_dir: str | os.PathLike, stage: str, settings: Any,
                     trl_kwargs: Mapping[str, Any] | None = None, *,
                     keep: Iterable[str] = ()) -> str:
    """Just before training: clear what another config (or `overwrite`) leaves to clear, and
    record this run's config hash in `output_dir`. Returns the hash.

    `keep` names entries kept when another config's folder is cleared (not on overwrite). The
    pipeline's ``stage_started.json`` is always kept. Only the main process touches files
    (under accelerate the others wait).
    """
    from ..cache import atomic_write_json
    from .distributed import is_main_process, main_process_first, wait_for_everyone

    out = Path(output_dir)
    state = output_state(out, stage, settings, trl_kwargs)
    # Every process reads the folder before the main one writes to it: a late process would
    # otherwise find the main one's temporary record file and call it a stranger's.
    wait_for_everyone()
    with main_process_first():
        if not is_main_process():
            return state.digest
        if state.action == "clear":
            overwrite = bool(getattr(settings, "overwrite", False))
            record = state.record or {}
            changed = sorted(k for k in set(state.versions) | set(record.get("plugins", {}))
                             if state.versions.get(k) != record.get("plugins", {}).get(k))
            why = ("overwrite is set" if overwrite else "its config or plugin versions changed"
                   if state.record is not None else "it holds only files of earlier runs")
            removed = clear_folder(out, {STARTED_FILE, *(() if overwrite else keep)})
            logger.warning("%s: starting afresh in %s: %s (removed %d entr%s%s)", stage, out, why,
                           len(removed), "y" if len(removed) == 1 else "ies",
                           f"; plugins changed: {', '.join(changed)}"
                           if state.record and changed and not overwrite else "")
        out.mkdir(parents=True, exist_ok=True)
        if state.action != "resume":
            atomic_write_json(out / RUN_FILE, {"stage": stage, "hash": state.digest,
                                               "plugins": state.versions})
    return state.digest


def finish_run(output_dir: str | os.PathLike) -> None:
    """Mark the run recorded in `output_dir` finished, listing the entries it left (main process)."""
    from ..cache import atomic_write_json

    out = Path(output_dir)
    record = _recorded(out / RUN_FILE)
    if record is None:  # a stage run outside the stage commands (a test's own loop)
        return
    record["finished"] = True
    record["entries"] = sorted({*_entries(out), RUN_FILE})
    atomic_write_json(out / RUN_FILE, record)
