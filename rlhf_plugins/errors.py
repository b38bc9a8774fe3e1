"""The project's exception hierarchy: every error a user can cause is one of these."""
from __future__ import annotations


class RlhfPluginsError(Exception):
    """Base class of every error rlhf-plugins raises on purpose."""


class ConfigError(RlhfPluginsError, ValueError):
    """A configuration value (YAML field, CLI option, keyword) is invalid."""


class DataError(RlhfPluginsError, ValueError):
    """A dataset row, conversation or tensor input is invalid."""


class PluginError(RlhfPluginsError):
    """A plugin failed to load or registered something invalid."""


class ComponentTypeError(PluginError, TypeError):
    """A registered component does not satisfy its family's Protocol."""


class DuplicateComponentError(PluginError):
    """Two plugins registered the same name in one family without override=True."""


class ComponentError(PluginError):
    """A registered component raised (or returned something invalid) while in use.

    The message names the family, the component, the plugin and distribution that provide it,
    and what it was doing: ``chat_templates component 'mine' (plugin 'my_plugin' (my-dist
    1.0)) failed in encode(): ZeroDivisionError: division by zero``.
    """

    def __init__(self, message: str, *, family: str = "", component: str = "",
                 plugin: str = "", action: str = "") -> None:
        super().__init__(message)
        self.family, self.component, self.plugin, self.action = family, component, plugin, action


class UnknownComponentError(RlhfPluginsError, LookupError):
    """A component (or family) name that no loaded plugin provides."""

    def __str__(self) -> str:  # LookupError/KeyError-style repr quoting is unhelpful here
        return str(self.args[0]) if self.args else ""
