"""The settings of an SFT stage (our fields; the rest of the section are TRL `SFTConfig` fields)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...config import check_strings
from ...errors import ConfigError
from ...models import LoraSettings, QuantSettings, resolve_adapter_settings
from ..bad_rows import BadRowsSettings
from ..skeleton import SYNTHETIC


@dataclass
class SFTSettings(BadRowsSettings):
    """Our part of an SFT config (the rest are TRL `SFTConfig` fields)."""

    #: HF model directory, hub id, .gguf file, or None / "default" for the embedded SmolLM2
    model: str | None = None
    #: JSON/JSONL/CSV/Parquet file, saved HF dataset directory, `load_dataset` name, or "synthetic"
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    #: `load_dataset` configuration name (hub/script datasets only)
    dataset_config: str | None = None
    #: column holding the conversation (list of {"role", "content"}); TRL's other formats work
    #: too: `prompt` + `completion` (message lists or plain strings: a user and an assistant
    #: turn) and language modelling `text` (tokenized as is + eos, every token trained)
    messages_field: str = "messages"
    #: keep at most this many rows (synthetic: how many problems to generate; default 256)
    num_examples: int | None = None
    #: seed of the synthetic task
    dataset_seed: int = 0
    template: str = "chatml"
    masking: str = "all_assistant_turns"
    #: LoRA adapter (None: full fine-tuning); `lora: {}` in YAML means the defaults
    lora: LoraSettings | None = None
    #: the same as `lora` (the issue's name for it); give one of the two
    peft: LoraSettings | None = None
    #: 4-bit base weights (QLoRA; needs `lora`); `quantization: {}` means NF4 + double quant
    quantization: QuantSettings | None = None
    #: hold out this fraction (0-1) or this many rows of the encoded data for evaluation
    eval_fraction: float = 0.0
    eval_size: int | None = None
    #: evaluate on this split (of `eval_dataset`, default `dataset`) instead of a hold-out
    eval_split: str | None = None
    #: evaluation rows from another source (same forms as `dataset`); default split: `dataset_split`
    eval_dataset: str | None = None
    #: evaluate the held-out rows before training too (metrics `eval_loss_before`)
    eval_before: bool = True
    #: also save the base model with the adapter merged in, under `<output_dir>/merged`
    merge: bool = False
    #: resume from the last checkpoint in the output directory when there is one
    resume: bool = True
    #: replace what the output directory holds (files of another program, a finished run)
    overwrite: bool = False

    def __post_init__(self) -> None:

        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        check_strings(self, ("dataset", "template", "masking", "dataset_split", "messages_field"))
        self.check_bad_rows()
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError(f"model: expected a string, got {self.model!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        for name in ("eval_size", "num_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
