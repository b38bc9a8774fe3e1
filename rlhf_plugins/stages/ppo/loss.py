"""The plugin policy loss inside the PPO/GRPO trainer (a mixin of its ``_compute_loss`` path).

With ``policy_loss`` set, the trainer's policy term is the plugin loss on the per-token
log-probs of TRL's own forward (``_get_per_token_logps_and_entropies``), with TRL's normaliser
passed as ``norm_constant`` and TRL's k3 KL term added, aggregated like the loss. With default
options ``ppo_clip`` reproduces TRL's loss exactly (tests/test_policy_losses.py).
"""
from __future__ import annotations

from typing import Any

import torch

from ...protocols import member

#: batch keys TRL forwards to the model besides ids/masks (multimodal inputs)
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                "mm_token_type_ids", "image_position_ids")


class PluginPolicyLoss:
    """Mixin for a GRPOTrainer subclass holding ``policy_objective`` (a policy_losses component)."""

    def _loss_normaliser(self, inputs: dict[str, Any], mode: str) -> tuple[dict[str, Any], float]:
        """(keyword arguments for the policy loss, divisor of its result) from the loss's `agg`.

        ``token_mean``: ``norm_constant`` = TRL's dapo normaliser, the real tokens of the whole
        generation batch rescaled to one accumulation window (it already accounts for gradient
        accumulation: divisor 1). ``seq_mean_token_sum_norm``: ``norm_constant`` =
        ``max_completion_length`` (TRL's dr_grpo). Any other mode, a loss's own
        ``norm_constant``, or a loss without ``agg``: nothing passed, divided by the
        accumulation steps (TRL's grpo/bnpo). Equal to TRL's loss_type of the same aggregation.
        """
        agg = member(self.policy_objective, "policy_losses", "agg")
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if getattr(self.policy_objective, "norm_constant", None) is not None:
            return {}, accumulation
        if agg == "token_mean":
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # in eval the batch is neither split nor accumulated
                normaliser = (normaliser * self.current_gradient_accumulation_steps
                              / self.args.steps_per_generation)
            return {"norm_constant": normaliser}, 1.0
        if agg == "seq_mean_token_sum_norm":
            return {"norm_constant": float(self.max_completion_length)}, accumulation
        return {}, accumulation

    def _policy_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The configured policy loss on TRL's per-token log-probs, plus TRL's KL term (beta)."""
        from ...policy_loss_contract import call_policy_loss
        from ...policy_objectives import AGG_MODES, aggregate

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in FORWARD_KEYS})
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps")
        mode = "train" if self.model.training else "eval"
        kwargs, divisor = self._loss_normaliser(inputs, mode)
        result = call_policy_loss(self.policy_objective, per_token_logps, old, inputs["advantages"],
                                  mask, ref_log_probs=ref, **kwargs)
        loss = result.loss
        metrics = self._metrics[mode]
        if self.beta != 0.0:  # TRL's k3 term, aggregated like the policy loss
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                old_lp = per_token_logps.detach() if old is None else old
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old_lp)
            agg = member(self.policy_objective, "policy_losses", "agg")
            agg = agg if agg in AGG_MODES else "token_mean"
            norm = kwargs.get("norm_constant", getattr(self.policy_objective, "norm_constant", None))
            norm = norm if agg in ("token_mean", "seq_mean_token_sum_norm") else None
            loss = loss + self.beta * aggregate(per_token_kl, mask.bool(), agg, norm_constant=norm)
            metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        if divisor != 1:
            loss = loss / divisor
        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        metrics["entropy"].append(self._global_masked_mean(entropies, mask))
        metrics["policy_loss/loss"].append(
            self.accelerator.gather(result.loss.detach().float().reshape(1)).nanmean().item())
        for key, value in result.metrics.items():
            local = torch.tensor([float(value)], dtype=torch.float32, device=per_token_logps.device)
            metrics[f"policy_loss/{key}"].append(self.accelerator.gather(local).nanmean().item())
        return loss

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `x` over the real tokens of every process (TRL's logging rule)."""
        totals = self.accelerator.reduce(torch.stack([(x.detach() * mask).sum().float(),
                                                      mask.sum().float()]), reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1.0))
