"""Built-in chat template ``harmony`` (family ``chat_templates``): OpenAI Harmony (gpt-oss).

Harmony brings its own vocabulary (`needs_tokenizer = False`) and renders through
openai-harmony itself, so besides `segments()` it overrides `render_text`/`encode`/`decode`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from rlhf_plugins import hookimpl, sdk
from rlhf_plugins.sdk import Encoded, TEMPLATE_ROLE

from .chat_templates import load_jinja

# --------------------------------------------------------------------------------------------
# Harmony (gpt-oss), rendered by openai-harmony itself
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Harmony(sdk.ChatTemplate):
    """OpenAI Harmony (gpt-oss) rendered by `openai-harmony`; per-token roles derived here.

    Messages map one to one (no system message is invented): system/developer/user as text;
    assistant content on its `channel` (default `final`), `thinking`/`reasoning_content` as a
    preceding `analysis` message, `tool_calls` as `commentary` messages to `functions.NAME`
    (`<|constrain|>json`); `tool` results come from `functions.NAME` on `commentary`.
    Training renders (last message from the assistant) use `render_conversation_for_training`
    (`<|return|>`) and keep the trained turn's reasoning (its analysis message; earlier turns'
    analysis follows harmony's drop rule), others `render_conversation`; `add_generation_prompt` uses
    `render_conversation_for_completion`. Per token: `<|start|>` + the author is scaffolding;
    an assistant message owns the rest of its header (channel, recipient - the model writes
    them after `<|start|>assistant`), its content and its `<|end|>`/`<|return|>`/`<|call|>`;
    other messages own their content and `<|end|>`. Analysis messages that harmony drops from
    earlier turns have no tokens. The `tokenizer` argument is ignored (o200k_harmony is used):
    `needs_tokenizer` is False and `decode` uses the same encoding.
    """

    name: ClassVar[str] = "harmony"
    description: ClassVar[str] = "OpenAI Harmony (gpt-oss) via openai-harmony; channels analysis/commentary/final"
    roles: ClassVar[tuple[str, ...]] = ("system", "developer", "user", "assistant", "tool")
    needs_tokenizer: ClassVar[bool] = False

    @property
    def jinja(self) -> str:
        """A Jinja equivalent for conversations without tool calls (templates/harmony.jinja)."""
        return load_jinja(self.name)

    @property
    def encoding(self) -> Any:
        """openai-harmony's gpt-oss encoding (offline o200k vocabulary)."""
        from rlhf_plugins.harmony_vocab import harmony_encoding

        return harmony_encoding()

    def harmony_messages(self, messages: Sequence[dict]) -> list[tuple[int, Any]]:
        """(message index, openai_harmony.Message) pairs for a validated conversation."""
        from openai_harmony import Author, Message, Role

        out: list[tuple[int, Any]] = []
        calls: list[str] = []
        for i, m in enumerate(messages):
            role = m["role"]
            if role in ("system", "developer", "user"):
                out.append((i, Message.from_role_and_content(Role(role), m["content"])))
            elif role == "assistant":
                thinking = m.get("thinking") or m.get("reasoning_content")
                if thinking:
                    out.append((i, Message.from_role_and_content(Role.ASSISTANT, thinking).with_channel("analysis")))
                if m["content"] or not m.get("tool_calls"):
                    out.append((i, Message.from_role_and_content(Role.ASSISTANT, m["content"])
                                .with_channel(m.get("channel") or "final")))
                calls = []
                for call in m.get("tool_calls") or ():
                    fn = call.get("function", call)
                    args = fn.get("arguments", {})
                    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    calls.append(fn["name"])
                    out.append((i, Message.from_role_and_content(Role.ASSISTANT, text).with_channel("commentary")
                                .with_recipient(f"functions.{fn['name']}").with_content_type("<|constrain|>json")))
            else:  # tool result: named by the message, else by the pending call it answers
                name = m.get("name") or (calls.pop(0) if calls else "tool")
                author = Author.new(Role.TOOL, name if "." in name else f"functions.{name}")
                out.append((i, Message.from_author_and_content(author, m["content"]).with_channel("commentary")))
        return out

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> tuple[list[int], list[tuple[int, Any]]]:
        from openai_harmony import Conversation, RenderConversationConfig, Role

        enc = self.encoding
        pairs = self.harmony_messages(messages)
        convo = Conversation.from_messages([m for _, m in pairs])
        if add_generation_prompt:
            ids = enc.render_conversation_for_completion(convo, Role.ASSISTANT)
        elif messages[-1]["role"] == "assistant":
            # The trained turn keeps its reasoning: harmony's default drops the analysis before
            # the first final message, which is the trained turn's own in a single-turn
            # conversation. Earlier turns keep harmony's rule: drop what its default drops.
            trained = len(messages) - 1
            dropped = self._dropped(list(enc.render_conversation_for_training(convo)), pairs)
            pairs = [p for k, p in enumerate(pairs) if k not in dropped or p[0] == trained]
            ids = enc.render_conversation_for_training(
                Conversation.from_messages([m for _, m in pairs]),
                RenderConversationConfig(auto_drop_analysis=False))
        else:
            ids = enc.render_conversation(convo)
        return list(ids), pairs

    def _dropped(self, ids: list[int], pairs: list[tuple[int, Any]]) -> set[int]:
        """Positions in `pairs` of the messages openai-harmony left out of `ids`."""
        enc = self.encoding
        ends = {enc.encode(t, allowed_special="all")[0] for t in ("<|end|>", "<|return|>", "<|call|>")}
        out: set[int] = set()
        pos = 0
        for k, (_, message) in enumerate(pairs):
            piece = enc.render(message)
            window = ids[pos:pos + len(piece)]
            if window and window[:-1] == piece[:-1] and window[-1] in ends and piece[-1] in ends:
                pos += len(piece)
            else:
                out.add(k)
        return out

    def render_text(self, messages: Sequence[dict], *, tokenizer: Any = None,
                    add_generation_prompt: bool = False) -> str:
        """The Harmony text openai-harmony renders."""
        ids, _ = self._render(self.validate(messages), add_generation_prompt)
        return self.encoding.decode_utf8(ids)

    def encode(self, messages: Sequence[dict], *, tokenizer: Any = None,
               add_generation_prompt: bool = False) -> Encoded:
        """openai-harmony's token ids with per-token roles/turns derived by aligning each message."""
        msgs = self.validate(messages)
        ids, pairs = self._render(msgs, add_generation_prompt)
        enc = self.encoding
        ends = {enc.encode(t, allowed_special="all")[0] for t in ("<|end|>", "<|return|>", "<|call|>")}
        message_tok = enc.encode("<|message|>", allowed_special="all")[0]
        roles = [TEMPLATE_ROLE] * len(ids)
        turns = [-1] * len(ids)
        pos = 0
        for index, message in pairs:
            piece = enc.render(message)
            n = len(piece)
            window = ids[pos:pos + n]
            if not (window[:-1] == piece[:-1] and window and window[-1] in ends and piece[-1] in ends):
                continue  # dropped by harmony (analysis of an earlier turn)
            role = msgs[index]["role"]
            own_from = 2 if role == "assistant" else piece.index(message_tok) + 1
            for k in range(pos + own_from, pos + n):
                roles[k], turns[k] = role, index
            pos += n
        return Encoded(ids, roles, turns, enc.decode_utf8(ids), list(msgs))

    def stop_strings(self, tokenizer: Any = None) -> list[str]:
        """`<|return|>` (final answer) and `<|call|>` (tool call) end an assistant turn."""
        return ["<|return|>", "<|call|>"]

    def stop_token_ids(self, tokenizer: Any = None) -> list[int]:
        """Harmony's stop tokens for assistant actions (o200k_harmony ids)."""
        return list(self.encoding.stop_tokens_for_assistant_actions())

    def decode(self, ids: Sequence[int], tokenizer: Any = None) -> str:
        """Text of o200k_harmony token ids (the tokenizer is ignored)."""
        return self.encoding.decode(list(ids))



@hookimpl
def register_chat_templates(register: Any) -> None:
    """Register the built-in Harmony template."""
    register(Harmony())
