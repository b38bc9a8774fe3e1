"""Rejection sampling's components, resolved and validated before any model loads: template,
reward functions, selection rule, reward model directory and the SFT section."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError, RlhfPluginsError
from .settings import SELECTED, SamplingSettings

logger = logging.getLogger(__name__)


@dataclass
class SamplingComponents:
    """What a run uses, resolved from its settings: template, scorers, rule, SFT config."""

    template: Any
    funcs: list[Any]
    weights: list[float]
    function_specs: list[Any]
    rule: Any
    reward_model_dir: Path | None
    sft: tuple[Any, dict[str, Any], Path] | None


def _spec_repr(spec: Any) -> Any:
    """A JSON-able description of a reward function spec (for hashes and provenance)."""
    if isinstance(spec, (str, int, float)) or spec is None:
        return spec
    if isinstance(spec, Mapping):
        return {str(k): _spec_repr(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_spec_repr(v) for v in spec]
    from ...rewarding import reward_function_name

    return f"<callable {reward_function_name(spec)}>"


def resolve_components(settings: SamplingSettings, num_prompts: int, output_dir: Path,
                       policy_ref: str | None = None) -> SamplingComponents:
    """Look up the template, reward functions, selection rule, reward model and SFT config.

    Unknown names, bad rule parameters (the rule is run once on a dummy reward matrix of the
    run's shape), a missing reward model and a bad SFT section fail here, before loading models.
    """
    from ... import registry
    from ...rewarding import resolve_reward_functions

    if not settings.reward_functions and not settings.reward_model:
        raise ConfigError("no scorer: set `reward_functions` (names) and/or `reward_model` "
                          "(a saved reward model directory)")
    reg = registry()
    template = reg.chat_templates.get(settings.template)
    funcs, weights = resolve_reward_functions(settings.reward_functions) \
        if settings.reward_functions else ([], [])
    rule = reg.selection_rules.get(settings.selection, **settings.selection_params) \
        if settings.selection_params else reg.selection_rules.get(settings.selection)
    dummy = [[0.0] * settings.num_samples for _ in range(num_prompts)]
    try:
        rule.select(dummy)
    except RlhfPluginsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party rule may dislike the dummy input
        logger.warning("selection rule %r failed on a dummy reward matrix (%s: %s); "
                       "continuing", settings.selection, type(exc).__name__, exc)
    rm_dir = None
    if settings.reward_model:
        from ..reward_model.hf_export import check_reward_model_dir

        rm_dir = check_reward_model_dir(settings.reward_model)
    sft = None
    if settings.finetune:
        sft = _sft_settings(settings, output_dir, policy_ref)
    specs = [_spec_repr(s) for s in settings.reward_functions]
    return SamplingComponents(template, funcs, weights, specs, rule, rm_dir, sft)


def _sft_settings(settings: SamplingSettings, output_dir: Path,
                  policy_ref: str | None) -> tuple[Any, dict[str, Any], Path]:
    from trl import SFTConfig

    from ...config import load_stage_config
    from ..sft.settings import SFTSettings

    data = dict(settings.sft)
    out = Path(data.pop("output_dir", None) or output_dir / "sft")
    base = {"model": policy_ref if policy_ref is not None else settings.model,
            "dataset": str(output_dir / f"{SELECTED}.jsonl"), "template": settings.template}
    ours, trl_kwargs = load_stage_config({**base, **data}, SFTSettings, SFTConfig, where="sft")
    return ours, trl_kwargs, out
