"""rlhf-plugins: every part of the post-training pipeline as a named pluggy plugin component.

Importing this package is light (no torch); heavy libraries load inside the functions that use
them.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    ComponentTypeError,
    ConfigError,
    DataError,
    DuplicateComponentError,
    PluginError,
    RlhfPluginsError,
    UnknownComponentError,
)
from .hookspecs import hookimpl
from .manager import registry
from .decorators import reward_function

__all__ = [
    "__version__",
    "hookimpl",
    "registry",
    "reward_function",
    "RlhfPluginsError",
    "ConfigError",
    "DataError",
    "PluginError",
    "ComponentTypeError",
    "DuplicateComponentError",
    "UnknownComponentError",
]
