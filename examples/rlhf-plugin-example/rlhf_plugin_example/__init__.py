"""An example third-party rlhf-plugins plugin: a Llama-3-style chat template and a reward function.

Installed, it is found through the `rlhf_plugins` entry point group; nothing else is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from rlhf_plugins import hookimpl
from rlhf_plugins.conversation import TEMPLATE_ROLE, Encoded

LLAMA3_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


class Llama3Template:
    """Llama-3 chat format: header tokens around the role, <|eot_id|> ends every turn."""

    name = "llama3"
    description = "Llama 3 chat format (<|start_header_id|>role<|end_header_id|>, <|eot_id|>)"
    jinja = LLAMA3_JINJA
    end_of_turn = "<|eot_id|>"

    def _segments(self, messages, tokenizer, add_generation_prompt):
        bos = getattr(tokenizer, "bos_token", None) or "" if tokenizer is not None else ""
        segments = [(bos, TEMPLATE_ROLE, -1)] if bos else []
        for i, m in enumerate(messages):
            segments.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", TEMPLATE_ROLE, -1))
            segments.append((m["content"].strip(), m["role"], i))
            segments.append((self.end_of_turn, m["role"], i))
        if add_generation_prompt:
            segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", TEMPLATE_ROLE, -1))
        return segments

    def render_text(self, messages, *, tokenizer=None, add_generation_prompt=False) -> str:
        return "".join(s for s, _, _ in self._segments(messages, tokenizer, add_generation_prompt))

    def encode(self, messages, *, tokenizer=None, add_generation_prompt=False) -> Encoded:
        if tokenizer is None:
            raise ValueError("llama3.encode needs a tokenizer")
        ids, roles, turns = [], [], []
        for text, role, turn in self._segments(messages, tokenizer, add_generation_prompt):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            roles += [role] * len(piece)
            turns += [turn] * len(piece)
        return Encoded(ids, roles, turns, self.render_text(
            messages, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt), list(messages))


def _text(completion) -> str:
    """A completion as text, whether TRL passes a string or a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


@dataclass(frozen=True)
class KeywordBonus:
    """Reward 1.0 when the completion mentions `keyword` (case-insensitive), else 0.0."""

    keyword: str = "please"
    name: str = "keyword_bonus"
    description: str = "1.0 when the completion contains the keyword, else 0.0"

    @property
    def __name__(self) -> str:  # TRL logs reward functions by __name__
        return self.name

    def configure(self, **options) -> "KeywordBonus":
        return replace(self, **options)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self.keyword.lower() in _text(c).lower()) for c in completions]


@hookimpl
def register_chat_templates(register):
    register(Llama3Template())


@hookimpl
def register_reward_functions(register):
    register(KeywordBonus())
