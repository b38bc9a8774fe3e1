"""What a PPO/GRPO run is configured with, resolved and checked before any model loads.

Components (estimator, policy loss, group filter) are looked up by name in the registry and
configured, or taken as given; reward functions are wrapped so their outputs are validated; and
the trainer's own options are checked against each other and against the components'
capabilities. Everything here raises :class:`~rlhf_plugins.errors.ConfigError` with the field.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from ...errors import ConfigError
from ...losses import KL_KINDS
from ...protocols import member

__all__ = ["resolve_estimator", "resolve_group_filter", "resolve_policy_loss",
           "validated_reward_function", "check_policy_loss_args", "check_estimator_args",
           "check_group_filter_refill", "check_trainer_options", "KL_PENALTIES", "CRITICS"]

KL_PENALTIES = ("loss", "reward")
CRITICS = ("value_head", "none")


def _resolve(family: str, value: Any, options: Mapping[str, Any] | None, field: str,
             usable: Callable[[Any], bool], expected: str) -> Any:
    """A component of `family`: a registered name (looked up with its options) or a component
    (configured with `options` when given); ConfigError naming `field` otherwise."""
    if isinstance(value, str):
        from ... import registry

        return getattr(registry(), family).get(value, **dict(options or {}))
    if options:
        configure = getattr(value, "configure", None)
        if configure is None:
            raise ConfigError(f"{field}_options given but the {field} has no configure()")
        value = configure(**dict(options))
    if not usable(value):
        raise ConfigError(f"{field} must be {expected}, got {type(value).__name__}")
    return value


def _optional(value: Any, options: Mapping[str, Any] | None, field: str) -> bool:
    """True when an optional component is absent (its options must be absent too)."""
    if value is None and options:
        raise ConfigError(f"{field}_options given but no {field}")
    return value is None


def resolve_estimator(estimator: Any, options: Mapping[str, Any] | None = None) -> Any:
    """An advantage estimator component: a registered name (looked up, configured) or a component."""
    return _resolve("advantage_estimators", estimator, options, "estimator", callable,
                    "a registered name or a callable")


def resolve_policy_loss(loss: Any, options: Mapping[str, Any] | None = None) -> Any:
    """A policy loss component (registered name, looked up and configured, or a callable), or None."""
    if _optional(loss, options, "policy_loss"):
        return None
    return _resolve("policy_losses", loss, options, "policy_loss", callable,
                    "a registered name or a callable")


def resolve_group_filter(rule: Any, options: Mapping[str, Any] | None = None) -> Any:
    """A selection rule used as a group filter (registered name or component), or None."""
    if _optional(rule, options, "group_filter"):
        return None
    return _resolve("selection_rules", rule, options, "group_filter",
                    lambda r: callable(getattr(r, "select", None)),
                    "a selection rule name or a rule with select()")


def validated_reward_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a TRL-style reward function so its outputs are checked (errors name the function).

    A completion's reward may be a float, None or step rewards (a list of ``(end_char_offset,
    value)`` pairs): TRL gets one number per completion (the sum of the steps), and the raw
    outputs of the last call stay on the wrapper (``last_outputs``, with the completion texts
    the offsets index in ``last_texts``) for the trainer to place on tokens.
    """
    from ...rewarding import (call_reward_functions, completion_text, reward_function_name,
                             reward_value_total)

    name = reward_function_name(func)

    def checked(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        checked.last_outputs = checked.last_texts = None  # type: ignore[attr-defined]
        _, per_function = call_reward_functions([func], None, prompts, completions,
                                                allow_step_rewards=True, **columns)
        outputs = next(iter(per_function.values()))
        checked.last_outputs = outputs  # type: ignore[attr-defined]
        checked.last_texts = [completion_text(c) for c in completions]  # type: ignore[attr-defined]
        return [reward_value_total(v) for v in outputs]

    checked.__name__ = checked.__qualname__ = name  # TRL logs rewards/<__name__>/mean
    checked.__doc__ = getattr(func, "__doc__", None)
    checked.last_outputs = checked.last_texts = None  # type: ignore[attr-defined]
    return checked


#: TRL GRPOConfig options of TRL's own loss, with their defaults; `policy_loss` replaces that
#: loss, so a non-default value would be silently ignored: an error says what to use instead.
_TRL_LOSS_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("loss_type", "dapo", "the loss's `agg` option sets the aggregation "
                          "(policy_loss_options: {agg: seq_mean_token_mean} is TRL's grpo)"),
    ("epsilon", 0.2, "set the loss's clip options (ppo_clip: clip_low)"),
    ("epsilon_high", None, "set the loss's clip options (ppo_clip: clip_high)"),
    ("delta", None, "set the loss's options (ppo_clip: delta)"),
    ("importance_sampling_level", "token", "use a sequence-level loss (policy_loss: gspo)"),
    ("top_entropy_quantile", 1.0, "not supported with policy_loss"),
    ("off_policy_mask_threshold", None, "not supported with policy_loss"),
    ("entropy_coef", 0.0, "not supported with policy_loss"),
    ("use_adaptive_entropy", False, "not supported with policy_loss"),
)


