"""The pipeline's table of stages: each stage's config classes, defaults and up-front checks.

`Pipeline.validate` walks this table before anything runs: every section is parsed into its
typed settings (and TRL config) and its plugin names and options are resolved, with
placeholder paths for what earlier stages will produce.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable


if TYPE_CHECKING:
    from .pipeline import Pipeline

#: the files `write_data` writes (keys of `Pipeline.paths`)
DATA_FILES = ("sft", "preference", "preference_eval", "rl", "eval")


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its config classes, its defaults from the pipeline, and its checks."""

    #: (our settings class, TRL config class); with static=True a light copy of the TRL class's
    #: fields (rlhf_plugins.config_schema), so every section is parsed without importing TRL
    classes: Callable[..., tuple[type, type | None]]
    defaults: Callable[["Pipeline", str, str | None], dict[str, Any]]
    #: the full check, run after `quick` passed for every section: the real TRL config (imports
    #: TRL) and what needs it
    check: Callable[[Any, dict[str, Any], Path], None]
    #: the light check run first for every section: plugin names and options, no TRL import
    quick: Callable[[Any], None]
    #: (where, quantization) the stage loads the previous stage's policy with, from its
    #: settings; None: it trains no policy (the reward model's 4-bit base is its own choice)
    policy_quantization: Callable[[Any], tuple[str, Any]] | None = None


def _trl_class(name: str, module: str, static: bool) -> type:
    """TRL's config class `name`, or (`static`) a light copy of its fields read from its source."""
    if static:
        from ..config_schema import static_config_class

        return static_config_class(f"trl.trainer.{module}", name)
    import trl

    return getattr(trl, name)


def _sft_classes(static: bool = False) -> tuple[type, type]:
    from .sft import SFTSettings
    return SFTSettings, _trl_class("SFTConfig", "sft_config", static)


def _rm_classes(static: bool = False) -> tuple[type, type]:
    from .reward_settings import RMSettings
    return RMSettings, _trl_class("RewardConfig", "reward_config", static)


def _sampling_classes(static: bool = False) -> tuple[type, None]:
    from .sampling_settings import SamplingSettings
    return SamplingSettings, None


def _ppo_classes(static: bool = False) -> tuple[type, type]:
    from .ppo import PPOSettings
    return PPOSettings, _trl_class("GRPOConfig", "grpo_config", static)


def _quick_sft(settings: Any) -> None:
    from .sft import get_components

    get_components(settings.template, settings.masking)


def _quick_rm(settings: Any) -> None:
    from .. import registry

    registry().chat_templates.get(settings.template)
    registry().reward_heads.get(settings.head, **settings.head_config())


def _quick_sampling(settings: Any) -> None:
    from .. import registry
    from ..rewarding import resolve_reward_functions

    registry().chat_templates.get(settings.template)
    registry().selection_rules.get(settings.selection, **(settings.selection_params or {}))
    if settings.reward_functions:
        resolve_reward_functions(settings.reward_functions)


def _quick_ppo(settings: Any) -> None:
    from .. import registry
    from .ppo import check_ppo_components

    if settings.template is not None:
        registry().chat_templates.get(settings.template)
    check_ppo_components(settings)


def _check_sft(settings: Any, trl_kwargs: dict[str, Any], out: Path) -> None:
    from .sft import build_sft_config

    build_sft_config(trl_kwargs, out)  # the plugins were checked by _quick_sft


def _check_rm(settings: Any, trl_kwargs: dict[str, Any], out: Path) -> None:
    from .reward import build_rm_config

    build_rm_config(trl_kwargs, out)  # the plugins were checked by _quick_rm


def _check_sampling(settings: Any, trl_kwargs: dict[str, Any], out: Path) -> None:
    from .sampling import resolve_components

    resolve_components(settings, settings.num_prompts or 8, out, policy_ref="<policy>")


def _check_ppo(settings: Any, trl_kwargs: dict[str, Any], out: Path) -> None:
    from .ppo import check_ppo_config

    check_ppo_config(settings, trl_kwargs, out)


def _training_defaults(p: "Pipeline", policy: str, data: str, **extra: Any) -> dict[str, Any]:
    return {**p.common(), "model": policy, "dataset": p.paths[data], **extra}


def _ppo_defaults(p: "Pipeline", policy: str, rm: str | None) -> dict[str, Any]:
    """PPO scores with the reward-model stage's output (attached to the policy's base when it
    was trained on it, else as a separate model) unless the section names its own."""
    extra: dict[str, Any] = {"reward_functions": list(p.s.eval.reward_functions)}
    if rm is not None and not {"reward_adapter", "reward_model"} & set(p.s.ppo):
        extra["reward_model"] = rm
    return _training_defaults(p, policy, "rl", **extra)


def pairs_from_samples(stages: list[str] | tuple[str, ...]) -> bool:
    """Whether the reward model trains on rejection sampling's graded samples: that stage runs
    first (``stages: [sft, rejection_sampling, reward_model, ppo]``)."""
    return ("rejection_sampling" in stages and "reward_model" in stages
            and stages.index("rejection_sampling") < stages.index("reward_model"))


def _rm_defaults(p: "Pipeline", policy: str, rm: str | None) -> dict[str, Any]:
    """Pairs of the policy's own samples graded by the verifier when rejection sampling ran
    first and left pairs (``data/preference_on_policy_*.jsonl``), else the task's synthetic pairs."""
    if "pairs_train" in p.paths:
        return _training_defaults(p, policy, "pairs_train", eval_dataset=p.paths["pairs_eval"])
    return _training_defaults(p, policy, "preference", eval_dataset=p.paths["preference_eval"])


STAGE_SPECS: dict[str, StageSpec] = {
    "sft": StageSpec(_sft_classes, lambda p, policy, rm: _training_defaults(p, policy, "sft", merge=True),
                     _check_sft, _quick_sft, lambda s: ("sft", s.quantization)),
    "reward_model": StageSpec(_rm_classes, _rm_defaults, _check_rm, _quick_rm),
    "rejection_sampling": StageSpec(
        _sampling_classes,
        lambda p, policy, rm: {
            "model": policy, "dataset": p.paths["rl"], "template": p.s.template, "seed": p.s.seed,
            "reward_functions": list(p.s.eval.reward_functions), "reward_model": rm,
            "finetune": True, "on_empty_selection": "skip",
            "sft": {**{k: v for k, v in p.common().items() if k in ("lora", "quantization", "seed")},
                    "merge": True}},
        _check_sampling, _quick_sampling,
        lambda s: ("rejection_sampling.sft", s.sft.get("quantization"))),
    "ppo": StageSpec(_ppo_classes, lambda p, policy, rm: _ppo_defaults(p, policy, rm), _check_ppo,
                     _quick_ppo, lambda s: ("ppo", s.quantization)),
}


def locate(message: str, where: str) -> str:
    """A stage check's `field: text` message located in the config (`file: section.field: text`)."""
    if message.startswith(where) or ": " in where and message.startswith(where.split(": ")[0]):
        return message
    head, sep, rest = message.partition(":")
    if sep and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return f"{where}.{head}:{rest}"
    return f"{where}: {message}"


