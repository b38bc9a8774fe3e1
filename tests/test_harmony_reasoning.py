"""Harmony keeps the trained turn's reasoning (checked against openai-harmony itself)."""
from __future__ import annotations

from rlhf_plugins import registry


def _harmony():
    from openai_harmony import Conversation, Message, RenderConversationConfig, Role

    from rlhf_plugins.harmony_vocab import harmony_encoding

    return harmony_encoding(), Conversation, Message, RenderConversationConfig, Role


def test_single_turn_training_render_keeps_the_analysis():
    enc, Conversation, Message, Config, Role = _harmony()
    tpl = registry().chat_templates.get("harmony")
    for key in ("thinking", "reasoning_content"):
        msgs = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", key: "Two plus two is four.", "content": "4"}]
        convo = Conversation.from_messages([
            Message.from_role_and_content(Role.USER, "What is 2 + 2?"),
            Message.from_role_and_content(Role.ASSISTANT, "Two plus two is four.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final")])
        expected = enc.render_conversation_for_training(convo, Config(auto_drop_analysis=False))
        encoded = tpl.encode(msgs)
        assert encoded.input_ids == list(expected)
        assert "<|channel|>analysis<|message|>Two plus two is four." in encoded.text
        # harmony's default would have dropped it: the sequence trained the answer alone
        assert list(enc.render_conversation_for_training(convo)) != list(expected)
        # the reasoning tokens belong to the trained turn, so masking trains them
        mask = registry().masking_strategies.get("final_turn").mask(encoded)
        trained = enc.decode_utf8([t for t, m in zip(encoded.input_ids, mask) if m])
        assert "Two plus two is four." in trained and trained.endswith("4<|return|>")
        assert tpl.render_text(msgs) == encoded.text
        hf_jinja = _jinja_render(tpl, msgs)
        assert hf_jinja == encoded.text


def test_earlier_turns_follow_harmonys_drop_rule():
    enc, Conversation, Message, Config, Role = _harmony()
    tpl = registry().chat_templates.get("harmony")
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "thinking": "t1", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "thinking": "t2", "content": "a2"}]
    A = Role.ASSISTANT
    full = [Message.from_role_and_content(Role.USER, "q1"),
            Message.from_role_and_content(A, "t1").with_channel("analysis"),
            Message.from_role_and_content(A, "a1").with_channel("final"),
            Message.from_role_and_content(Role.USER, "q2"),
            Message.from_role_and_content(A, "t2").with_channel("analysis"),
            Message.from_role_and_content(A, "a2").with_channel("final")]
    # harmony drops the first turn's analysis and keeps the trained turn's
    expected = enc.render_conversation_for_training(
        Conversation.from_messages(full[:1] + full[2:]), Config(auto_drop_analysis=False))
    assert tpl.encode(msgs).input_ids == list(expected)
    assert list(enc.render_conversation_for_training(Conversation.from_messages(full))) == list(expected)
    # a prompt (no trained turn) renders exactly as harmony renders it
    prompt = msgs[:3]
    assert tpl.encode(prompt, add_generation_prompt=True).input_ids == list(
        enc.render_conversation_for_completion(Conversation.from_messages(full[:4]), Role.ASSISTANT))
    assert _jinja_render(tpl, msgs) == tpl.render_text(msgs)


def _jinja_render(tpl, msgs):
    from helpers_tokenizers import make_tokenizer

    return make_tokenizer().apply_chat_template(msgs, chat_template=tpl.jinja, tokenize=False)
