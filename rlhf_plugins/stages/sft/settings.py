"""The settings of an SFT stage (our fields; the rest of the section are TRL `SFTConfig` fields)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import check_strings
from ..training_settings import HoldOutSettings


@dataclass
class SFTSettings(HoldOutSettings):
    """Our part of an SFT config (the rest are TRL `SFTConfig` fields); the shared fields
    (model, dataset, eval_*, template, lora, quantization, ...) are :class:`HoldOutSettings`'."""

    #: column holding the conversation (list of {"role", "content"}); TRL's other formats work
    #: too: `prompt` + `completion` (message lists or plain strings: a user and an assistant
    #: turn) and language modelling `text` (tokenized as is + eos, every token trained)
    messages_field: str = "messages"
    #: the masking_strategies plugin choosing the trained tokens
    masking: str = "all_assistant_turns"
    #: evaluate the held-out rows before training too (metrics `eval_loss_before`)
    eval_before: bool = True
    #: also save the base model with the adapter merged in, under `<output_dir>/merged`
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_strings(self, ("template", "masking", "messages_field"))
