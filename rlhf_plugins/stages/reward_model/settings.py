"""The reward-model stage's own settings (the rest of a config are TRL `RewardConfig` fields).

A light module (no torch): the pipeline checks every section with it before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ...config import check_strings
from ...errors import ConfigError
from ...models import LoraSettings, QuantSettings, resolve_adapter_settings
from ..bad_rows import BadRowsSettings
from ..skeleton import SYNTHETIC


@dataclass
class RMSettings(BadRowsSettings):
    """Our part of a reward-model config (the rest are TRL `RewardConfig` fields)."""

    #: HF model directory, hub id, .gguf, saved adapter (e.g. an SFT stage), or None/"default"
    model: str | None = None
    #: a reward_heads plugin: bradley_terry, orm, prm, value, ...
    head: str = "bradley_terry"
    #: shortcut for the head option `loss` (bradley_terry: pairwise, margin, plackett_luce, balanced)
    loss: str | None = None
    #: shortcut for the head option `aggregation` (orm: last/mean/min/product; prm: min/mean/product/last)
    aggregation: str | None = None
    #: any other head options, e.g. {delimiter: "\n"} for prm
    head_options: dict[str, Any] = field(default_factory=dict)
    template: str = "chatml"
    #: JSONL/JSON file, saved HF dataset dir, `load_dataset` name, or "synthetic" (the head's format)
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    dataset_config: str | None = None
    #: held-out data (same forms); None = synthetic test split for a synthetic dataset, else a
    #: hold-out of `eval_size`/`eval_fraction` training rows (or `eval_split` of `dataset`)
    eval_dataset: str | None = None
    #: the split evaluated on (of `eval_dataset`, default "test"; or of `dataset` when set alone)
    eval_split: str | None = None
    num_examples: int | None = None
    num_eval_examples: int | None = None
    dataset_seed: int = 0
    eval_fraction: float = 0.0
    eval_size: int | None = None
    #: the older spelling of `bad_rows`: true is `bad_rows: error`, false `bad_rows: skip`
    strict: bool | None = None
    #: bradley_terry: after training, shift scores so the reference (best) completions of the
    #: training data score 0 on average (InstructGPT)
    normalize: bool = False
    lora: LoraSettings | None = None
    peft: LoraSettings | None = None
    quantization: QuantSettings | None = None
    #: batch size of the final held-out scoring
    score_batch_size: int = 16
    #: after training, also run the Trainer's `evaluate()` on the held-out data (`eval_loss` and
    #: the loss's metrics); false: the held-out scorer alone, whose pairwise accuracy is the same
    #: number (tests/test_reward_stage.py), for half the evaluation time
    trainer_eval: bool = True
    resume: bool = True
    #: replace what the output directory holds (files of another program, a finished run)
    overwrite: bool = False

    def __post_init__(self) -> None:

        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        check_strings(self, ("head", "template", "dataset", "dataset_split"),
                      ("eval_split", "eval_dataset"))
        if self.strict is not None:
            if not isinstance(self.strict, bool):
                raise ConfigError(f"strict: expected true or false, got {self.strict!r}")
            self.bad_rows, self.strict = ("error" if self.strict else "skip"), None
        self.check_bad_rows()
        if not isinstance(self.head_options, Mapping):
            raise ConfigError(f"head_options: expected a mapping, got {self.head_options!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        for name in ("eval_size", "num_examples", "num_eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")

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
