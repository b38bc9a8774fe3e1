"""Masking strategies on concrete conversations, checked by hand as text spans."""
from __future__ import annotations

import pytest

from helpers_tokenizers import make_tokenizer
from rlhf_plugins import registry

TOK = make_tokenizer("smollm2")
SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello!"}
U2 = {"role": "user", "content": "2+2?"}
A2 = {"role": "assistant", "content": "4"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 2}}]}
TOOL = {"role": "tool", "content": "4"}


def trained_spans(template, masking, messages, tokenizer=TOK):
    """Decode each maximal run of trained tokens (the hand-checkable view of a mask)."""
    enc = registry().chat_templates.get(template).encode(messages, tokenizer=tokenizer)
    mask = registry().masking_strategies.get(masking).mask(enc)
    assert len(mask) == len(enc.input_ids) and set(mask) <= {0, 1}
    spans, cur = [], []
    for tid, m in zip(enc.input_ids, mask):
        if m:
            cur.append(tid)
        elif cur:
            spans.append(tokenizer.decode(cur)), cur.clear()
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans


MULTI = [SYS, U1, A1, U2, A2]


@pytest.mark.parametrize("masking, expected", [
    ("all_assistant_turns", ["Hello!<|im_end|>", "4<|im_end|>"]),
    ("final_turn", ["4<|im_end|>"]),
    ("prompt", ["4<|im_end|>"]),
    ("none", ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"]),
])
def test_chatml_multi_turn(masking, expected):
    assert trained_spans("chatml", masking, MULTI) == expected


@pytest.mark.parametrize("masking, expected", [
    ("all_assistant_turns", ["Hello!</s>", "4</s>"]),
    ("final_turn", ["4</s>"]),
    ("prompt", ["4</s>"]),
])
def test_zephyr_and_tulu_train_the_eos(masking, expected):
    tok = make_tokenizer("default")
    assert trained_spans("zephyr", masking, MULTI, tok) == expected
    assert trained_spans("tulu", masking, MULTI, tok) == expected


def test_prompt_equals_final_turn_on_two_messages():
    for name in ("chatml", "zephyr", "tulu"):
        tok = make_tokenizer("default")
        assert trained_spans(name, "prompt", [U1, A1], tok) == trained_spans(name, "final_turn", [U1, A1], tok)


def test_tool_outputs_never_trained_and_prompt_vs_final_turn_differ():
    conv = [U1, CALL, TOOL, A2]
    call = '\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>'
    assert trained_spans("chatml", "all_assistant_turns", conv) == [call, "4<|im_end|>"]
    assert trained_spans("chatml", "prompt", conv) == [call, "4<|im_end|>"]  # the whole completion
    assert trained_spans("chatml", "final_turn", conv) == ["4<|im_end|>"]
    # earlier assistant turns belong to the prompt
    assert trained_spans("chatml", "prompt", [U2, A2, U1, CALL, TOOL, A1]) == [call, "Hello!<|im_end|>"]


def test_empty_assistant_content_still_trains_its_stop_token():
    assert trained_spans("chatml", "final_turn", [U1, {"role": "assistant", "content": "  "}]) == ["<|im_end|>"]


def test_masks_follow_roles_on_any_conversation():
    enc = registry().chat_templates.get("chatml").encode(MULTI, tokenizer=TOK)
    strategies = registry().masking_strategies
    allm = strategies.get("all_assistant_turns").mask(enc)
    final = strategies.get("final_turn").mask(enc)
    assert all(m == (r == "assistant") for m, r in zip(allm, enc.roles))
    assert all(f <= a for f, a in zip(final, allm))
    assert all(m == 0 for m, r in zip(allm, enc.roles) if r == "template")
    assert strategies.get("none").mask(enc) == [1] * len(enc)
