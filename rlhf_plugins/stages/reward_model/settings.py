"""The reward-model stage's own settings (the rest of a config are TRL `RewardConfig` fields).

A light module (no torch): the pipeline checks every section with it before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ...config import check_strings
from ...errors import ConfigError
from ..training_settings import HoldOutSettings, check_positive_ints


@dataclass
class RMSettings(HoldOutSettings):
    """Our part of a reward-model config (the rest are TRL `RewardConfig` fields); the shared
    fields (model, dataset, eval_*, template, lora, quantization, ...) are
    :class:`HoldOutSettings`'. `dataset: synthetic` is the head's format; `eval_dataset` None
    is the synthetic test split for a synthetic dataset, else a hold-out of
    `eval_size`/`eval_fraction` training rows (or `eval_split` of `dataset`, default "test")."""

    #: a reward_heads plugin: bradley_terry, orm, prm, value, ...
    head: str = "bradley_terry"
    #: shortcut for the head option `loss` (bradley_terry: pairwise, margin, plackett_luce, balanced)
    loss: str | None = None
    #: shortcut for the head option `aggregation` (orm: last/mean/min/product; prm: min/mean/product/last)
    aggregation: str | None = None
    #: any other head options, e.g. {delimiter: "\n"} for prm
    head_options: dict[str, Any] = field(default_factory=dict)
    num_eval_examples: int | None = None
    #: the older spelling of `bad_rows`: true is `bad_rows: error`, false `bad_rows: skip`
    strict: bool | None = None
    #: bradley_terry: after training, shift scores so the reference (best) completions of the
    #: training data score 0 on average (InstructGPT)
    normalize: bool = False
    #: batch size of the final held-out scoring
    score_batch_size: int = 16
    #: after training, also run the Trainer's `evaluate()` on the held-out data (`eval_loss` and
    #: the loss's metrics); false: the held-out scorer alone, whose pairwise accuracy is the same
    #: number (tests/test_reward_stage.py), for half the evaluation time
    trainer_eval: bool = True

    def __post_init__(self) -> None:
        if self.strict is not None:  # before the shared checks read bad_rows
            if not isinstance(self.strict, bool):
                raise ConfigError(f"strict: expected true or false, got {self.strict!r}")
            self.bad_rows, self.strict = ("error" if self.strict else "skip"), None
        super().__post_init__()
        check_strings(self, ("head", "template"))
        if not isinstance(self.head_options, Mapping):
            raise ConfigError(f"head_options: expected a mapping, got {self.head_options!r}")
        check_positive_ints(self, "num_eval_examples")

    def head_config(self) -> dict[str, Any]:
        """The options passed to the head component."""
        options = dict(self.head_options)
        if self.loss is not None:
            options["loss"] = self.loss
        if self.aggregation is not None:
            options["aggregation"] = self.aggregation
        if self.normalize:
            options.setdefault("normalize", True)
        return options
