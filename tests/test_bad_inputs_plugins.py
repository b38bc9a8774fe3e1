"""Plugins failing at use time: one line naming the component, its plugin and distribution.

A component that raises inside render/encode, mask, reward, select, estimate or a head member
becomes a :class:`~rlhf_plugins.errors.ComponentError` at the call site (one helper,
:mod:`rlhf_plugins.guard`); a masking strategy's output is checked (one 0/1 value per token).
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from types import SimpleNamespace

import pytest

from helpers_bad_inputs import GOOD_ROWS, cli_error, run_main, sft_cli_error, write_yaml
from helpers_plugins import make_dist
from rlhf_plugins import registry
from rlhf_plugins.errors import ComponentError, DuplicateComponentError, PluginError
from rlhf_plugins.testing import component_plugin, tiny_model_dir

BROKEN_PLUGINS = '''
from dataclasses import dataclass
from rlhf_plugins import hookimpl, sdk


@dataclass(frozen=True)
class BadMask(sdk.MaskingStrategy):
    """A masking strategy with a configurable way to be wrong."""
    name = "bad_mask_14"
    mode: str = "raise"

    def mask(self, encoded):
        n = len(encoded.input_ids)
        if self.mode == "raise":
            raise ZeroDivisionError("division by zero")
        if self.mode == "short":
            return [1] * (n - 1)
        if self.mode == "two":
            return [2] * n
        if self.mode == "none":
            return None
        return [1] * n


@dataclass(frozen=True)
class BadTemplate(sdk.ChatTemplate):
    """A template whose segments() crashes."""
    name = "bad_template_14"
    jinja = ""

    def segments(self, messages, *, tokenizer=None, add_generation_prompt=False):
        raise KeyError("role")


@dataclass(frozen=True)
class BadRule(sdk.SelectionRule):
    """A selection rule that crashes."""
    name = "bad_rule_14"

    def choose(self, rewards):
        raise IndexError("list index out of range")


def bad_reward_14(prompts, completions, **kw):
    raise RuntimeError("reward server unreachable")


@hookimpl
def register_masking_strategies(register):
    register(BadMask())


@hookimpl
def register_chat_templates(register):
    register(BadTemplate())


@hookimpl
def register_selection_rules(register):
    register(BadRule())


@hookimpl
def register_reward_functions(register):
    register(bad_reward_14)
'''

ORIGIN = "[plugin 'bad14', distribution bad14-dist 1.2.3]"


@pytest.fixture(scope="module")
def bad_dist(tmp_path_factory):
    """An installed distribution `bad14-dist 1.2.3` whose entry point `bad14` registers broken
    components; on sys.path (and in the registry) for this module only."""
    site = make_dist(tmp_path_factory.mktemp("site"), "bad14-dist", "1.2.3",
                     {"bad14": "bad14_plugins"}, {"bad14_plugins": BROKEN_PLUGINS})
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registry(reload=True)
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("bad14_plugins", None)
        importlib.invalidate_caches()
        registry(reload=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bad-plugins-model") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from rlhf_plugins.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture
def clean_script():
    """Undo what `@reward_function`-style decorators registered during a test."""
    from rlhf_plugins.decorators import _script

    saved = {family: dict(items) for family, items in _script.components.items()}
    yield _script
    for family, items in saved.items():
        _script.components[family].clear()
        _script.components[family].update(items)
    registry(reload=True)


# --- masking and templates inside SFT encoding ------------------------------------------------

@pytest.mark.parametrize("mode, needle", [
    ("raise", "masking strategy 'bad_mask_14' raised ZeroDivisionError in mask(): division by zero"),
    ("short", "masking strategy 'bad_mask_14' returned {n1} values for {n} tokens"),
    ("two", "masking strategy 'bad_mask_14' returned 2 at token 0 (values must be 0 or 1)"),
    ("none", "masking strategy 'bad_mask_14' returned NoneType, expected a list of 0/1 values"),
])
def test_masking_failures_name_the_strategy_plugin_and_distribution(bad_dist, tokenizer, mode, needle):
    from rlhf_plugins.stages.sft.dataset import build_sft_dataset

    masking = registry().masking_strategies.get("bad_mask_14", mode=mode)
    n = len(registry().chat_templates.get("chatml").encode(GOOD_ROWS[0]["messages"],
                                                           tokenizer=tokenizer).input_ids)
    with pytest.raises(ComponentError) as info:
        build_sft_dataset(GOOD_ROWS, tokenizer, "chatml", masking, where="data.jsonl")
    text = str(info.value)
    assert text.startswith("data.jsonl row 1: ") and needle.format(n=n, n1=n - 1) in text
    assert text.endswith(ORIGIN) and "\n" not in text
    assert info.value.family == "masking_strategies" and info.value.component == "bad_mask_14"


def test_a_well_behaved_mask_of_bools_or_floats_is_accepted(tokenizer, rlhf_plugin):
    from dataclasses import dataclass

    from rlhf_plugins import sdk
    from rlhf_plugins.stages.sft.dataset import build_sft_dataset

    @dataclass(frozen=True)
    class Floats(sdk.MaskingStrategy):
        name = "floats_14"

        def mask(self, encoded):
            return [float(r == "assistant") for r in encoded.roles]

    rlhf_plugin(component_plugin("masking_strategies", Floats()), name="floats_plugin")
    ds = build_sft_dataset(GOOD_ROWS, tokenizer, "chatml", "floats_14")
    assert set(v for m in ds["assistant_masks"] for v in m) == {0, 1}


def test_template_crash_names_template_plugin_and_distribution(bad_dist, tokenizer):
    from rlhf_plugins.stages.sft.dataset import build_sft_dataset

    with pytest.raises(ComponentError) as info:
        build_sft_dataset(GOOD_ROWS, tokenizer, "bad_template_14", "all_assistant_turns",
                          where="data.jsonl")
    assert str(info.value) == ("data.jsonl row 1: chat template 'bad_template_14' raised KeyError "
                               f"in encode(): 'role' {ORIGIN}")


def test_reward_function_crash_names_its_distribution(bad_dist):
    from rlhf_plugins.rewarding import call_reward_functions

    with pytest.raises(ComponentError) as info:
        call_reward_functions([registry().reward_functions.get("bad_reward_14")], None, ["p"], ["c"])
    assert str(info.value) == ("reward function 'bad_reward_14' raised RuntimeError in __call__(): "
                               f"reward server unreachable {ORIGIN}")


def test_selection_rule_crash_names_its_distribution(bad_dist):
    from rlhf_plugins.stages.rejection_sampling.sampler import SamplingRun

    fake = SimpleNamespace(c=SimpleNamespace(rule=registry().selection_rules.get("bad_rule_14")),
                           s=SimpleNamespace(selection="bad_rule_14"))
    with pytest.raises(ComponentError) as info:
        SamplingRun.select(fake, [[0.1, 0.2]])
    assert str(info.value) == ("selection rule 'bad_rule_14' raised IndexError in select(): list "
                               f"index out of range {ORIGIN}")


def test_estimator_crash_inside_the_trainer(rlhf_plugin):
    import torch

    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    def broken_estimator_14(rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95):
        raise ValueError("shapes do not match")

    rlhf_plugin(component_plugin("advantage_estimators", broken_estimator_14), name="est_plugin")
    estimator = registry().advantage_estimators.get("broken_estimator_14")
    fake = SimpleNamespace(estimator=estimator, gamma=1.0, lam=0.95, whiten_advantages=False)
    with pytest.raises(ComponentError) as info:
        PolicyOptimizationTrainer._estimate(fake, torch.ones(2), torch.ones(2, 3), None, 2, {}, None)
    assert str(info.value) == ("advantage estimator 'broken_estimator_14' raised ValueError in "
                               "__call__(): shapes do not match [plugin 'est_plugin']")


def test_head_encode_crash_is_never_dropped_as_a_bad_row(rlhf_plugin, tokenizer):
    from dataclasses import dataclass

    from plugins.reward_heads import BradleyTerryHead as BradleyTerry
    from rlhf_plugins.stages.reward_model.data import encode_rows

    @dataclass(frozen=True)
    class CrashingHead(BradleyTerry):
        name = "crashing_head_14"

        def encode(self, row, *, tokenizer, template, max_length=None):
            raise AttributeError("'NoneType' object has no attribute 'ids'")

    rlhf_plugin(component_plugin("reward_heads", CrashingHead()), name="head_plugin")
    head = registry().reward_heads.get("crashing_head_14")
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(ComponentError) as info:  # strict=False drops bad rows, not plugin bugs
        encode_rows(rows, head, tokenizer, registry().chat_templates.get("chatml"), where="pairs.jsonl")
    assert str(info.value).startswith("pairs.jsonl row 1: reward head 'crashing_head_14' raised "
                                      "AttributeError in encode()")


def test_head_collate_crash(rlhf_plugin):
    from dataclasses import dataclass

    from plugins.reward_heads import BradleyTerryHead as BradleyTerry
    from rlhf_plugins.stages.reward_model.trainer import HeadCollator

    @dataclass(frozen=True)
    class BadCollate(BradleyTerry):
        name = "bad_collate_14"

        def collate(self, rows, *args, **kwargs):
            raise TypeError("expected a tensor")

    rlhf_plugin(component_plugin("reward_heads", BadCollate()), name="collate_plugin")
    with pytest.raises(ComponentError, match=r"^reward head 'bad_collate_14' raised TypeError in "
                                             r"collate\(\): expected a tensor \[plugin 'collate_plugin'\]$"):
        HeadCollator(registry().reward_heads.get("bad_collate_14"), pad_token_id=0)([{}])


# --- the CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--template", "bad_template_14"], f"chat template 'bad_template_14' raised KeyError in encode(): 'role' {ORIGIN}"),
    (["--masking", "bad_mask_14"], f"masking strategy 'bad_mask_14' raised ZeroDivisionError in mask(): division by zero {ORIGIN}"),
], ids=["template", "masking"])
def test_render_cli(bad_dist, tmp_path, tiny_dir, argv, needle):
    conv = tmp_path / "conv.json"
    conv.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]')
    if "--masking" not in argv:
        argv = [*argv, "--masking", "all_assistant_turns"]
    cli_error(["render", conv, "--tokenizer", tiny_dir, *argv], needle)


def test_render_cli_never_prints_a_truncated_render(tmp_path, tiny_dir, clean_script):
    plugin = tmp_path / "short_mask.py"
    plugin.write_text(textwrap.dedent('''
        import rlhf_plugins
        from rlhf_plugins import sdk

        @rlhf_plugins.masking_strategy
        class ShortMask(sdk.MaskingStrategy):
            name = "short_mask_14"
            def mask(self, encoded):
                return [1, 1, 1]
    '''))
    conv = tmp_path / "conv.json"
    conv.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]')
    code, out, err = run_main(["-p", plugin, "render", conv, "--tokenizer", tiny_dir,
                               "--masking", "short_mask_14"])
    assert out == "" and "tokens trained" not in err
    from helpers_bad_inputs import error_line

    error_line(code, err, "masking strategy 'short_mask_14' returned 3 values for",
               "[plugin '__script__']")


def test_sft_cli_with_a_crashing_masking_plugin(bad_dist, tmp_path, tiny_dir):
    sft_cli_error(tmp_path, tiny_dir, GOOD_ROWS, "row 1: masking strategy 'bad_mask_14' raised", ORIGIN,
                  masking="bad_mask_14")


def test_verbose_adds_the_original_traceback(bad_dist, tmp_path, tiny_dir):
    conv = tmp_path / "conv.json"
    conv.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]')
    code, _, err = run_main(["-v", "render", conv, "--tokenizer", tiny_dir, "--masking", "bad_mask_14"])
    assert code == 2 and "Traceback" in err and "ZeroDivisionError: division by zero" in err
    assert err.strip().splitlines()[-1].startswith("rlhf-plugins: error: masking strategy 'bad_mask_14'")


# --- loading plugins -------------------------------------------------------------------------------

STRICT_BROKEN = '''
from rlhf_plugins import hookimpl

@hookimpl
def register_reward_functions(register):
    raise RuntimeError("cannot reach the licence server")
'''


def test_strict_mode_names_the_failing_plugin_and_distribution(tmp_path, monkeypatch):
    site = make_dist(tmp_path / "site", "licensed-rewards", "0.4.0", {"licensed": "licensed_plugin"},
                     {"licensed_plugin": STRICT_BROKEN})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        registry(reload=True)  # not strict: logged, the plugin is marked failed, the rest loads
        info = next(p for p in registry().plugins if p.name == "licensed")
        assert info.status == "failed" and "licence server" in info.error
        monkeypatch.setenv("RLHF_PLUGINS_STRICT", "1")
        with pytest.raises(PluginError) as err:
            registry(reload=True)
        assert str(err.value) == ("plugin 'licensed' (licensed-rewards 0.4.0) failed to load: "
                                  "RuntimeError: cannot reach the licence server")
        from rlhf_plugins import manager

        manager._cached = None  # the CLI builds the registry inside the command: one line
        cli_error(["components"], "plugin 'licensed' (licensed-rewards 0.4.0) failed to load")
    finally:
        monkeypatch.delenv("RLHF_PLUGINS_STRICT", raising=False)
        monkeypatch.undo()
        sys.modules.pop("licensed_plugin", None)
        importlib.invalidate_caches()
        registry(reload=True)


@pytest.mark.parametrize("source, needles", [
    ("raise RuntimeError('boom at import')\n", ["RuntimeError: boom at import"]),
    ("def broken(:\n", ["SyntaxError"]),
    ("from rlhf_plugins import hookimpl\n\n@hookimpl\ndef register_selection_rules(register):\n"
     "    register(object(), name='not_a_rule_14')\n",
     ["ComponentTypeError", "'not_a_rule_14' does not satisfy SelectionRuleProtocol: missing select()"]),
    ("from rlhf_plugins import hookimpl\n\n@hookimpl\ndef register_chat_templatez(register):\n    pass\n",
     ["register_chat_templatez"]),
], ids=["raises", "syntax", "non-conforming", "misspelled-hook"])
def test_plugin_file_failures(tmp_path, tiny_dir, clean_script, source, needles):
    plugin = tmp_path / "my_plugin_14.py"
    plugin.write_text(source)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(tiny_dir), "output_dir": str(out), "max_steps": 1})
    try:
        cli_error(["-p", plugin, "sft", "--config", cfg], f"--plugin {plugin}", *needles, untouched=[out])
    finally:
        from rlhf_plugins import manager

        for name in [n for n in manager._extra_plugins if "my_plugin_14" in n or "rlhf_plugins_user_" in n]:
            manager.remove_plugin(name)


DUPLICATE_WITH_BUILTIN = '''
import rlhf_plugins

@rlhf_plugins.reward_function
def first_fn_14(prompts, completions, **kw):
    return [1.0] * len(completions)

@rlhf_plugins.reward_function
def exact_answer(prompts, completions, **kw):
    return [0.0] * len(completions)
'''

DUPLICATE_IN_MODULE = '''
import rlhf_plugins

@rlhf_plugins.reward_function(name="same_14")
def a(prompts, completions, **kw):
    return [1.0] * len(completions)

@rlhf_plugins.reward_function(name="same_14")
def b(prompts, completions, **kw):
    return [0.0] * len(completions)
'''


@pytest.mark.parametrize("source, kept, needles", [
    (DUPLICATE_WITH_BUILTIN, "first_fn_14",
     ["DuplicateComponentError", "'exact_answer' is already registered by rlhf_plugins.builtin.rewards"]),
    (DUPLICATE_IN_MODULE, "same_14", ["'same_14' is registered twice by decorators", ":a and ", ":b)"]),
], ids=["builtin", "same-module"])
def test_a_duplicate_reward_function_name_drops_nothing_else(tmp_path, tiny_dir, clean_script,
                                                             source, kept, needles):
    plugin = tmp_path / "dup_14.py"
    plugin.write_text(source)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(tiny_dir), "output_dir": str(out), "max_steps": 1})
    cli_error(["-p", plugin, "sft", "--config", cfg], f"--plugin {plugin}", *needles, untouched=[out])
    reg = registry()
    assert kept in reg.reward_functions  # registered before the duplicate: still there
    assert all(p.status == "ok" for p in reg.plugins if p.name == "__script__")
    assert reg.reward_functions.provenance("exact_answer").plugin == "rlhf_plugins.builtin.rewards"


def test_duplicate_decorator_in_python_raises_at_the_decorator(clean_script):
    import rlhf_plugins

    @rlhf_plugins.reward_function
    def kept_14(prompts, completions, **kw):
        return [1.0] * len(completions)

    with pytest.raises(DuplicateComponentError, match="'length_penalty' is already registered"):
        @rlhf_plugins.reward_function
        def length_penalty(prompts, completions, **kw):
            return [0.0] * len(completions)

    @rlhf_plugins.reward_function(override=True, name="format")
    def my_format(prompts, completions, **kw):
        return [0.0] * len(completions)

    reg = registry()
    assert "kept_14" in reg.reward_functions
    assert reg.reward_functions.provenance("format").plugin == "__script__"  # override=True wins
    assert reg.reward_functions.provenance("length_penalty").plugin == "rlhf_plugins.builtin.rewards"
