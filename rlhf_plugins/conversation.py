"""Conversations: the segment-aware encoding every chat template returns.

(Validation of messages lives here too; see `validate_messages`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

TEMPLATE_ROLE = "template"


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
