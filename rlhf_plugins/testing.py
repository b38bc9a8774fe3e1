"""Test kit for plugin authors: register a plugin for one test, unregister it after.

Usage in a test (the fixtures are available automatically once rlhf-plugins is installed)::

    def test_my_template(rlhf_plugin):
        reg = rlhf_plugin(MyPlugin())          # registered, registry rebuilt
        assert "mine" in reg.chat_templates.names()

or without pytest::

    with registered_plugin(MyPlugin()) as reg:
        ...
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .hookspecs import hookimpl
from .manager import add_plugin, registry, remove_plugin
from .protocols import FAMILIES
from .registry import Registry


@contextmanager
def registered_plugin(plugin: Any, name: str | None = None) -> Iterator[Registry]:
    """Register `plugin` (an object or module with hookimpls) for the duration of the block."""
    name = add_plugin(plugin, name)
    try:
        yield registry(reload=True)
    finally:
        remove_plugin(name)


def component_plugin(family: str, component: Any, *, name: str | None = None,
                     override: bool = False) -> Any:
    """A plugin object whose only job is to register one component in `family`."""
    spec = FAMILIES[family]

    class _OneComponent:
        pass

    def impl(register: Callable[..., None]) -> None:
        register(component, name=name, override=override)

    impl.__name__ = spec.hook
    setattr(_OneComponent, spec.hook, staticmethod(hookimpl(impl)))
    return _OneComponent()


try:  # pytest fixtures, when pytest is present (this module is also a pytest11 plugin)
    import pytest

    @pytest.fixture
    def rlhf_plugin() -> Iterator[Callable[..., Registry]]:
        """Fixture: `rlhf_plugin(plugin, name=None)` registers a plugin until the test ends."""
        names: list[str] = []

        def register(plugin: Any, name: str | None = None) -> Registry:
            names.append(add_plugin(plugin, name))
            return registry(reload=True)

        yield register
        for n in names:
            remove_plugin(n)
        registry(reload=True)

    @pytest.fixture
    def rlhf_registry() -> Registry:
        """Fixture: a freshly rebuilt registry."""
        return registry(reload=True)
except ImportError:  # pragma: no cover - pytest not installed
    pass
