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


class UnknownComponentError(RlhfPluginsError, LookupError):
    """A component (or family) name that no loaded plugin provides."""

    def __str__(self) -> str:  # LookupError/KeyError-style repr quoting is unhelpful here
        return str(self.args[0]) if self.args else ""
