"""Messages: the conversation format every chat template accepts, and its validation.

Importing this module does not import torch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataError

__all__ = ["DEFAULT_ROLES", "validate_messages"]


#: roles every built-in understands; templates pass a narrower set where they support less
DEFAULT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
#: optional string fields a message may carry
_OPTIONAL_STR_FIELDS = ("name", "tool_call_id", "channel", "thinking", "reasoning_content")


def _where(row: Any, index: int | None) -> str:
    parts = []
    if row is not None:
        parts.append(f"row {row}")
    if index is not None:
        parts.append(f"message {index}")
    return ", ".join(parts)


def _fail(row: Any, index: int | None, text: str) -> "DataError":
    where = _where(row, index)
    return DataError(f"{where}: {text}" if where else text)


def validate_messages(messages: Any, *, row: Any = None, for_training: bool = False,
                      allowed_roles: Sequence[str] | None = DEFAULT_ROLES,
                      template: str | None = None) -> list[dict]:
    """Check a conversation; return it as a list of dicts or raise a one-line `DataError`.

    Rules: a non-empty list of mappings, each with a known string `role` and string `content`
    (an assistant message carrying `tool_calls` may omit content or set it to None); a system
    message only first; a `tool` message only after an assistant message with `tool_calls`
    (other tool results may sit in between); for training, the last message is an assistant
    turn. `allowed_roles=None` means `DEFAULT_ROLES`. `template` names the template in the
    error for a role it does not support.
    """
    if not isinstance(messages, (list, tuple)):
        raise _fail(row, None, f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise _fail(row, None, "empty conversation (no messages)")
    allowed = tuple(allowed_roles) if allowed_roles is not None else DEFAULT_ROLES
    out: list[dict] = []
    call_open = False  # an assistant tool call awaits its results
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _fail(row, index, f"a message must be a mapping with 'role' and 'content', "
                                    f"got {type(message).__name__}")
        if "role" not in message:
            raise _fail(row, index, "missing key 'role'")
        role = message["role"]
        if not isinstance(role, str):
            raise _fail(row, index, f"'role' must be a string, got {type(role).__name__}")
        if role not in allowed:
            if role in DEFAULT_ROLES or role == "developer":
                by = f"template {template!r}" if template else "this template"
                raise _fail(row, index, f"role {role!r} is not supported by {by} "
                                        f"(supported: {', '.join(allowed)})")
            raise _fail(row, index, f"unknown role {role!r} (expected one of: {', '.join(allowed)})")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise _fail(row, index, f"only assistant messages may carry 'tool_calls' (role {role!r})")
            if not isinstance(tool_calls, (list, tuple)) or not tool_calls:
                raise _fail(row, index, "'tool_calls' must be a non-empty list")
            for k, call in enumerate(tool_calls):
                fn = call.get("function", call) if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise _fail(row, index, f"tool call {k} needs a function 'name' (string)")
        if "content" not in message:
            if not tool_calls:
                raise _fail(row, index, "missing key 'content'")
        else:
            content = message["content"]
            if not isinstance(content, str) and not (content is None and tool_calls):
                raise _fail(row, index, f"'content' must be a string, got {type(content).__name__}")
        for key in _OPTIONAL_STR_FIELDS:
            if message.get(key) is not None and not isinstance(message[key], str):
                raise _fail(row, index, f"{key!r} must be a string, got {type(message[key]).__name__}")
        if role == "system" and index != 0:
            raise _fail(row, index, "a system message must be the first message")
        if role == "tool":
            if not call_open:
                raise _fail(row, index, "tool result without a preceding assistant tool call "
                                        "(an assistant message with 'tool_calls')")
        else:
            call_open = bool(tool_calls)
        msg = dict(message)
        if msg.get("content") is None:
            msg["content"] = ""
        out.append(msg)
    if for_training:
        last = out[-1]["role"]
        if last != "assistant":
            raise _fail(row, len(out) - 1, f"the conversation ends with a {last!r} turn; "
                                           "training needs a final assistant turn")
    return out
