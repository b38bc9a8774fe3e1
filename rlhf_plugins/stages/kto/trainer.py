"""TRL's KTOTrainer on our encoded rows: subclassed only for the data.

- the collator: TRL's `DataCollatorForUnpairedPreference`, whose `completion_mask` (and
  `KL_completion_mask`) are replaced by our per-token masks, laid out by the same TRL collator;
- `_prepare_dataset`: the rows arrive tokenized by our template + masking components; the KL
  completions are the completions rotated by one within each batch, as TRL builds them, with
  their masks rotated alongside.

The loss, the KL estimate and the reference (the policy with its adapter disabled under a fresh
LoRA / QLoRA adapter) are TRL's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from ..dpo.trainer import reference_is_base

__all__ = ["MaskedUnpairedCollator", "PluginKTOTrainer"]

MASK_COLUMNS = ("completion_mask", "KL_completion_mask")


@dataclass
class MaskedUnpairedCollator(DataCollatorForUnpairedPreference):
    """TRL's unpaired collator, with `completion_mask` / `KL_completion_mask` = our masks."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        layout = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=self.max_length,
                                                   pad_to_multiple_of=self.pad_to_multiple_of)
        for prefix in ("", "KL_"):
            if f"{prefix}completion_ids" not in examples[0]:
                continue
            masks = layout.torch_call([{"prompt_ids": [0] * len(e["prompt_ids"]),
                                        "completion_ids": list(e[f"{prefix}completion_mask"]),
                                        "label": e["label"]} for e in examples])
            out[f"{prefix}completion_mask"] = masks["input_ids"].to(out[f"{prefix}completion_mask"].dtype)
        return out


class PluginKTOTrainer(KTOTrainer):
    """KTOTrainer on rows encoded by our template + masking components."""

    def __init__(self, *, fresh_adapter: bool = False, **kwargs: Any) -> None:
        config = kwargs["args"]
        tokenizer = kwargs["processing_class"]
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = MaskedUnpairedCollator(
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                max_length=config.max_length, pad_to_multiple_of=config.pad_to_multiple_of)
        super().__init__(**kwargs)
        if fresh_adapter:
            reference_is_base(self)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if "prompt_ids" not in dataset.column_names or "completion_mask" not in dataset.column_names:
            raise ValueError(f"{dataset_name} dataset: expected rows encoded by "
                             "rlhf_plugins.stages.kto.data.encode_unpaired")
        if not self.calculate_KL or "KL_completion_ids" in dataset.column_names:
            return dataset

        def rotate(batch: dict[str, list]) -> dict[str, list]:
            # KL pairs (x_i, y_{i-1}) within each batch, as TRL's KTOTrainer builds them
            for key in ("completion_ids", "completion_mask"):
                batch[f"KL_{key}"] = batch[key][-1:] + batch[key][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size,
                           desc=f"KL completions of the {dataset_name} dataset")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in MASK_COLUMNS if c not in self._signature_columns]
