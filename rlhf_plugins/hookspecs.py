"""Hook specifications: one ``register_*`` hook per plugin family.

Every hook receives ``register(component, *, name=None, override=False)``, a closure built by
the host for that family and that plugin. It validates the component against the family's
contract (the table in :mod:`rlhf_plugins.protocols`: the Protocol, required and optional
members with their defaults; the SDK base class documents each), raising an error naming the
plugin and what is missing, and records the component's provenance (plugin, distribution,
version).
``override=True`` replaces a component of the same name registered earlier (a built-in,
say); without it a duplicate name is an error.

Specs only ever gain arguments, never lose them (pluggy lets an implementation accept a subset).
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "rlhf_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- conversation formatting -----------------------------------------------------------

@hookspec
def register_chat_templates(register):
    """Register chat templates (:class:`rlhf_plugins.protocols.ChatTemplateProtocol`)."""


@hookspec
def register_masking_strategies(register):
    """Register loss-masking strategies (:class:`rlhf_plugins.protocols.MaskingStrategyProtocol`)."""


# --- reward modelling --------------------------------------------------------------------

@hookspec
def register_reward_heads(register):
    """Register reward and value heads (:class:`rlhf_plugins.protocols.RewardHeadProtocol`)."""


@hookspec
def register_reward_functions(register):
    """Register reward functions (:class:`rlhf_plugins.protocols.RewardFunctionProtocol`)."""


# --- selection and policy optimisation ---------------------------------------------------

@hookspec
def register_selection_rules(register):
    """Register rejection-sampling selection rules (:class:`rlhf_plugins.protocols.SelectionRuleProtocol`)."""


@hookspec
def register_advantage_estimators(register):
    """Register advantage estimators (:class:`rlhf_plugins.protocols.AdvantageEstimatorProtocol`)."""


@hookspec
def register_stages(register):
    """Register pipeline stages (:class:`rlhf_plugins.protocols.PipelineStage`)."""


@hookspec
def register_policy_losses(register):
    """Register policy objectives (:class:`rlhf_plugins.protocols.PolicyLossFunction`)."""


@hookspec
def register_preference_losses(register):
    """Register preference losses (:class:`rlhf_plugins.protocols.PreferenceLossFunction`)."""
