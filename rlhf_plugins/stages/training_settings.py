"""The fields the stages' settings share: :class:`SourceSettings` (every stage reading a model
and a dataset), :class:`TrainingSettings` (the training stages) and :class:`HoldOutSettings`.

`sft`, `reward_model`, `ppo`, `dpo` and `kto` all read a model and a dataset, may evaluate on
another split or source, train a LoRA adapter on an optionally 4-bit base, resume and refuse to
replace what they did not write. Each stage's settings class adds its own fields to these (and
the rest of a section are the stage's TRL config fields). Field order does not matter to stage
hashes (``config_hash`` sorts keys).

Light module (no torch): the pipeline checks every section with it before anything loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import check_strings
from ..errors import ConfigError
from ..models import LoraSettings, QuantSettings, resolve_adapter_settings
from .bad_rows import BadRowsSettings
from .skeleton import SYNTHETIC

__all__ = ["HoldOutSettings", "SourceSettings", "TrainingSettings", "check_positive_ints"]


@dataclass
class SourceSettings(BadRowsSettings):
    """Where a stage's model and rows come from, and what it may replace (every stage that reads
    a model and a dataset: the training stages and rejection sampling)."""

    #: HF model directory, hub id, .gguf file, saved LoRA adapter (an earlier stage's output), or
    #: None / "default" for the embedded SmolLM2
    model: str | None = None
    #: a JSON/JSONL/CSV/Parquet file, a saved HF dataset directory, a `load_dataset` name or hub
    #: id, or "synthetic" (the built-in verifiable task in the stage's format)
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    #: `load_dataset` configuration name (hub/script datasets only)
    dataset_config: str | None = None
    #: seed of the synthetic task
    dataset_seed: int = 0
    #: the chat_templates plugin rendering every row (its Jinja is saved with the model)
    template: str = "chatml"
    #: replace what the output directory holds (files of another program, a finished run)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError(f"model: expected a string, got {self.model!r}")
        check_strings(self, ("dataset", "dataset_split"))
        if isinstance(self.dataset_seed, bool) or not isinstance(self.dataset_seed, int):
            raise ConfigError(f"dataset_seed: expected an integer, got {self.dataset_seed!r}")
        self.check_bad_rows()


@dataclass
class TrainingSettings(SourceSettings):
    """A training stage's source plus its data limits, evaluation source, adapter and resuming."""

    #: keep at most this many rows (synthetic: how many problems to generate)
    num_examples: int | None = None
    #: evaluate on this split (of `eval_dataset`, default `dataset`) instead of a hold-out
    eval_split: str | None = None
    #: evaluation rows from another source (same forms as `dataset`)
    eval_dataset: str | None = None
    #: LoRA adapter (None: full fine-tuning); `lora: {}` in YAML means the defaults
    lora: LoraSettings | None = None
    #: the same as `lora` (the issue's name for it); give one of the two
    peft: LoraSettings | None = None
    #: 4-bit base weights (QLoRA; needs `lora`); `quantization: {}` means NF4 + double quant
    quantization: QuantSettings | None = None
    #: resume from the last checkpoint in the output directory when there is one
    resume: bool = True

    def __post_init__(self) -> None:
        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        super().__post_init__()
        check_strings(self, (), ("eval_split", "eval_dataset"))
        check_positive_ints(self, "num_examples")


def check_positive_ints(settings: object, *names: str) -> None:
    """ConfigError for a field of `settings` among `names` that is neither None nor an int >= 1."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


@dataclass
class HoldOutSettings(TrainingSettings):
    """A training stage that can also hold rows of its own data out for evaluation (sft,
    reward_model, dpo, kto)."""

    #: hold out this fraction (0-1) or this many rows of the encoded data for evaluation
    eval_fraction: float = 0.0
    eval_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        check_positive_ints(self, "eval_size")
