"""Conversations: `Encoded` (token ids + per-token roles/turns), what every chat template returns.

The pieces live in two modules, re-exported here so ``from rlhf_plugins.conversation import ...``
keeps working:

- :mod:`rlhf_plugins.messages`: the message format and `validate_messages`;
- :mod:`rlhf_plugins.segments`: `Segment`, `scaffold` and `encode_segments`, the
  injection-safe encoder the templates render through.

Importing this module does not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .messages import DEFAULT_ROLES, validate_messages
from .segments import (TEMPLATE_ROLE, Segment, _SegmentEncoder, encode_segments, scaffold,
                       segment_encoder)

__all__ = ["Encoded", "TEMPLATE_ROLE", "DEFAULT_ROLES", "validate_messages", "Segment", "scaffold",
           "segment_encoder", "encode_segments"]


@dataclass
class Encoded:
    """A rendered conversation: token ids plus, per token, its message role and index.

    `roles[i]` is the role of the message token i belongs to, or "template" for scaffolding
    (such as `<|im_start|>assistant\\n`); `turns[i]` is that message's index, or -1. The
    end-of-turn token of a message belongs to the message.
    """

    input_ids: list[int]
    roles: list[str]
    turns: list[int]
    text: str = ""
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.input_ids) == len(self.roles) == len(self.turns)):
            raise ValueError("Encoded: input_ids, roles and turns must have the same length "
                             f"({len(self.input_ids)}, {len(self.roles)}, {len(self.turns)})")

    def __len__(self) -> int:
        return len(self.input_ids)
