"""`@reward_function`: register a reward function from a script without writing a plugin."""
from __future__ import annotations

from typing import Any, Callable

from .hookspecs import hookimpl
from .manager import add_plugin

SCRIPT_PLUGIN = "__script__"


class _ScriptPlugin:
    """The runtime plugin that holds components registered by decorators."""

    def __init__(self) -> None:
        self.reward_functions: list[tuple[Callable[..., Any], str | None, bool]] = []

    @hookimpl
    def register_reward_functions(self, register):
        for func, name, override in self.reward_functions:
            register(func, name=name, override=override)


_script = _ScriptPlugin()


def reward_function(func: Callable[..., Any] | None = None, *, name: str | None = None,
                    override: bool = False) -> Any:
    """Register `func` as a reward function (TRL signature); usable bare or with arguments."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        _script.reward_functions.append((f, name, override))
        add_plugin(_script, SCRIPT_PLUGIN)  # invalidates the cached registry
        return f
    return decorate(func) if func is not None else decorate
