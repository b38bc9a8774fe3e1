"""The `dpo` pipeline stage (a :class:`rlhf_plugins.sdk.Stage`), light at import.

In a pipeline it follows any stage. Its pairs: when an earlier stage left graded samples
(rejection sampling's `all.jsonl`), per prompt (verified-correct, failed) pairs of them, at most
`max_pairs_per_prompt`, or with `pairs: reward_model` (best, worst) by the reward model's score
(no second sampling pass); else the `dataset` of its section, by default
the task's synthetic preference pairs. It produces the policy (merged when `merge`, the default
in a pipeline) that the pipeline evaluates.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...config_schema import trl_config_class
from ...stage_api import Stage, StageContext, StageOutputs, StageResult, flat_metrics

logger = logging.getLogger(__name__)

__all__ = ["DPOStage", "data_source", "direct_defaults", "stage_result"]


def direct_defaults(ctx: StageContext) -> dict[str, Any]:
    """A direct-alignment stage's defaults: the shared settings, the incoming policy, merged
    output, and the data `prepare` chose (the stage's own, else the task's preference pairs),
    unless the section names its own `dataset`."""
    own = f"{ctx.name}_train"
    data: dict[str, Any] = {}
    if "dataset" in ctx.section:  # the user's rows: evaluation only where the section says
        pass
    elif own in ctx.data:
        data = {"dataset": ctx.data[own]}
        if f"{ctx.name}_eval" in ctx.data:
            data["eval_dataset"] = ctx.data[f"{ctx.name}_eval"]
    else:
        data = {"dataset": ctx.data["preference"], "eval_dataset": ctx.data["preference_eval"]}
    return {**ctx.common, "model": ctx.policy, "merge": True, **data}


def data_source(ctx: StageContext, samples: str) -> str:
    """What a direct-alignment stage trained on, for its record and the report: `samples` (the
    earlier stage's graded samples), the section's own dataset, or the task's preference pairs."""
    if f"{ctx.name}_train" in ctx.data:
        return samples
    return "dataset" if "dataset" in ctx.section else "the task's preference pairs"


def stage_result(result: Any, ctx: StageContext, components: dict[str, Any]) -> StageResult:
    """The outputs of a direct-alignment run: its (merged) policy, metrics and log history."""
    policy = str(result.merged_dir) if result.merged_dir else str(result.output_dir)
    metrics = flat_metrics(result.metrics)
    return StageResult(StageOutputs(policy=policy), metrics, result.metrics.get("log_history", []),
                       components)


class DPOStage(Stage):
    name = "dpo"
    description = ("direct preference optimisation (TRL DPOTrainer; preference_losses plugin, "
                   "template + masking plugins)")
    consumes = ("policy", "samples")
    produces = ("policy",)

    def settings_class(self) -> type:
        from .settings import DPOSettings
        return DPOSettings

    def config_class(self, static: bool = False) -> type:
        return trl_config_class("DPOConfig", "dpo_config", static)

    def prepare(self, ctx: StageContext) -> None:
        """With graded samples from an earlier stage: pairs of them, (verified-correct, failed)
        or, with `pairs: reward_model`, (best, worst) by the reward model's score."""
        if not ctx.samples:
            return
        if ctx.validating:
            ctx.data.update({f"{ctx.name}_train": "<on-policy pairs>",
                             f"{ctx.name}_eval": "<held-out on-policy pairs>"})
            return
        from ...errors import ConfigError, DataError

        section = ctx.section
        out_dir = Path(ctx.data_dir or ".") / ctx.name
        source = section.get("pairs", "verified")
        if source == "reward_model":
            from ...data.scored_pairs import write_scored_pairs
            from ..rejection_sampling.settings import REWARD_MODEL_KEY

            try:
                pairs = write_scored_pairs(ctx.samples, out_dir, key=REWARD_MODEL_KEY,
                                           min_margin=section.get("min_score_margin", 0.0))
            except (ConfigError, DataError) as exc:
                raise type(exc)(f"{ctx.name}.pairs: {exc}") from None
            what = "no prompt with two reward-model scores at least min_score_margin apart"
        else:
            from ...data.verified_pairs import write_verified_pairs

            pairs = write_verified_pairs(ctx.samples, out_dir, seed=ctx.seed,
                                         max_per_prompt=section.get("max_pairs_per_prompt", 2),
                                         min_reward=section.get("min_reward", 0.5))
            what = "no prompt with both a passing and a failing sample"
        if pairs is None:
            logger.warning("%s: the graded samples hold %s; training on the task's preference "
                           "pairs", ctx.name, what)
            return
        ctx.data.update({f"{ctx.name}_train": pairs["pairs_train"],
                         f"{ctx.name}_eval": pairs["pairs_eval"]})

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        return direct_defaults(ctx)

    def quick_check(self, settings: Any) -> None:
        from ..sft.dataset import get_components
        from .settings import resolve_losses

        get_components(settings.template, settings.masking)
        resolve_losses(settings)

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .run import build_dpo_config

        build_dpo_config(trl_kwargs, output_dir, settings)

    def policy_quantization(self, settings: Any) -> tuple[str, Any]:
        return self.name, settings.quantization

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .run import run_dpo

        result = run_dpo(settings, trl_kwargs, output_dir)
        return stage_result(result, ctx, {"loss": [s.name for s in settings.loss_specs()],
                                          "rpo_alpha": settings.rpo_alpha,
                                          "template": settings.template, "masking": settings.masking,
                                          "data": data_source(ctx, f"graded samples, {settings.pairs} "
                                                                   "pairs")})
