"""Hook specifications: one ``register_*`` hook per plugin family.

Every hook receives ``register(component, *, name=None, override=False)``, a closure built by
the host for that family and that plugin. It validates the component against the family's
Protocol (see :mod:`rlhf_plugins.protocols`), raising ``TypeError`` naming the plugin and what
is missing, and records the component's provenance (plugin, distribution, version).
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
    """Register chat templates (Protocol :class:`rlhf_plugins.protocols.ChatTemplateProtocol`).

    A template has ``render_text(messages, *, tokenizer=None, add_generation_prompt=False)``,
    ``encode(...)`` returning per-token ``input_ids``/``roles``/``turns``, and ``jinja``.
    """


@hookspec
def register_masking_strategies(register):
    """Register loss-masking strategies
    (Protocol :class:`rlhf_plugins.protocols.MaskingStrategyProtocol`).

    A strategy has ``mask(encoded) -> list[int]`` (1 = the token is in the loss).
    """


# --- reward modelling --------------------------------------------------------------------

@hookspec
def register_reward_heads(register):
    """Register reward/value heads (Protocol :class:`rlhf_plugins.protocols.RewardHeadProtocol`).

    A head has ``build_module(hidden_size)``, ``collate(rows, ...)``,
    ``compute_loss(head_outputs, batch)`` and ``sequence_scores(head_outputs, batch)``.
    """


@hookspec
def register_reward_functions(register):
    """Register reward functions (Protocol :class:`rlhf_plugins.protocols.RewardFunctionProtocol`).

    A reward function is callable with TRL's signature
    ``f(prompts, completions, **columns) -> list[float | None]``.
    """


# --- selection and policy optimisation ---------------------------------------------------

@hookspec
def register_selection_rules(register):
    """Register rejection-sampling selection rules (Protocol
    :class:`rlhf_plugins.protocols.SelectionRuleProtocol`).

    A rule has ``select(rewards, **params) -> list[tuple[int, int]]``.
    """


@hookspec
def register_advantage_estimators(register):
    """Register advantage estimators
    (Protocol :class:`rlhf_plugins.protocols.AdvantageEstimatorProtocol`).

    An estimator is callable as ``est(rewards, *, num_generations=1, mask=None, values=None,
    gamma=1.0, lam=0.95)`` and has a boolean ``needs_values``.
    """


@hookspec
def register_stages(register):
    """Register pipeline stages (Protocol :class:`rlhf_plugins.protocols.PipelineStage`, SDK base
    :class:`rlhf_plugins.sdk.Stage`); a pipeline's ``stages:`` lists them by name."""


@hookspec
def register_policy_losses(register):
    """Register policy objectives (Protocol :class:`rlhf_plugins.protocols.PolicyLossFunction`).

    A policy loss is callable as ``loss(log_probs, old_log_probs, advantages, mask, *,
    ref_log_probs=None)`` and returns an object with ``.loss`` (scalar) and ``.metrics``.
    """


@hookspec
def register_preference_losses(register):
    """Register preference (direct-alignment) losses (Protocol
    :class:`rlhf_plugins.protocols.PreferenceLossFunction`).

    A preference loss is callable as ``loss(chosen_logps, rejected_logps, ref_chosen_logps=None,
    ref_rejected_logps=None, *, chosen_lengths=None, rejected_lengths=None)`` on summed completion
    log-probs ``[B]`` and returns an object with ``.losses`` (per pair, ``[B]``),
    ``.chosen_rewards``, ``.rejected_rewards`` (``[B]``) and ``.metrics``.
    """
