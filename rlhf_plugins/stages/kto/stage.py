"""The `kto` pipeline stage (a :class:`rlhf_plugins.sdk.Stage`), light at import.

In a pipeline it follows any stage. Its rows: when an earlier stage left graded samples, each
sample labelled by the verifier (reward at least `min_reward`: desirable; no second sampling
pass); else the `dataset` of its section, by default the task's preference pairs unpaired.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...stage_api import Stage, StageContext, StageResult
from ...config_schema import trl_config_class
from ..dpo.stage import data_source, direct_defaults, stage_result

logger = logging.getLogger(__name__)

__all__ = ["KTOStage"]


class KTOStage(Stage):
    name = "kto"
    description = "KTO on unpaired rows labelled desirable or not (TRL KTOTrainer; template + masking plugins)"
    consumes = ("policy", "samples")
    produces = ("policy",)

    def settings_class(self) -> type:
        from .settings import KTOSettings
        return KTOSettings

    def config_class(self, static: bool = False) -> type:
        return trl_config_class("KTOConfig", "kto_config", static)

    def prepare(self, ctx: StageContext) -> None:
        """With graded samples from an earlier stage: each one labelled by the verifier."""
        if not ctx.samples:
            return
        if ctx.validating:
            ctx.data.update({f"{ctx.name}_train": "<graded samples>",
                             f"{ctx.name}_eval": "<held-out graded samples>"})
            return
        from .data import write_labelled_samples

        rows = write_labelled_samples(ctx.samples, Path(ctx.data_dir or ".") / ctx.name,
                                      min_reward=ctx.section.get("min_reward", 0.5))
        if rows is None:
            logger.warning("%s: the graded samples are all passing or all failing; training on "
                           "the task's preference pairs", ctx.name)
            return
        ctx.data.update({f"{ctx.name}_{key}": path for key, path in rows.items()})

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        return direct_defaults(ctx)

    def quick_check(self, settings: Any) -> None:
        from ..sft.dataset import get_components

        get_components(settings.template, settings.masking)

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        from .run import build_kto_config

        build_kto_config(trl_kwargs, output_dir)

    def policy_quantization(self, settings: Any) -> tuple[str, Any]:
        return self.name, settings.quantization

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        from .run import run_kto

        result = run_kto(settings, trl_kwargs, output_dir)
        return stage_result(result, ctx, {"template": settings.template, "masking": settings.masking,
                                          "data": data_source(ctx, "graded samples, verifier labels")})
