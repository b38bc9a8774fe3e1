"""Built-in chat templates: chatml, zephyr, tulu, tokenizer (family ``chat_templates``).

Each is a subclass of :class:`rlhf_plugins.sdk.ChatTemplate`, like any third-party template:
it implements `segments()` (scaffolding, message content, end-of-turn markers as owned
`Segment`s) and `jinja`, and the SDK base supplies validation, `render_text` (the segments
joined) and `encode` (the segments tokenized by `rlhf_plugins.segments.encode_segments`), so
per-token roles/turns are exact, message content can never produce a control token, and text
and ids always agree. `jinja` is the equivalent Jinja source (from `templates/NAME.jinja`),
saved as the tokenizer's chat_template; the tests prove the three agree byte for byte.
`stop_strings(tokenizer)` gives the strings that end an assistant turn (generation stops
there). Harmony (gpt-oss) is in ``harmony_template.py``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from rlhf_plugins import ConfigError, DataError, hookimpl, sdk
from rlhf_plugins.sdk import DEFAULT_ROLES, TEMPLATE_ROLE, Segment, option, scaffold


@functools.lru_cache(maxsize=None)
def load_jinja(name: str) -> str:
    """The Jinja source shipped as `rlhf_plugins/templates/{name}.jinja`."""
    from importlib.resources import files

    return files("rlhf_plugins.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def _eos(tokenizer: Any, template: str) -> str:
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if not isinstance(eos, str) or not eos:
        raise ConfigError(f"template {template!r} needs a tokenizer with an eos_token")
    return eos


def tool_call_text(call: dict) -> str:
    """A tool call as ChatML/Hermes text: `\\n<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ('\n<tool_call>\n{"name": ' + json.dumps(fn["name"], ensure_ascii=False)
            + ', "arguments": ' + args_text + '}\n</tool_call>')


def reject_forged_headers(template: str, messages: Sequence[dict], tokenizer: Any,
                          markers: Sequence[str]) -> None:
    """DataError when message content holds one of the template's turn markers that `tokenizer`
    reads as plain text (not one of its added tokens).

    A marker that is an added (special) token is safe: content is tokenized as plain text, so
    it never yields the marker's id. A marker that is ordinary text tokenizes the same in
    content as in the template's scaffolding, so ``"\n<|assistant|>\n..."`` in a user message
    would be a turn the model cannot tell from a real one: such content is rejected, never
    silently rewritten (see docs/concepts/chat_templates.md).
    """
    added = set(getattr(tokenizer, "added_tokens_encoder", None) or {}) if tokenizer is not None else set()
    plain = [m for m in markers if m and m not in added]
    if not plain:
        return
    for i, message in enumerate(messages):
        texts = [message.get("content")]
        texts += [json.dumps(call, ensure_ascii=False, default=str) for call in message.get("tool_calls") or ()]
        for text in texts:
            if not isinstance(text, str):
                continue
            found = next((m for m in plain if m in text), None)
            if found is not None:
                raise DataError(f"message {i}: content contains {found!r}, a turn marker of template "
                                f"{template!r} that this tokenizer reads as plain text, so it would "
                                "forge a turn; remove it from the data (or use a tokenizer that has "
                                f"{found!r} as a special token)")


@dataclass(frozen=True)
class ChatML(sdk.ChatTemplate):
    """ChatML: `<|im_start|>{role}\\n{content|trim}<|im_end|>\\n`; BOS first unless it is `<|im_start|>`."""

    name: ClassVar[str] = "chatml"
    description: ClassVar[str] = ("ChatML (<|im_start|>role ... <|im_end|>), content trimmed; "
                                  "BOS unless it is <|im_start|>")
    roles: ClassVar[tuple[str, ...]] = DEFAULT_ROLES

    @property
    def jinja(self) -> str:
        """templates/chatml.jinja."""
        return load_jinja("chatml")

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as owned segments."""
        reject_forged_headers(self.name, messages, tokenizer, ("<|im_start|>", "<|im_end|>"))
        out: list[Segment] = []
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
        if isinstance(bos, str) and bos and bos != "<|im_start|>":
            out.append(scaffold(bos))
        for i, m in enumerate(messages):
            role = m["role"]
            body = (m.get("content") or "").strip()
            for call in m.get("tool_calls") or ():
                body += tool_call_text(call)
            out += [scaffold(f"<|im_start|>{role}\n"), Segment(body, role, i, True),
                    Segment("<|im_end|>", role, i, False), scaffold("\n")]
        if add_generation_prompt:
            out.append(scaffold("<|im_start|>assistant\n"))
        return out

    def stop_strings(self, tokenizer: Any = None) -> list[str]:
        """`<|im_end|>` ends every ChatML turn."""
        return ["<|im_end|>"]


def _role_tag_eos(template: Any, messages: Sequence[dict], tokenizer: Any) -> str:
    """The eos of a `<|role|>`-tagged template, after rejecting content that forges a tag."""
    eos = _eos(tokenizer, template.name)
    reject_forged_headers(template.name, messages, tokenizer,
                          [f"<|{role}|>" for role in template.roles] + [eos])
    return eos


@dataclass(frozen=True)
class Zephyr(sdk.ChatTemplate):
    """Zephyr-7B-beta: `<|{role}|>\\n{content}{eos}\\n`; generation prompt `<|assistant|>\\n`."""

    name: ClassVar[str] = "zephyr"
    description: ClassVar[str] = "Zephyr-7B-beta (<|role|>\\n content eos \\n)"

    @property
    def jinja(self) -> str:
        """templates/zephyr.jinja."""
        return load_jinja("zephyr")

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as owned segments."""
        eos = _role_tag_eos(self, messages, tokenizer)
        out: list[Segment] = []
        for i, m in enumerate(messages):
            role = m["role"]
            out += [scaffold(f"<|{role}|>\n"), Segment(m["content"], role, i, True),
                    Segment(eos, role, i, False), scaffold("\n")]
        if add_generation_prompt:
            out.append(scaffold("<|assistant|>\n"))
        return out


@dataclass(frozen=True)
class Tulu(sdk.ChatTemplate):
    """Tulu 3 (open-instruct): `<|user|>\\n{c}\\n`, `<|assistant|>\\n{c}{eos}` + `\\n` unless last."""

    name: ClassVar[str] = "tulu"
    description: ClassVar[str] = "Tulu 3 (<|user|>\\n c \\n, <|assistant|>\\n c eos [\\n])"

    @property
    def jinja(self) -> str:
        """templates/tulu.jinja."""
        return load_jinja("tulu")

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as owned segments."""
        eos = _role_tag_eos(self, messages, tokenizer)
        out: list[Segment] = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            role = m["role"]
            out += [scaffold(f"<|{role}|>\n"), Segment(m["content"], role, i, True)]
            if role == "assistant":
                out.append(Segment(eos, role, i, False))
                if i != last:
                    out.append(scaffold("\n"))
            else:  # the newline ends a system/user turn
                out.append(Segment("\n", role, i, False))
        if add_generation_prompt:
            out.append(scaffold("<|assistant|>\n"))
        return out


# --------------------------------------------------------------------------------------------
# The tokenizer's own chat_template (or a Jinja file), rendered in a sandbox
# --------------------------------------------------------------------------------------------

_MARK_OPEN, _MARK_CLOSE = "\ue002", "\ue003"  # private-use: control tokens inside other fields


def _placeholder_pair(text: str) -> tuple[str, str]:
    """Two private-use characters (content placeholders) that occur nowhere in `text`."""
    free = (chr(c) for c in range(0xE000, 0xF900)
            if chr(c) not in text and chr(c) not in (_MARK_OPEN, _MARK_CLOSE))
    try:
        return next(free), next(free)
    except StopIteration:  # pragma: no cover - content using the whole private-use area
        raise DataError("template 'tokenizer': the conversation uses every private-use "
                        "character; no placeholder is left") from None


def _special_context(tokenizer: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for key, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        ctx[key] = value
    return ctx


@dataclass(frozen=True)
class TokenizerTemplate(sdk.ChatTemplate):
    """The tokenizer's own Jinja `chat_template` (sandboxed); roles recovered with placeholders.

    Each message's content is replaced by a unique placeholder, the template is rendered, and
    the placeholders give exact content spans; the result is checked against the real
    rendering. The control token right after a content span is the message's end-of-turn.
    Text a template renders from other fields (tool calls, reasoning) counts as scaffolding,
    but control tokens inside it are still encoded as plain text.
    """

    name: ClassVar[str] = "tokenizer"
    description: ClassVar[str] = "the tokenizer's own Jinja chat_template (sandboxed), roles recovered per token"
    roles: ClassVar[tuple[str, ...]] = DEFAULT_ROLES

    jinja: str = option("", help="Jinja chat template rendered instead of the tokenizer's own "
                                 "('': the tokenizer's chat_template)")
    path: str | None = option(None, help="a Jinja file to read `jinja` from")

    def validate_options(self) -> None:
        """Read `path` into `jinja`; an explicit source must not be blank."""
        if self.path is not None:
            try:
                with open(self.path, encoding="utf-8") as fh:
                    object.__setattr__(self, "jinja", fh.read())
            except OSError as exc:
                raise ConfigError(f"template file {self.path}: {exc.strerror}") from None
        if self.jinja and not self.jinja.strip():
            raise ConfigError("template 'tokenizer': option 'jinja' is blank (give a Jinja source, "
                              "or '' for the tokenizer's own chat_template)")

    def configure(self, **options: Any) -> "TokenizerTemplate":
        """A copy with `jinja` or `path` set (the one given last replaces the other)."""
        if "jinja" in options and "path" not in options:
            options["path"] = None
        return super().configure(**options)

    def _source(self, tokenizer: Any) -> str:
        if self.jinja:
            return self.jinja
        tpl = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(tpl, dict):
            tpl = tpl.get("default")
        if not isinstance(tpl, str) or not tpl:
            raise ConfigError("template 'tokenizer': the tokenizer has no chat_template "
                              "(choose a built-in template or give a Jinja file)")
        return tpl

    def _render(self, source: str, messages: Sequence[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
        from rlhf_plugins.jinja_sandbox import render_template

        return render_template(source, messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **_special_context(tokenizer))

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as owned segments."""
        import re

        source = self._source(tokenizer)
        text = self._render(source, messages, tokenizer, add_generation_prompt)
        controls = sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}, key=len, reverse=True)
        control_re = re.compile("|".join(map(re.escape, controls))) if controls else None

        def mark(value: Any) -> Any:
            if isinstance(value, str):
                value = value.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
                if control_re is None:
                    return value
                return control_re.sub(lambda m: _MARK_OPEN + m.group(0) + _MARK_CLOSE, value)
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [mark(v) for v in value]
            return value

        ph_open, ph_close = _placeholder_pair(
            text + "".join(m["content"] for m in messages if isinstance(m.get("content"), str)))
        # Placeholders for every content first (so empty messages keep their end-of-turn token),
        # then only for non-empty ones (templates that test `if message.content`).
        for with_empty in (True, False):
            probe = []
            for i, m in enumerate(messages):
                marked = {k: (v if k in ("role", "content") else mark(v)) for k, v in m.items()}
                if m.get("content") or with_empty:
                    marked["content"] = f"{ph_open}{i}{ph_close}"
                probe.append(marked)
            rendered = self._render(source, probe, tokenizer, add_generation_prompt)
            pieces = re.split(f"{ph_open}(\\d+){ph_close}", rendered)
            for strip in (False, True):
                out = self._assemble(pieces, messages, strip, control_re)
                if "".join(s.text for s in out) == text:
                    return out
        raise DataError("template 'tokenizer': cannot locate message contents in the rendered "
                        "chat template (the template transforms content); use a built-in template")

    def _assemble(self, pieces: list[str], messages: Sequence[dict], strip: bool, control_re: Any) -> list[Segment]:
        out: list[Segment] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                i = int(piece)
                body = messages[i]["content"].strip() if strip else messages[i]["content"]
                out.append(Segment(body, messages[i]["role"], i, True))
                continue
            if not piece:
                continue
            if k and control_re is not None and out and out[-1].turn >= 0:
                # the control token right after a content span ends that message's turn
                first = control_re.match(piece)
                if first:
                    prev = out[-1]
                    out.append(Segment(first.group(0), prev.role, prev.turn, False))
                    piece = piece[first.end():]
            out += self._scaffold_pieces(piece)
        return out

    @staticmethod
    def _scaffold_pieces(text: str) -> list[Segment]:
        if _MARK_OPEN not in text:
            return [scaffold(text)] if text else []
        out: list[Segment] = []
        # marked spans (control tokens from user fields) are plain text; stray markers are dropped
        for k, part in enumerate(text.split(_MARK_OPEN)):
            if k == 0:
                if part:
                    out.append(scaffold(part.replace(_MARK_CLOSE, "")))
                continue
            literal, _, rest = part.partition(_MARK_CLOSE)
            if literal:
                out.append(Segment(literal, TEMPLATE_ROLE, -1, True))
            if rest:
                out.append(scaffold(rest.replace(_MARK_CLOSE, "")))
        return out

    def render_text(self, messages: Sequence[dict], *, tokenizer: Any = None,
                    add_generation_prompt: bool = False) -> str:
        """The tokenizer's chat_template rendered in the sandbox."""
        msgs = self.validate(messages)
        return self._render(self._source(tokenizer), msgs, tokenizer, add_generation_prompt)

    def stop_strings(self, tokenizer: Any = None) -> list[str]:
        """The tokenizer's eos plus common end-of-turn tokens it has (`<|im_end|>`, `<|eot_id|>`, ...)."""
        out = [_eos(tokenizer, self.name)]
        added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|return|>"):
            if tok in added and tok not in out:
                out.append(tok)
        return out


@hookimpl
def register_chat_templates(register: Any) -> None:
    """Register the built-in chat templates."""
    register(ChatML())
    register(Zephyr())
    register(Tulu())
    register(TokenizerTemplate())