def check_policy_loss_args(args: Any) -> None:
    """ConfigError for TRL loss options that a plugin policy loss would silently ignore."""
    for name, default, instead in _TRL_LOSS_OPTIONS:
        value = getattr(args, name, default)
        if value != default:
            raise ConfigError(f"{name}: {value!r} configures TRL's own loss, which policy_loss "
                              f"replaces: {instead}")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        raise ConfigError("use_vllm with vllm_importance_sampling_correction: not supported with "
                          "policy_loss (set vllm_importance_sampling_correction: false)")


def check_estimator_args(estimator: Any, args: Any) -> None:
    """ConfigError when the estimator's capabilities cannot be honoured with these TRL options."""
    greedy = member(estimator, "advantage_estimators", "needs_greedy_baseline")
    if greedy and getattr(args, "use_vllm", False):
        raise ConfigError(f"advantage estimator {getattr(estimator, 'name', estimator)!r} needs a "
                          "greedy baseline, generated on the transformers path: set use_vllm: false")


def check_group_filter_refill(refill: Any) -> None:
    """ConfigError for group_filter_refill: true (see docs/concepts/dense_rewards.md for why)."""
    if not isinstance(refill, bool):
        raise ConfigError(f"group_filter_refill: expected true or false, got {refill!r}")
    if refill:
        raise ConfigError(
            "group_filter_refill: true is not supported on TRL's GRPOTrainer: its generation batch "
            "is one fixed draw of the trainer's dataloader (RepeatSampler, sharded per process), and "
            "merging a second rollout would re-implement TRL's rollout assembly (left/right padding "
            "of ids, masks, old/ref/sampling log-probs, multimodal fields). Dropped groups leave "
            "the batch smaller instead: raise num_generations or the batch size to compensate")




def check_trainer_options(estimator: Any, *, critic: str, kl_penalty: str, kl_estimator: str,
                          vf_coef: float, value_clip: float | None, gamma: float, lam: float) -> None:
    """ConfigError for inconsistent trainer options (before any model is loaded)."""
    name = getattr(estimator, "name", type(estimator).__name__)
    if critic not in CRITICS:
        raise ConfigError(f"critic must be one of {', '.join(CRITICS)}, got {critic!r}")
    if getattr(estimator, "needs_values", False) and critic == "none":
        raise ConfigError(f"advantage estimator {name!r} needs values, but critic is 'none'; "
                          "use critic: value_head or a critic-free estimator (grpo, rloo, ...)")
    if kl_penalty not in KL_PENALTIES:
        raise ConfigError(f"kl_penalty must be one of {', '.join(KL_PENALTIES)}, got {kl_penalty!r}")
    if kl_estimator not in KL_KINDS:
        raise ConfigError(f"kl_estimator must be one of {', '.join(KL_KINDS)}, got {kl_estimator!r}")
    for label, value in (("vf_coef", vf_coef), ("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise ConfigError(f"{label} must be a finite number >= 0, got {value!r}")
    for label, value in (("gamma", gamma), ("lam", lam)):
        if value > 1:
            raise ConfigError(f"{label} must be in [0, 1], got {value!r}")
    if value_clip is not None and (isinstance(value_clip, bool) or not isinstance(value_clip, (int, float))
                                   or not value_clip > 0):
        raise ConfigError(f"value_clip must be a number > 0 or null, got {value_clip!r}")
