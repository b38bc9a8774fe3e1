"""Conversation validation: one-line DataErrors naming the row and message index."""
from __future__ import annotations

import pytest

from rlhf_plugins.conversation import Encoded
from rlhf_plugins.errors import DataError
from rlhf_plugins.messages import validate_messages

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}
TOOL = {"role": "tool", "content": "3"}


def test_valid_conversations_pass_and_none_content_becomes_empty():
    out = validate_messages([{"role": "system", "content": "s"}, U, CALL, TOOL, TOOL, A], for_training=True)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert out[2]["content"] == "" and CALL["content"] is None  # input not mutated


@pytest.mark.parametrize("messages, row, expected", [
    ([U, {"role": "bot", "content": "x"}], 7, "row 7, message 1: unknown role 'bot'"),
    ([U, {"role": "assistant", "content": 3}], 2, "row 2, message 1: 'content' must be a string, got int"),
    ([{"content": "x"}], 0, "row 0, message 0: missing key 'role'"),
    ([{"role": "user"}], 5, "row 5, message 0: missing key 'content'"),
    ([U, {"role": "system", "content": "s"}], 1, "row 1, message 1: a system message must be the first"),
    ([U, TOOL], 3, "row 3, message 1: tool result without a preceding assistant tool call"),
    ([U, A, TOOL], 3, "row 3, message 2: tool result without a preceding assistant tool call"),
    ([U, CALL, TOOL, U, TOOL], 4, "row 4, message 4: tool result without"),
    ([], 9, "row 9: empty conversation"),
    ("hello", 9, "row 9: a conversation must be a list"),
    ([U, "x"], None, "message 1: a message must be a mapping"),
    ([U, {"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}], 1,
     "row 1, message 1: only assistant messages may carry 'tool_calls'"),
    ([U, {"role": "assistant", "content": "x", "tool_calls": [{"arguments": {}}]}], 1,
     "row 1, message 1: tool call 0 needs a function 'name'"),
    ([U, {"role": "assistant", "content": "x", "thinking": 5}], 1, "row 1, message 1: 'thinking' must be a string"),
])
def test_invalid_conversations(messages, row, expected):
    with pytest.raises(DataError) as info:
        validate_messages(messages, row=row)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_training_conversation_must_end_with_assistant():
    validate_messages([U])  # fine for generation prompts
    with pytest.raises(DataError, match=r"^row 4, message 2: the conversation ends with a 'user' turn"):
        validate_messages([U, A, U], row=4, for_training=True)
    with pytest.raises(DataError, match=r"message 3: the conversation ends with a 'tool' turn"):
        validate_messages([U, A, CALL, TOOL], for_training=True)


def test_role_not_supported_by_template_is_named():
    with pytest.raises(DataError, match=r"message 2: role 'tool' is not supported by template 'zephyr'"):
        validate_messages([U, CALL, TOOL], allowed_roles=("system", "user", "assistant"), template="zephyr")


def test_encoded_lengths_must_agree():
    with pytest.raises(ValueError):
        Encoded([1, 2], ["user"], [0])
