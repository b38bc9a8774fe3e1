"""User Jinja (a tokenizer's chat_template, `--template-file`): resource limits and sandbox
escapes are one-line errors, never an OverflowError/RecursionError traceback or 100 MB of output."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers_bad_inputs import GOOD_ROWS, cli_error, run_main, sft_cli_error
from rlhf_plugins import jinja_sandbox
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.jinja_sandbox import render_template
from rlhf_plugins.testing import tiny_model_dir

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
RECURSIVE = "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("jinja-model") / "tiny")


@pytest.mark.parametrize("source, needle", [
    ("{{ range(100000000)|list }}", "resource limit: range() of 100000000 items (the limit is 100000)"),
    (RECURSIVE, "resource limit: recursion too deep"),
    ("{{ 'x' * 100000000 }}", "resource limit: '*' would build 100000000 items"),
    ("{{ [0] * 100000000 }}", "resource limit: '*' would build 100000000 items"),
    ("{{ 100000000 * 'x' }}", "resource limit: '*' would build"),
    ("{{ 2 ** 100000000 }}", "resource limit: '**' with exponent 100000000"),
    ("{% for i in range(10) %}{{ range(100001)|length }}{% endfor %}", "resource limit: range() of 100001 items"),
], ids=["range", "recursion", "repeat-str", "repeat-list", "repeat-reversed", "power", "range-in-loop"])
def test_resource_limits(source, needle):
    with pytest.raises(DataError) as info:
        render_template(source, messages=MESSAGES)
    assert str(info.value) == f"chat template: {needle}" or str(info.value).startswith(f"chat template: {needle}")


def test_output_limit(monkeypatch):
    monkeypatch.setattr(jinja_sandbox, "MAX_OUTPUT", 10_000)
    with pytest.raises(DataError, match=r"^chat template: resource limit: output longer than 10000 characters$"):
        render_template("{% for m in range(1000) %}{{ 'abcdefghijklmnop' }}{% endfor %}")
    with pytest.raises(DataError, match="output longer than"):
        render_template("{{ 'x'|center(20000) }}")


def test_time_limit(monkeypatch):
    monkeypatch.setattr(jinja_sandbox, "TIME_LIMIT", 0.3)
    with pytest.raises(DataError, match=r"^chat template: resource limit: took longer than 0.3 s$"):
        render_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")


def test_ordinary_templates_still_render():
    out = render_template("{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"
                          "{{ range(3)|list }}{{ range(3)|length }}{{ 'ab' * 2 }}{{ 2 ** 10 }}",
                          messages=MESSAGES)
    assert out == "user:hi|assistant:yo|[0, 1, 2]3abab1024"


@pytest.mark.parametrize("source, needle", [
    ("{{ ''.__class__.__mro__ }}", "blocked by the Jinja sandbox"),
    ("{{ messages.append(1) }}", "blocked by the Jinja sandbox"),
    ("{{ raise_exception('roles must alternate') }}", "chat template: roles must alternate"),
    ("{{ raise_exception.__init__.__globals__ }}", "blocked by the Jinja sandbox"),
], ids=["dunder", "mutation", "raise_exception", "globals"])
def test_template_errors_are_data_errors(source, needle):
    with pytest.raises(DataError, match=needle):
        render_template(source, messages=MESSAGES)


def test_syntax_error_names_the_line():
    with pytest.raises(ConfigError, match=r"^chat template: Jinja syntax error at line 2: "):
        render_template("{{ messages }}\n{% for m in messages %}")


@pytest.mark.parametrize("source", ["{{ range(100000000)|list }}", RECURSIVE, "{{ 'x' * 100000000 }}"],
                         ids=["range", "recursion", "100MB"])
def test_render_cli_with_a_hostile_template_file(tmp_path, tiny_dir, source):
    template = tmp_path / "chat.jinja"
    template.write_text(source)
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(MESSAGES))
    code, out, err = run_main(["render", conv, "--template-file", template, "--tokenizer", tiny_dir])
    assert out == ""  # not 100 MB of output
    from helpers_bad_inputs import error_line

    error_line(code, err, f"{conv}: chat template: resource limit:")


def test_render_cli_template_file_problems(tmp_path, tiny_dir):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(MESSAGES))
    cli_error(["render", conv, "--template-file", tmp_path / "missing.jinja", "--tokenizer", tiny_dir],
              "template file", "missing.jinja")
    blank = tmp_path / "blank.jinja"
    blank.write_text("   \n")
    cli_error(["render", conv, "--template-file", blank, "--tokenizer", tiny_dir], "is blank")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    cli_error(["render", conv, "--template-file", broken, "--tokenizer", tiny_dir],
              "Jinja syntax error at line 1")


def test_sft_with_a_tokenizer_whose_chat_template_recurses(tmp_path, tiny_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = RECURSIVE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    sft_cli_error(tmp_path, model, GOOD_ROWS, "row 1: chat template: resource limit: recursion too deep",
                  template="tokenizer")
