"""`rlhf-plugins render`: rendered text and trained-token markers."""
from __future__ import annotations

import json

import pytest

from helpers_tokenizers import make_tokenizer
from rlhf_plugins.cli.main import main

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture()
def files(tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": CONV}))
    tok = tmp_path / "tok"
    make_tokenizer("default").save_pretrained(tok)
    return conv, tok


def test_render_text(files, capsys):
    conv, tok = files
    assert main(["render", "--template", "zephyr", "--tokenizer", str(tok), str(conv)]) == 0
    assert capsys.readouterr().out == ("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
                                       "<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n\n")


def test_render_mask_markers(files, capsys):
    conv, tok = files
    assert main(["render", "--template", "chatml", "--tokenizer", str(tok), "--masking", "final_turn", str(conv)]) == 0
    out = capsys.readouterr()
    assert out.out == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                       "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                       "<|im_start|>assistant\n[[4<|im_end|>]]\n\n")
    assert "tokens trained (final_turn, chatml)" in out.err


def test_render_mask_colour_and_template_file(files, tmp_path, capsys):
    conv, tok = files
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert main(["render", "--template-file", str(jinja), "--tokenizer", str(tok), "--masking",
                 "all_assistant_turns", "--color", "always", str(conv)]) == 0
    out = capsys.readouterr().out
    assert "<assistant>\x1b[1;42;30mHello!</s>\x1b[0m<user>" in out and out.count("\x1b[0m") == 2


def test_render_harmony_without_tokenizer(files, capsys):
    conv, _ = files
    assert main(["render", "--template", "harmony", "--masking", "all_assistant_turns", str(conv)]) == 0
    out = capsys.readouterr().out
    assert "<|start|>assistant[[<|channel|>final<|message|>4<|return|>]]" in out


def test_render_errors_are_one_line(files, tmp_path, capsys):
    conv, tok = files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]))
    assert main(["render", "--tokenizer", str(tok), str(bad)]) == 2
    assert "message 1: unknown role 'wizard'" in capsys.readouterr().err
    assert main(["render", "--template", "nope", "--tokenizer", str(tok), str(conv)]) == 2
    bad.write_text("{not json")
    assert main(["render", "--tokenizer", str(tok), str(bad)]) == 2
    assert "invalid JSON" in capsys.readouterr().err
