"""Families of named components, with provenance, collision policy and did-you-mean."""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ComponentTypeError, ConfigError, DuplicateComponentError, UnknownComponentError
from .protocols import FAMILIES, FamilySpec, missing_members

T = TypeVar("T")

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Provenance:
    """Where a component came from."""

    plugin: str
    distribution: str | None
    version: str | None
    overrides: "Provenance | None" = None

    def label(self) -> str:
        """`plugin (distribution version)` for messages."""
        dist = " ".join(x for x in (self.distribution, self.version) if x)
        return f"{self.plugin} ({dist})" if dist else self.plugin

    def as_dict(self) -> dict[str, Any]:
        out = {"plugin": self.plugin, "distribution": self.distribution, "version": self.version}
        if self.overrides is not None:
            out["overrides"] = self.overrides.as_dict()
        return out


def describe(component: Any) -> str:
    """The one-line description of a component (its `description` or docstring's first line)."""
    text = getattr(component, "description", None)
    if not isinstance(text, str) or not text.strip():
        text = inspect.getdoc(component) or ""
    return text.strip().splitlines()[0] if text.strip() else ""


def component_options(component: Any) -> list[dict[str, Any]]:
    """The options a component declares: its dataclass fields (current values as defaults)."""
    import dataclasses

    from .options import options_schema

    schema = getattr(component, "options_schema", None)
    if callable(schema) and not dataclasses.is_dataclass(component):
        return list(schema())
    if dataclasses.is_dataclass(component) and not isinstance(component, type):
        return options_schema(type(component), component)
    return []


def default_name(component: Any) -> Any:
    """The name a component registers under when `register` is not given one."""
    name = getattr(component, "name", None)
    if name is None and (inspect.isfunction(component) or inspect.isclass(component)):
        name = component.__name__
    return name


def check_component(spec: FamilySpec, component: Any, name: Any, plugin: str) -> str:
    """Validate `component` for family `spec`; return its name or raise ComponentTypeError."""
    if name is None:
        name = default_name(component)
    where = f"plugin {plugin!r}, family {spec.name}"
    if not isinstance(name, str):
        raise ComponentTypeError(
            f"{where}: component {component!r} needs a string name (got {type(name).__name__}); "
            "pass register(component, name='...') or give it a `name` attribute")
    if not NAME_RE.match(name):
        raise ComponentTypeError(
            f"{where}: invalid component name {name!r} (letters, digits, '_', '-', '.'; no spaces)")
    missing = missing_members(component, spec)
    if missing:
        raise ComponentTypeError(
            f"{where}: component {name!r} does not satisfy {spec.protocol.__name__}: "
            f"missing {', '.join(missing)}")
    return name


@dataclass
class Entry(Generic[T]):
    component: T
    provenance: Provenance


@dataclass
class Family(Generic[T]):
    """The components of one family, by name."""

    spec: FamilySpec
    _entries: dict[str, Entry[T]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def add(self, name: str, component: T, provenance: Provenance, override: bool) -> list[str]:
        """Add a validated component; returns log messages (overrides)."""
        existing = self._entries.get(name)
        if existing is not None and not override:
            raise DuplicateComponentError(
                f"{self.name}: {name!r} is registered by both {existing.provenance.label()} and "
                f"{provenance.label()}; pass register(..., override=True) to replace it")
        messages = []
        if existing is not None:
            provenance = Provenance(provenance.plugin, provenance.distribution, provenance.version,
                                    overrides=existing.provenance)
            messages.append(f"{self.name}: {name!r} from {existing.provenance.label()} "
                            f"overridden by {provenance.label()}")
        self._entries[name] = Entry(component, provenance)
        return messages

    def entry(self, name: str) -> Entry[T] | None:
        """The entry (component + provenance) registered as `name`, or None."""
        return self._entries.get(name)

    def entries(self) -> list[tuple[str, Entry[T]]]:
        """(name, entry) of every component, in registration order."""
        return list(self._entries.items())

    def restore(self, name: str, entry: Entry[T] | None) -> None:
        """Put `entry` back as `name` (None removes the name): rolls back an `add`."""
        if entry is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = entry

    def get(self, name: str, **options: Any) -> T:
        """The component called `name`, configured with `options` when given."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownComponentError(self.unknown_message(name))
        if not options:
            return entry.component
        configure: Callable[..., T] | None = getattr(entry.component, "configure", None)
        if configure is None:
            raise ConfigError(f"{self.name} component {name!r} takes no options "
                              f"(got {', '.join(sorted(options))})")
        return configure(**options)

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        available = ", ".join(names) if names else "(none)"
        return (f"unknown {self.name} component {name!r}.{hint} Available: {available}. "
                "A plugin package may provide it: install it, then check `rlhf-plugins plugins`; "
                "or load your own module with `--plugin FILE_OR_MODULE` or a config's `plugins:` list.")

    def names(self) -> list[str]:
        """Sorted component names."""
        return sorted(self._entries)

    def provenance(self, name: str) -> Provenance:
        """Which plugin/distribution/version registered `name`."""
        self.get(name)
        return self._entries[name].provenance

    def description(self, name: str) -> str:
        return describe(self.get(name))

    def options(self, name: str) -> list[dict[str, Any]]:
        """name/type/default/help of each option of component `name` (empty when it has none)."""
        return component_options(self.get(name))

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._entries[name].component

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as `rlhf-plugins plugins` shows it."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "hooks": self.hooks, "components": self.components, "status": self.status,
                "error": self.error}


class Registry:
    """Every family's components plus what each plugin did; build it with `rlhf_plugins.registry()`."""

    def __init__(self) -> None:
        self.families: dict[str, Family[Any]] = {name: Family(spec) for name, spec in FAMILIES.items()}
        self.plugins: list[PluginInfo] = []
        self.log: list[str] = []

    def family(self, name: str) -> Family[Any]:
        """The family called `name` (UnknownComponentError with the family names otherwise)."""
        try:
            return self.families[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self.families), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown plugin family {name!r}.{hint} Available: {', '.join(self.families)}"
            ) from None

    def get(self, family: str, name: str, **options: Any) -> Any:
        """Shortcut for `registry.family(family).get(name, **options)`."""
        return self.family(family).get(name, **options)

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.status != "ok"]


def _family_property(name: str) -> property:
    return property(lambda self: self.families[name], doc=f"The {name} family.")


# `registry().chat_templates`, ...: one property per family of the table
for _name in FAMILIES:
    setattr(Registry, _name, _family_property(_name))
