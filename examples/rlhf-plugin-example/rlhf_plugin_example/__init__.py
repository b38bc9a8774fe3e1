"""An example third-party rlhf-plugins plugin: a Llama-3-style chat template and a reward function.

Both are built on :mod:`rlhf_plugins.sdk`: the template implements only ``segments()`` and
``jinja`` (the base supplies validation, rendering, the injection-safe ``encode``, decoding),
the reward function only ``__call__`` with one typed option. Installed, the plugin is found
through the `rlhf_plugins` entry point group; nothing else is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from rlhf_plugins import hookimpl, sdk
from rlhf_plugins.sdk import Segment, option, scaffold

LLAMA3_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

END_OF_TURN = "<|eot_id|>"


@dataclass(frozen=True)
class Llama3Template(sdk.ChatTemplate):
    """Llama-3 chat format: header tokens around the role, <|eot_id|> ends every turn."""

    name: ClassVar[str] = "llama3"
    description: ClassVar[str] = "Llama 3 chat format (<|start_header_id|>role<|end_header_id|>, <|eot_id|>)"
    jinja: ClassVar[str] = LLAMA3_JINJA

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """BOS, then per message: header (scaffolding), content (data), <|eot_id|> (its end of turn)."""
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
        out = [scaffold(bos)] if bos else []
        for i, m in enumerate(messages):
            role = m["role"]
            out += [scaffold(f"<|start_header_id|>{role}<|end_header_id|>\n\n"),
                    Segment(m["content"].strip(), role, i, literal=True),  # content: never a control token
                    Segment(END_OF_TURN, role, i)]  # the end of turn belongs to the message (trained)
        if add_generation_prompt:
            out.append(scaffold("<|start_header_id|>assistant<|end_header_id|>\n\n"))
        return out

    def stop_strings(self, tokenizer: Any = None) -> list[str]:
        """<|eot_id|> ends every Llama-3 turn (generation stops there)."""
        return [END_OF_TURN]


def _text(completion: Any) -> str:
    """A completion as text, whether TRL passes a string or a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


@dataclass(frozen=True)
class KeywordBonus(sdk.RewardFunction):
    """Reward 1.0 when the completion mentions `keyword` (case-insensitive), else 0.0."""

    name: ClassVar[str] = "keyword_bonus"
    description: ClassVar[str] = "1.0 when the completion contains the keyword, else 0.0"

    keyword: str = option("please", help="the word to look for (case-insensitive)")

    def validate_options(self) -> None:
        """The keyword must not be empty (every completion would match)."""
        if not self.keyword:
            raise ValueError("option 'keyword' must not be empty")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [float(self.keyword.lower() in _text(c).lower()) for c in completions]


@hookimpl
def register_chat_templates(register):
    register(Llama3Template())


@hookimpl
def register_reward_functions(register):
    register(KeywordBonus())
