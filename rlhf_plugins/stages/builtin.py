"""The four built-in stages, registered through `register_stages` like any third-party stage.

Each is a :class:`rlhf_plugins.sdk.Stage`: its settings and TRL config classes, its defaults
from the pipeline and earlier stages, its checks, and `run` (the stage module's own `run_*`).
Nothing here imports torch, transformers or TRL at module level: listing stages stays light.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config_schema import trl_config_class
from ..hookspecs import hookimpl
from ..stage_api import Stage, StageContext, StageOutputs, StageResult, flat_metrics

logger = logging.getLogger(__name__)


def _training_defaults(ctx: StageContext, data: str, **extra: Any) -> dict[str, Any]:
    """A training stage's defaults: the shared settings, the incoming policy, a task data file."""
    return {**ctx.common, "model": ctx.policy, "dataset": ctx.data[data], **extra}


class SFTStage(Stage):
    name = "sft"
    description = "supervised fine-tuning on conversations (TRL SFTTrainer; template + masking plugins)"
    produces = ("policy",)

    def settings_class(self) -> type:
        from .sft.settings import SFTSettings
        return SFTSettings

    def config_class(self, static: bool = False) -> type:
        return trl_config_class("SFTConfig", "sft_config", static)

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        return _training_defaults(ctx, "sft", merge=True)

    def quick_check(self, settings: Any) -> None:
        from .sft.dataset import get_components

        get_components(settings.template, settings.masking)

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .sft.train import build_sft_config

        build_sft_config(trl_kwargs, output_dir)  # the plugins were checked by quick_check

    def policy_quantization(self, settings: Any) -> tuple[str, Any]:
        return "sft", settings.quantization

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .sft.train import run_sft

        result = run_sft(settings, trl_kwargs, output_dir)
        policy = str(result.merged_dir) if result.merged_dir else str(output_dir)
        metrics = {k: v for k, v in result.metrics.items() if k != "log_history"}
        return StageResult(StageOutputs(policy=policy), metrics, result.metrics.get("log_history", []),
                           {"template": settings.template, "masking": settings.masking})


class RewardModelStage(Stage):
    name = "reward_model"
    description = "a reward head (+ LoRA/QLoRA adapter) on the policy, from preference or labelled rows"
    consumes = ("policy", "samples")
    produces = ("reward_model",)

    def settings_class(self) -> type:
        from .reward_model.settings import RMSettings
        return RMSettings

    def config_class(self, static: bool = False) -> type:
        return trl_config_class("RewardConfig", "reward_config", static)

    def prepare(self, ctx: StageContext) -> None:
        """With graded samples from an earlier stage: (passing, failing) pairs of them."""
        if not ctx.samples:
            return
        if ctx.validating:
            ctx.data.update(pairs_train="<on-policy pairs>", pairs_eval="<held-out on-policy pairs>")
            return
        from ..data.verified_pairs import write_verified_pairs

        pairs = write_verified_pairs(ctx.samples, ctx.data_dir, seed=ctx.seed)
        if pairs is None:
            logger.warning("reward_model: rejection sampling left no prompt with both a passing "
                           "and a failing sample; training on the task's synthetic pairs")
        ctx.data.update(pairs or {})

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        """Pairs of the policy's own samples graded by the verifier when an earlier stage left
        them (``data/preference_on_policy_*.jsonl``), else the task's synthetic pairs."""
        if "pairs_train" in ctx.data:
            return _training_defaults(ctx, "pairs_train", eval_dataset=ctx.data["pairs_eval"])
        return _training_defaults(ctx, "preference", eval_dataset=ctx.data["preference_eval"])

    def quick_check(self, settings: Any) -> None:
        from .. import registry

        registry().chat_templates.get(settings.template)
        registry().reward_heads.get(settings.head, **settings.head_config())

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .reward_model.train import build_rm_config

        build_rm_config(trl_kwargs, output_dir)  # the plugins were checked by quick_check

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .reward_model.train import run_rm

        result = run_rm(settings, trl_kwargs, output_dir)
        return StageResult(StageOutputs(reward_model=str(output_dir), evaluate=False),
                           flat_metrics(result.metrics), result.metrics.get("log_history", []),
                           {"head": settings.head, "loss": settings.loss or "default",
                            "template": settings.template})


