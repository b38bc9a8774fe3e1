"""Built-in loss-masking strategies (family ``masking_strategies``).

Each is a subclass of :class:`rlhf_plugins.sdk.MaskingStrategy` implementing only
`mask(encoded) -> list[int]` (1 = in the loss), from the per-token `roles`/`turns` of an
`Encoded`. For the assistant strategies, scaffolding (`<|im_start|>assistant\\n`, role
"template") and tool outputs (role "tool") are never trained, while an assistant message's
end-of-turn token is (it belongs to the message: a model that never sees its stop token in
the loss never learns to stop).

- `all_assistant_turns` (Tulu 3): every assistant message.
- `final_turn`: only the last assistant message.
- `prompt`: prompt/completion masking. The prompt is everything up to and including the last
  user (or system/developer) message; every assistant message after it is the completion.
  On `[user, assistant]` (and whenever one assistant message follows the last user turn)
  this equals `final_turn`. They differ when the completion spans several messages, e.g.
  `user, assistant(tool call), tool, assistant(answer)`: `prompt` trains both assistant
  messages (the tool output stays masked), `final_turn` only the answer.
- `none`: every token, scaffolding and tool outputs included (pretraining-style baseline,
  for comparison only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import hookimpl, sdk

_PROMPT_ROLES = frozenset({"system", "developer", "user"})


@dataclass(frozen=True)
class AllAssistantTurns(sdk.MaskingStrategy):
    """Train every assistant message (content + end-of-turn token)."""

    name: ClassVar[str] = "all_assistant_turns"
    description: ClassVar[str] = "every assistant message and its end-of-turn token (Tulu 3)"

    def mask(self, encoded: Any) -> list[int]:
        """1 for assistant tokens, 0 elsewhere."""
        return [1 if role == "assistant" else 0 for role in encoded.roles]


@dataclass(frozen=True)
class FinalTurn(sdk.MaskingStrategy):
    """Train only the last assistant message (content + end-of-turn token)."""

    name: ClassVar[str] = "final_turn"
    description: ClassVar[str] = "only the last assistant message and its end-of-turn token"

    def mask(self, encoded: Any) -> list[int]:
        """1 for the tokens of the last assistant message, 0 elsewhere."""
        last = max((t for r, t in zip(encoded.roles, encoded.turns) if r == "assistant"), default=None)
        if last is None:
            return [0] * len(encoded.roles)
        return [1 if (t == last and r == "assistant") else 0 for r, t in zip(encoded.roles, encoded.turns)]


@dataclass(frozen=True)
class PromptMasking(sdk.MaskingStrategy):
    """Mask the prompt (through the last user turn); train the assistant messages after it."""

    name: ClassVar[str] = "prompt"
    description: ClassVar[str] = "prompt/completion: assistant messages after the last user turn"

    def mask(self, encoded: Any) -> list[int]:
        """1 for assistant tokens after the last user/system message, 0 elsewhere."""
        boundary = max((t for r, t in zip(encoded.roles, encoded.turns) if r in _PROMPT_ROLES), default=-1)
        return [1 if (r == "assistant" and t > boundary) else 0 for r, t in zip(encoded.roles, encoded.turns)]


@dataclass(frozen=True)
class NoMasking(sdk.MaskingStrategy):
    """Train every token (pretraining-style baseline)."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "every token, scaffolding included (pretraining-style, for comparison)"

    def mask(self, encoded: Any) -> list[int]:
        """All ones."""
        return [1] * len(encoded.roles)


@hookimpl
def register_masking_strategies(register: Any) -> None:
    """Register the built-in masking strategies."""
    register(AllAssistantTurns())
    register(FinalTurn())
    register(PromptMasking())
    register(NoMasking())
