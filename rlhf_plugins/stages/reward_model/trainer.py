"""The reward-model trainer: a ``transformers.Trainer`` whose loss is the reward head's.

:class:`RewardHeadTrainer` trains a :class:`~rlhf_plugins.stages.reward_model.model.RewardModel` on
rows encoded by the head (`head.encode`), logs the head's batch metrics the way TRL's
RewardTrainer does, and saves / resumes the reward artifact (adapter or backbone + head).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch
from transformers import Trainer
from trl.trainer.utils import disable_dropout_in_model

from ...errors import ConfigError
from ...guard import check_loss, guarded
from ...protocols import member
from .artifact import load_weights_into, save_reward_model
from .model import RewardModel

__all__ = ["FeatureDataset", "HeadCollator", "RewardHeadTrainer"]


class FeatureDataset(torch.utils.data.Dataset):
    """A list of encoded rows (dicts) as a map-style dataset."""

    def __init__(self, features: Sequence[Mapping[str, Any]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self.features[index]


class HeadCollator:
    """Calls the head component's `collate` with the tokenizer's pad id (picklable)."""

    def __init__(self, head: Any, pad_token_id: int, padding_side: str = "right") -> None:
        self.head, self.pad_token_id, self.padding_side = head, pad_token_id, padding_side

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        with guarded(self.head, "reward_heads", "collate()"):
            return self.head.collate(features, pad_token_id=self.pad_token_id,
                                     padding_side=self.padding_side)


class RewardHeadTrainer(Trainer):
    """A transformers Trainer whose loss is the reward head component's `compute_loss`.

    `model` is a :class:`RewardModel`; datasets hold rows encoded by `head.encode` (a
    :class:`FeatureDataset` or a list). `args` may be TRL's `RewardConfig` (its
    `disable_dropout` and `center_rewards_coefficient` are honoured) or any TrainingArguments.
    Metrics from `head.batch_metrics` are logged as TRL logs them (`accuracy`,
    `eval_accuracy`, ...), exact over the whole eval set.
    """

    def __init__(self, model: RewardModel, args: Any, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None,
                 data_collator: Any = None, **kwargs: Any) -> None:
        if not isinstance(model, RewardModel):
            raise ConfigError("RewardHeadTrainer: model must be a RewardModel (backbone + head)")
        tokenizer = processing_class if processing_class is not None else model.tokenizer
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if data_collator is None:
            data_collator = HeadCollator(model.head, 0 if pad_id is None else int(pad_id))
        if isinstance(train_dataset, list):
            train_dataset = FeatureDataset(train_dataset)
        if isinstance(eval_dataset, list):
            eval_dataset = FeatureDataset(eval_dataset)
        if getattr(args, "disable_dropout", False):
            disable_dropout_in_model(model)
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer,
                         data_collator=data_collator, **kwargs)
        self.can_return_loss = True
        self.label_names = []
        self._head_metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The head's loss on the batch (+ TRL's optional reward-centering term for BT)."""
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.head
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        with guarded(head, "reward_heads", "compute_loss()"):
            loss = head.compute_loss(outputs, inputs)
        check_loss(loss, head, "reward_heads", "compute_loss()",
                   needs_grad=torch.is_grad_enabled() and model.training,
                   given=f" for a batch of {inputs['input_ids'].shape[0]} sequences")
        coef = getattr(self.args, "center_rewards_coefficient", None)
        if coef and "pair_chosen" in inputs:
            with guarded(head, "reward_heads", "sequence_scores()"):
                scores = head.sequence_scores(outputs, inputs)
            loss = loss + coef * torch.mean(scores ** 2)
        mode = "train" if model.training else "eval"
        with guarded(head, "reward_heads", "batch_metrics()"):
            head_metrics = member(head, "reward_heads", "batch_metrics")(outputs, inputs)
            for key, (total, count) in head_metrics.items():  # (sum, count) per metric name
                acc = self._head_metrics[mode][str(key)]
                acc[0] += float(total)
                acc[1] += float(count)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """Evaluation: the loss only (metrics accumulate in `compute_loss`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the accumulated head metrics (prefixed `eval_` in evaluation) to the logs."""
        mode = "train" if self.model.training else "eval"
        metrics = {k: v[0] / v[1] for k, v in self._head_metrics[mode].items() if v[1] > 0}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        self._head_metrics[mode].clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Checkpoints and `save_model` write the reward artifact (adapter/backbone + head)."""
        if not self.args.should_save:
            return
        out = output_dir or self.args.output_dir
        save_reward_model(self.accelerator.unwrap_model(self.model), out)
        torch.save(self.args, os.path.join(out, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume: load the checkpoint's adapter/backbone weights and head weights."""
        load_weights_into(model or self.model, resume_from_checkpoint)