class RejectionSamplingStage(Stage):
    name = "rejection_sampling"
    description = "sample N per prompt, score (verifier + reward model), select, SFT on the selection"
    consumes = ("policy", "reward_model")
    produces = ("policy", "samples")

    def settings_class(self) -> type:
        from .rejection_sampling.settings import SamplingSettings
        return SamplingSettings

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        inherited = {k: v for k, v in ctx.common.items() if k in ("lora", "quantization", "seed")}
        return {"model": ctx.policy, "dataset": ctx.data["rl"], "template": ctx.template,
                "seed": ctx.seed, "reward_functions": list(ctx.reward_functions),
                "reward_model": ctx.reward_model, "finetune": True, "on_empty_selection": "skip",
                "sft": {**inherited, "merge": True}}

    def quick_check(self, settings: Any) -> None:
        from .. import registry
        from ..rewarding import resolve_reward_functions

        registry().chat_templates.get(settings.template)
        registry().selection_rules.get(settings.selection, **(settings.selection_params or {}))
        if settings.reward_functions:
            resolve_reward_functions(settings.reward_functions)

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .rejection_sampling.components import resolve_components

        resolve_components(settings, settings.num_prompts or 8, output_dir, policy_ref="<policy>")

    def policy_quantization(self, settings: Any) -> tuple[str, Any]:
        return "rejection_sampling.sft", settings.sft.get("quantization")

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .rejection_sampling.run import run_sampling

        result = run_sampling(settings, output_dir)
        metrics = {k: v for k, v in result.summary.items()
                   if isinstance(v, (int, float, str)) and k not in ("policy", "config_hash")}
        sft = result.sft
        # `finetune: false` (sample and grade only): the policy is the one the stage started
        # from, already evaluated; later stages get the graded samples
        outputs = StageOutputs(policy=str(sft.merged_dir) if sft is not None and sft.merged_dir
                               else ctx.policy, evaluate=settings.finetune)
        if (output_dir / "all.jsonl").is_file():  # every graded sample (on-policy RM pairs)
            outputs.samples = str(output_dir / "all.jsonl")
        history = sft.metrics.get("log_history", []) if sft is not None else []
        return StageResult(outputs, metrics, history,
                           {"selection": settings.selection,
                            "reward_functions": [str(f) for f in settings.reward_functions],
                            "reward_model": bool(settings.reward_model)})


class PPOStage(Stage):
    name = "ppo"
    description = "policy optimisation on one 4-bit base: LoRA policy, value head, reward adapter + verifier"
    consumes = ("policy", "reward_model")
    produces = ("policy", "policy_adapter")

    def settings_class(self) -> type:
        from .ppo.settings import PPOSettings
        return PPOSettings

    def config_class(self, static: bool = False) -> type:
        return trl_config_class("GRPOConfig", "grpo_config", static)

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        """PPO scores with the reward-model stage's output (attached to the policy's base when it
        was trained on it, else as a separate model) unless the section names its own."""
        extra: dict[str, Any] = {"reward_functions": list(ctx.reward_functions)}
        if ctx.reward_model is not None and not {"reward_adapter", "reward_model"} & set(ctx.section):
            extra["reward_model"] = ctx.reward_model
        return _training_defaults(ctx, "rl", **extra)

    def quick_check(self, settings: Any) -> None:
        from .. import registry
        from .ppo.train import check_ppo_components

        if settings.template is not None:
            registry().chat_templates.get(settings.template)
        check_ppo_components(settings)

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .ppo.train import check_ppo_config

        check_ppo_config(settings, trl_kwargs, output_dir)

    def policy_quantization(self, settings: Any) -> tuple[str, Any]:
        return "ppo", settings.quantization

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .ppo.train import run_ppo

        result = run_ppo(settings, trl_kwargs, output_dir)
        outputs = StageOutputs(policy=ctx.policy)
        if result.adapter:
            outputs.policy_adapter = str(output_dir)
        else:
            outputs.policy = str(output_dir)
        return StageResult(outputs, flat_metrics(result.metrics), result.metrics.get("log_history", []),
                           {"advantage_estimator": settings.advantage_estimator,
                            "reward_functions": [str(f) for f in settings.reward_functions],
                            "reward_adapter": bool(settings.reward_adapter),
                            "reward_model": bool(settings.reward_model),
                            "kl_penalty": settings.kl_penalty})


@hookimpl
def register_stages(register):
    from .dpo.stage import DPOStage
    from .kto.stage import KTOStage

    for stage in (SFTStage(), RewardModelStage(), RejectionSamplingStage(), PPOStage(), DPOStage(),
                  KTOStage()):
        register(stage)
