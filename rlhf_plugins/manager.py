"""Loads plugins with pluggy: built-ins, entry points (each in isolation), runtime extras."""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

import rlhf_plugins.hookspecs as hookspecs  # the module (pluggy reads its specs), not the package
from .errors import PluginError
from .protocols import FAMILIES
from .registry import Provenance, PluginInfo, Registry, check_component
from .version import __version__

logger = logging.getLogger("rlhf_plugins")

ENTRY_POINT_GROUP = "rlhf_plugins"
DISTRIBUTION = "rlhf-plugins"

DEFAULT_PLUGINS = (
    "rlhf_plugins.builtin.chat_templates",
    "rlhf_plugins.builtin.harmony_template",
    "rlhf_plugins.builtin.masking",
    "rlhf_plugins.builtin.reward_heads",
    "rlhf_plugins.builtin.selection",
    "rlhf_plugins.builtin.advantages",
    "rlhf_plugins.builtin.rewards",
    "rlhf_plugins.builtin.policy_losses",
    "rlhf_plugins.builtin.preference_losses",
    "rlhf_plugins.builtin.trl_rewards",
    "rlhf_plugins.stages.builtin",
)


@dataclass
class _Source:
    """A plugin to load: a callable that registers it with the manager and returns it."""

    name: str
    load: Callable[[pluggy.PluginManager], Any]
    builtin: bool = False


# Plugins added at runtime (rlhf_plugins.testing, scripts, --plugin); name -> plugin object.
_extra_plugins: dict[str, Any] = {}
_lock = threading.RLock()
_cached: Registry | None = None


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {_normalise(x) for x in value.split(",") if x.strip()}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _strict() -> bool:
    return os.environ.get("RLHF_PLUGINS_STRICT", "") not in ("", "0", "false", "False")


def _tracing() -> bool:
    return os.environ.get("RLHF_PLUGINS_TRACE", "") not in ("", "0")


def _trace(message: str) -> None:
    if _tracing():
        print(f"rlhf_plugins trace: {message}", file=sys.stderr)


def _version() -> str:
    return __version__


def _register_object(name: str, obj: Any) -> Callable[[pluggy.PluginManager], Any]:
    def load(pm: pluggy.PluginManager) -> Any:
        if pm.is_blocked(name):  # an entry point of that name was filtered out: the object wins
            pm.unblock(name)
        return obj if pm.register(obj, name=name) is not None else None
    return load


def _register_module(module: str) -> Callable[[pluggy.PluginManager], Any]:
    def load(pm: pluggy.PluginManager) -> Any:
        plugin = import_module(module)
        pm.register(plugin, name=module)
        return plugin
    return load


def _register_entry_point(name: str) -> Callable[[pluggy.PluginManager], Any]:
    def load(pm: pluggy.PluginManager) -> Any:
        # pluggy imports the entry point and records its distribution (list_plugin_distinfo)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        return pm.get_plugin(name)
    return load


def _sources(pm: pluggy.PluginManager) -> list[_Source]:
    """Every plugin to load, in order: built-ins, entry points (filtered before import), extras."""
    sources = [_Source(name, _register_module(name), builtin=True) for name in DEFAULT_PLUGINS]
    allow = _env_list("RLHF_PLUGINS_LOAD")
    block = _env_list("RLHF_PLUGINS_BLOCK") or set()
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP),
                 key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
    for ep in eps:
        dist = ep.dist.name if ep.dist else None
        keys = {_normalise(ep.name)} | ({_normalise(dist)} if dist else set())
        if allow is not None and not keys & allow:
            _trace(f"skipping {ep.name} ({dist}): not in RLHF_PLUGINS_LOAD")
            pm.set_blocked(ep.name)
            continue
        if keys & block:
            _trace(f"skipping {ep.name} ({dist}): in RLHF_PLUGINS_BLOCK")
            pm.set_blocked(ep.name)
            continue
        sources.append(_Source(ep.name, _register_entry_point(ep.name)))
    for name, obj in _extra_plugins.items():
        sources.append(_Source(name, _register_object(name, obj)))
    return sources


