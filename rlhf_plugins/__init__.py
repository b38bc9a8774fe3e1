"""rlhf-plugins: every part of the post-training pipeline as a named pluggy plugin component.

Importing this package is light (no torch); heavy libraries load inside the functions that use
them.
"""
from __future__ import annotations

from .version import __version__
from .errors import (
    ComponentError,
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
from .decorators import (advantage_estimator, chat_template, load_plugin_module, masking_strategy,
                         policy_loss, preference_loss, reward_function, reward_head, selection_rule,
                         stage)

__all__ = [
    "__version__",
    "hookimpl",
    "registry",
    "reward_function",
    "chat_template",
    "masking_strategy",
    "reward_head",
    "selection_rule",
    "advantage_estimator",
    "preference_loss",
    "policy_loss",
    "stage",
    "load_plugin_module",
    "RlhfPluginsError",
    "ConfigError",
    "DataError",
    "PluginError",
    "ComponentError",
    "ComponentTypeError",
    "DuplicateComponentError",
    "UnknownComponentError",
    "load_as_trained",
]


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    """`load_as_trained` on first use (it is light, but keeps `import rlhf_plugins` minimal)."""
    if name == "load_as_trained":
        from .artifact_recipe import load_as_trained

        return load_as_trained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
