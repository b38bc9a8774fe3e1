"""`Encoded`: a rendered conversation (token ids + per-token roles/turns), what every chat template returns.

The message format and `validate_messages` live in :mod:`rlhf_plugins.messages`; `Segment`,
`scaffold` and `encode_segments` (the injection-safe encoder the templates render through) in
:mod:`rlhf_plugins.segments`, which builds an `Encoded`. This module imports neither.

Importing this module does not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Encoded"]


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