def _distribution(pm: pluggy.PluginManager, plugin: Any, builtin: bool) -> tuple[str | None, str | None]:
    """(distribution, version) of a loaded plugin, from pluggy's dist-info bookkeeping."""
    if builtin:
        return DISTRIBUTION, _version()
    for obj, dist in pm.list_plugin_distinfo():
        if obj is plugin:
            return dist.project_name, dist.version
    return None, None


def _register_one(pm: pluggy.PluginManager, registry: Registry, source: _Source) -> None:
    """Load, validate and run one plugin's hooks; on any error mark it failed and roll back."""
    info = PluginInfo(source.name, None, None)
    registry.plugins.append(info)
    staged: list[tuple[str, str, Any, bool]] = []
    plugin = None
    try:
        plugin = source.load(pm)
        if plugin is None:
            raise PluginError(f"entry point {source.name!r} loaded nothing")
        info.distribution, info.version = _distribution(pm, plugin, source.builtin)
        pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
        for caller in pm.get_hookcallers(plugin) or []:
            info.hooks.append(caller.name)
        others = [p for p in pm.get_plugins() if p is not plugin]
        for family, spec in FAMILIES.items():
            if spec.hook not in info.hooks:
                continue

            def register(component: Any, *, name: str | None = None, override: bool = False,
                         _family: str = family) -> None:
                checked = check_component(FAMILIES[_family], component, name, source.name)
                staged.append((_family, checked, component, override))
            # this plugin's implementations only: one plugin's failure never touches another's
            pm.subset_hook_caller(spec.hook, remove_plugins=others)(register=register)
        _commit(registry, info, staged, Provenance(source.name, info.distribution, info.version))
        _trace(f"{source.name}: registered {info.components or 'nothing'}")
    except Exception as exc:  # isolation: one broken plugin never breaks the others
        if plugin is not None and pm.is_registered(plugin):
            pm.unregister(plugin)
        info.status = "failed"
        info.components = {}
        info.error = f"{type(exc).__name__}: {exc}"
        _trace(f"{source.name} failed: {info.error}")
        if source.builtin or not isinstance(exc, Exception):
            raise
        if _strict():
            raise PluginError(f"plugin {source.name!r}"
                              + (f" ({info.distribution} {info.version})" if info.distribution else "")
                              + f" failed to load: {info.error}") from exc
        logger.warning("plugin %s failed to load: %s", source.name, info.error)


def _commit(registry: Registry, info: PluginInfo, staged: list[tuple[str, str, Any, bool]],
            provenance: Provenance) -> None:
    """Add a plugin's staged components; collisions roll every one of them back."""
    committed: list[tuple[str, str, Any]] = []
    try:
        for family, name, component, override in staged:
            fam = registry.families[family]
            previous = fam.entry(name)
            for message in fam.add(name, component, provenance, override):
                logger.info(message)
                registry.log.append(message)
            committed.append((family, name, previous))
            info.components.setdefault(family, []).append(name)
    except Exception:
        for family, name, previous in reversed(committed):
            registry.families[family].restore(name, previous)
        raise


def _monitor(pm: pluggy.PluginManager) -> None:
    """RLHF_PLUGINS_TRACE: print every hook call through pluggy's own monitoring."""
    def before(hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        for impl in hook_impls:
            print(f"rlhf_plugins trace: calling {impl.plugin_name}.{hook_name}(register)",
                  file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        if outcome.exception is not None:
            print(f"rlhf_plugins trace: {hook_name} raised {outcome.exception!r}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def build_registry() -> Registry:
    """Load every plugin into a fresh Registry."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if _tracing():
        _monitor(pm)
    registry = Registry()
    for source in _sources(pm):
        _register_one(pm, registry, source)
    return registry


def registry(reload: bool = False) -> Registry:
    """The loaded registry: built once and cached; `reload=True` rebuilds it."""
    global _cached
    with _lock:
        if _cached is None or reload:
            _cached = build_registry()
        return _cached


def add_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object at runtime (tests, scripts); returns its name. Reloads lazily."""
    global _cached
    name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
    with _lock:
        if name in _extra_plugins and _extra_plugins[name] is not plugin:
            raise PluginError(f"a runtime plugin named {name!r} is already registered")
        _extra_plugins[name] = plugin
        _cached = None
    return name


def remove_plugin(name: str) -> None:
    """Undo `add_plugin`."""
    global _cached
    with _lock:
        _extra_plugins.pop(name, None)
        _cached = None
