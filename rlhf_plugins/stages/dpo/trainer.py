"""TRL's DPOTrainer with a `preference_losses` component as its loss, on our encoded rows.

Subclassed only where a plugin needs it:

- the collator: TRL's `DataCollatorForPreference`, whose `completion_mask` is replaced by our
  per-token mask (the masking plugin's choice within the completion), padded and truncated by
  the same TRL collator;
- `_prepare_dataset`: the rows arrive tokenized by our template + masking components;
- `_compute_loss`: the policy forward is TRL's (its fused LM head), the reference log-probs
  come from TRL's `compute_ref_log_probs` (the policy with its adapter disabled under LoRA /
  QLoRA, the reference model otherwise) or the precomputed columns, and none at all for a
  `reference_free` loss; the per-pair loss is the component's, weighted and averaged, plus
  `rpo_alpha` times the mean NLL of the chosen completion tokens (TRL's `sft` loss term).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ...preference_contract import call_preference_loss

__all__ = ["MaskedPreferenceCollator", "PluginDPOTrainer", "completion_logps", "reference_is_base"]

#: batch keys that are not model inputs
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
#: our columns, read by the collator
MASK_COLUMNS = ("chosen_mask", "rejected_mask")


@dataclass
class MaskedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, with `completion_mask` = our per-token completion masks."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        # the masks laid out exactly as the ids: the same TRL collator on 0/1 "ids", padded with 0
        layout = DataCollatorForPreference(pad_token_id=0, max_length=self.max_length,
                                           truncation_mode=self.truncation_mode,
                                           pad_to_multiple_of=self.pad_to_multiple_of)
        masks = layout.torch_call([{"prompt_ids": [0] * len(e["prompt_ids"]),
                                    "chosen_ids": list(e["chosen_mask"]),
                                    "rejected_ids": list(e["rejected_mask"])} for e in examples])
        out["completion_mask"] = masks["input_ids"].to(out["completion_mask"].dtype)
        return out


def completion_logps(per_token_logps: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the trained completion tokens, per sequence."""
    return (per_token_logps * shift_mask).sum(dim=1)


def reference_is_base(trainer: Any) -> None:
    """A fresh LoRA adapter's reference is the base (the adapter disabled). TRL 1.16 copies a
    PeftModel's adapter into a frozen `ref` adapter (right for an adapter trained before: the
    reference is where training starts); for a fresh adapter that copy is the base at the cost
    of a second LoRA, so it is dropped and TRL's `use_adapter(None)` disables the adapter."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


class PluginDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is a weighted sum of `preference_losses` components."""

    def __init__(self, *, losses: list[tuple[Any, float]], rpo_alpha: float = 0.0,
                 fresh_adapter: bool = False, **kwargs: Any) -> None:
        self.preference_losses = list(losses)
        self.rpo_alpha = float(rpo_alpha)
        self.reference_free = all(getattr(loss, "reference_free", False) for loss, _ in losses)
        self.needs_lengths = any(getattr(loss, "needs_lengths", False) for loss, _ in losses)
        config = kwargs["args"]
        tokenizer = kwargs["processing_class"]
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = MaskedPreferenceCollator(
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                max_length=config.max_length, truncation_mode=config.truncation_mode,
                pad_to_multiple_of=config.pad_to_multiple_of)
        super().__init__(**kwargs)
        if fresh_adapter:
            reference_is_base(self)
        if self.reference_free and self.ref_model is not None:
            self.ref_model = None  # a reference-free loss never reads it

    # data: rows arrive encoded -------------------------------------------------------------
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if "prompt_ids" not in dataset.column_names or "chosen_mask" not in dataset.column_names:
            raise ValueError(f"{dataset_name} dataset: expected rows encoded by "
                             "rlhf_plugins.stages.dpo.data.encode_pairs")
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in MASK_COLUMNS if c not in self._signature_columns]

    # loss ------------------------------------------------------------------------------------
    def policy_and_reference_logps(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The policy forward (TRL's fused LM head) and the reference log-probs of a batch."""
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[..., 1:]
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1):]
        chosen, rejected = completion_logps(per_token_logps, shift_mask).chunk(2, dim=0)
        lengths = shift_mask.sum(dim=1).to(per_token_logps.dtype).chunk(2, dim=0)
        ref: tuple[Any, Any] = (None, None)
        if self.reference_free:
            pass
        elif self.precompute_ref_logps:
            ref = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        else:
            ref = tuple(self.compute_ref_log_probs(self.ref_model or self.model, inputs))
        return {"outputs": outputs, "per_token_logps": per_token_logps, "shift_mask": shift_mask,
                "chosen_logps": chosen, "rejected_logps": rejected, "ref": ref, "lengths": lengths}

    def pair_losses(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref: tuple[Any, Any], lengths: tuple[Any, Any]) -> list[tuple[Any, float]]:
        """Each component's PreferenceLoss on the batch, with its weight."""
        kwargs = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1]} \
            if self.needs_lengths else {}
        return [(call_preference_loss(loss, chosen_logps, rejected_logps, *ref, **kwargs), weight)
                for loss, weight in self.preference_losses]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        f = self.policy_and_reference_logps(model, inputs)
        results = self.pair_losses(f["chosen_logps"], f["rejected_logps"], f["ref"], f["lengths"])
        loss = sum(result.losses.mean() * weight for result, weight in results)
        chosen_mask, _ = f["shift_mask"].chunk(2, dim=0)
        chosen_token_logps, _ = f["per_token_logps"].chunk(2, dim=0)
        if self.rpo_alpha:
            nll = -chosen_token_logps[chosen_mask.bool()].mean()
            loss = loss + self.rpo_alpha * nll
            self._metrics[mode]["nll_loss"].append(self.accelerator.gather_for_metrics(
                nll.detach()).mean().item())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * f["outputs"].aux_loss
        self._log_pair_metrics(mode, results, f["chosen_logps"], f["rejected_logps"])
        if return_outputs:
            return loss, f["outputs"]
        return loss

    def _log_pair_metrics(self, mode: str, results: list[tuple[Any, float]], chosen_logps: Any,
                          rejected_logps: Any) -> None:
        """TRL's reward metrics (of the first loss), each loss's own metrics, and how often the
        policy itself prefers the chosen completion (`logps/accuracies`)."""
        gather = self.accelerator.gather_for_metrics
        first = results[0][0]
        chosen_rewards, rejected_rewards = gather(first.chosen_rewards), gather(first.rejected_rewards)
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        chosen, rejected = gather(chosen_logps.detach()), gather(rejected_logps.detach())
        metrics["logps/chosen"].append(chosen.mean().item())
        metrics["logps/rejected"].append(rejected.mean().item())
        metrics["logps/accuracies"].append((chosen > rejected).float().mean().item())
        several = len(results) > 1
        for (result, _), (component, _) in zip(results, self.preference_losses):
            for key, value in result.metrics.items():
                if several or not key.startswith("rewards/"):
                    name = f"{component.name}/{key}" if several else key
                    metrics[name].append(float(value))
