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

from . import hookspecs
from .errors import PluginError
from .protocols import FAMILIES
from .registry import Provenance, PluginInfo, Registry, check_component

logger = logging.getLogger("rlhf_plugins")

ENTRY_POINT_GROUP = "rlhf_plugins"
DISTRIBUTION = "rlhf-plugins"

DEFAULT_PLUGINS = (
    "rlhf_plugins.builtin.chat_templates",
    "rlhf_plugins.builtin.masking",
    "rlhf_plugins.builtin.reward_heads",
    "rlhf_plugins.builtin.selection",
    "rlhf_plugins.builtin.advantages",
    "rlhf_plugins.builtin.rewards",
)


@dataclass
class _Source:
    """A plugin object plus where it came from."""

    name: str
    distribution: str | None
    version: str | None
    load: Callable[[], Any]
    builtin: bool = False


# Plugins added at runtime (rlhf_plugins.testing, scripts); name -> plugin object.
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


def _trace(message: str) -> None:
    if os.environ.get("RLHF_PLUGINS_TRACE", "") not in ("", "0"):
        print(f"rlhf_plugins trace: {message}", file=sys.stderr)


def _version() -> str:
    from . import __version__
    return __version__


def _sources() -> list[_Source]:
    """Every plugin to load, in order: built-ins, entry points (filtered), runtime extras."""
    sources = [
        _Source(name, DISTRIBUTION, _version(), lambda name=name: import_module(name), builtin=True)
        for name in DEFAULT_PLUGINS
    ]
    allow = _env_list("RLHF_PLUGINS_LOAD")
    block = _env_list("RLHF_PLUGINS_BLOCK") or set()
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP),
                 key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
    for ep in eps:
        dist = ep.dist.name if ep.dist else None
        keys = {_normalise(ep.name)} | ({_normalise(dist)} if dist else set())
        if allow is not None and not keys & allow:
            _trace(f"skipping {ep.name} ({dist}): not in RLHF_PLUGINS_LOAD")
            continue
        if keys & block:
            _trace(f"skipping {ep.name} ({dist}): in RLHF_PLUGINS_BLOCK")
            continue
        sources.append(_Source(ep.name, dist, ep.dist.version if ep.dist else None, ep.load))
    for name, obj in _extra_plugins.items():
        sources.append(_Source(name, None, None, lambda obj=obj: obj))
    return sources


def _register_one(pm: pluggy.PluginManager, registry: Registry, source: _Source) -> None:
    """Load, validate and run one plugin's hooks; on any error mark it failed and roll back."""
    info = PluginInfo(source.name, source.distribution, source.version)
    registry.plugins.append(info)
    provenance = Provenance(source.name, source.distribution, source.version)
    staged: list[tuple[str, str, Any, bool]] = []
    registered = False
    try:
        plugin = source.load()
        pm.register(plugin, name=source.name)
        registered = True
        pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
        for caller in pm.get_hookcallers(plugin) or []:
            info.hooks.append(caller.name)
        for family, spec in FAMILIES.items():
            impls = [i for i in getattr(pm.hook, spec.hook).get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                def register(component: Any, *, name: str | None = None, override: bool = False,
                             _family: str = family) -> None:
                    checked = check_component(FAMILIES[_family], component, name, source.name)
                    staged.append((_family, checked, component, override))
                _trace(f"calling {source.name}.{spec.hook}(register)")
                impl.function(**{argname: register for argname in impl.argnames})
        # Commit only when every hook of the plugin succeeded; collisions are checked here.
        committed: list[tuple[str, str]] = []
        try:
            for family, name, component, override in staged:
                fam = registry.families[family]
                previous = fam._entries.get(name)
                for message in fam.add(name, component, provenance, override):
                    logger.info(message)
                    registry.log.append(message)
                committed.append((family, name, previous))
                info.components.setdefault(family, []).append(name)
        except Exception:
            for family, name, previous in reversed(committed):
                if previous is None:
                    registry.families[family]._entries.pop(name, None)
                else:
                    registry.families[family]._entries[name] = previous
            raise
        _trace(f"{source.name}: registered {info.components or 'nothing'}")
    except Exception as exc:  # isolation: one broken plugin never breaks the others
        if registered:
            pm.unregister(name=source.name)
        info.status = "failed"
        info.components = {}
        info.error = f"{type(exc).__name__}: {exc}"
        _trace(f"{source.name} failed: {info.error}")
        if source.builtin or _strict() or not isinstance(exc, Exception):
            raise
        logger.warning("plugin %s failed to load: %s", source.name, info.error)


def build_registry() -> Registry:
    """Load every plugin into a fresh Registry."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    for source in _sources():
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
