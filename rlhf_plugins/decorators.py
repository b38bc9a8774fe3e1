"""Register components from a script, without writing a plugin: one decorator per family.

``@rlhf_plugins.reward_function`` (a function), ``@rlhf_plugins.selection_rule`` (a class or
an instance), ... Each decorated component is registered by the runtime plugin ``__script__``
the next time the registry is built. `load_plugin_module` imports a module or ``.py`` file
that uses them (the CLI's ``--plugin`` flag and a config's ``plugins:`` list).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .hookspecs import hookimpl
from .manager import add_plugin
from .protocols import FAMILIES

SCRIPT_PLUGIN = "__script__"


class _ScriptPlugin:
    """The runtime plugin that holds components registered by decorators, per family: one
    `register_<family>` hook implementation per family of the table (`protocols.FAMILIES`)."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, tuple[Any, bool]]] = {f: {} for f in FAMILIES}
        for family, spec in FAMILIES.items():
            setattr(self, spec.hook, self._hook(family))

    def _hook(self, family: str) -> Callable[..., None]:
        @hookimpl
        def register_all(register: Callable[..., None]) -> None:
            for name, (component, override) in self.components[family].items():
                register(component, name=name, override=override)
        register_all.__name__ = register_all.__qualname__ = FAMILIES[family].hook
        return register_all


_script = _ScriptPlugin()


def _origin(obj: Any) -> tuple[str, str]:
    """(module, qualified name) of a decorated function or class: the same after a reload."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    module = getattr(target, "__module__", "") or ""
    if module.startswith("rlhf_plugins_user_"):  # a --plugin file: name it by its path
        module = getattr(sys.modules.get(module), "__file__", None) or module
    return module, getattr(target, "__qualname__", repr(target))


def _check_collision(family: str, key: str, obj: Any) -> None:
    """DuplicateComponentError when `key` is taken in `family` by another plugin or by another
    object of this script: only the duplicate is refused, never the script's other components."""
    from .errors import DuplicateComponentError
    from .manager import registry

    previous = _script.components[family].get(key)
    if previous is not None:
        before = _origin(previous[0])
        if before != _origin(obj):
            raise DuplicateComponentError(
                f"{family}: {key!r} is registered twice by decorators ({':'.join(before)} and "
                f"{':'.join(_origin(obj))}); give one of them another name (name=...)")
        return
    entry = registry().family(family).entry(key)
    if entry is not None and entry.provenance.plugin != SCRIPT_PLUGIN:
        raise DuplicateComponentError(
            f"{family}: {key!r} is already registered by {entry.provenance.label()}; pass "
            "override=True to replace it, or give yours another name (name=...)")


def _decorator(family: str, instantiate: bool) -> Callable[..., Any]:
    def decorator(obj: Any = None, *, name: str | None = None, override: bool = False) -> Any:
        def decorate(o: Any) -> Any:
            component = o() if instantiate and inspect.isclass(o) else o
            key = name or getattr(component, "name", None) or getattr(o, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ConfigError(f"@{family}: {o!r} needs a name (pass name=...)")
            if not override:
                _check_collision(family, key, o)
            # a later registration of the same object (a reloaded script) replaces the earlier
            # one; a name taken by another component is refused above, and either way every
            # other component registered from the module is kept
            _script.components[family][key] = (component, override)
            add_plugin(_script, SCRIPT_PLUGIN)  # invalidates the cached registry
            return o
        return decorate(obj) if obj is not None else decorate
    decorator.__doc__ = f"Register a {family} component from a script (bare or with name=/override=)."
    return decorator


# one decorator per family, named in the family table: `rlhf_plugins.chat_template`, ...
for _spec in FAMILIES.values():
    globals()[_spec.decorator] = _decorator(_spec.name, instantiate=_spec.instantiate)


def load_plugin_module(spec: str) -> Any:
    """Import a module (`pkg.mod`) or a `.py` file that registers components; ConfigError if it fails."""
    from .manager import registry

    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise ConfigError(f"--plugin {spec}: file not found (looked for {path.resolve()})")
            mod_name = f"rlhf_plugins_user_{abs(hash(str(path.resolve()))):x}"
            if mod_name in sys.modules:
                return sys.modules[mod_name]
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            sys.modules[mod_name] = module
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's plugin's
        sys.modules.pop(locals().get("mod_name", ""), None)
        raise ConfigError(f"--plugin {spec}: {type(exc).__name__}: {exc}") from None
    # a module that defines hook implementations is a plugin object of its own (any @hookimpl:
    # a misspelled hook name then fails the plugin instead of being silently ignored)
    if any(hasattr(value, "rlhf_plugins_impl") for value in list(vars(module).values())):
        add_plugin(module, getattr(module, "__name__", spec))
    failed = [p for p in registry().plugins if p.status != "ok"]
    for p in failed:
        if p.name in (SCRIPT_PLUGIN, getattr(module, "__name__", spec)):
            raise ConfigError(f"--plugin {spec}: {p.error}")
    return module
