"""Misbehaving reward functions and reward matrices: the project's own exception, naming the
function (with its plugin) or the rule and the entry.

Infinite rewards: -inf is "never select this" (like NaN, it is never selected); +inf is an error
naming the rule and the entry, since no finite score can compete with it (the selection rules'
contract, :func:`rlhf_plugins.sdk.clean_rewards`). Reward functions may return neither.
"""
from __future__ import annotations

import math
import re

import pytest

from helpers_bad_inputs import cli_error, write_yaml
from rlhf_plugins import registry
from rlhf_plugins.errors import ComponentError, ConfigError, DataError, PluginError
from rlhf_plugins.rewarding import call_reward_functions
from rlhf_plugins.testing import tiny_model_dir

PROMPTS, COMPLETIONS = ["p", "p"], ["a", "bb"]


def named(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("fn, error, needle", [
    (named(lambda prompts, completions, **kw: {}["x"], "raises"), ComponentError,
     "reward function 'raises' raised KeyError in __call__(): 'x' [not registered"),
    (named(lambda prompts, completions, **kw: [1.0], "short"), DataError,
     "reward function 'short' returned 1 rewards for 2 completions"),
    (named(lambda prompts, completions, **kw: "1.0", "text"), DataError,
     "reward function 'text' returned str, expected a list"),
    (named(lambda prompts, completions, **kw: [1.0, "high"], "word"), DataError,
     "reward function 'word' returned a non-number ('high') for completion 1"),
    (named(lambda prompts, completions, **kw: [math.inf, 0.0], "inf"), DataError,
     "reward function 'inf' returned inf (NaN/inf are not allowed"),
    (named(lambda prompts, completions, **kw: [0.0, -math.inf], "neginf"), DataError,
     "reward function 'neginf' returned -inf"),
    (named(lambda prompts, completions, **kw: [math.nan, 0.0], "nan"), DataError,
     "reward function 'nan' returned nan"),
    (named(lambda prompts, completions, **kw: None, "none"), DataError,
     "reward function 'none' returned NoneType"),
], ids=["raises", "short", "text", "word", "inf", "neginf", "nan", "none"])
def test_reward_function_outputs(fn, error, needle):
    with pytest.raises(error) as info:
        call_reward_functions([fn], None, PROMPTS, COMPLETIONS)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_registered_reward_function_is_named_with_its_plugin(rlhf_plugin):
    from rlhf_plugins.testing import component_plugin

    def boom(prompts, completions, **kw):
        raise RuntimeError("no GPU left")

    rlhf_plugin(component_plugin("reward_functions", boom, name="boom"), name="boom_plugin")
    with pytest.raises(ComponentError) as info:
        call_reward_functions([registry().reward_functions.get("boom")], None, PROMPTS, COMPLETIONS)
    assert str(info.value) == ("reward function 'boom' raised RuntimeError in __call__(): no GPU left "
                               "[plugin 'boom_plugin']")
    assert isinstance(info.value.__cause__, RuntimeError)  # -v shows the original traceback


@pytest.mark.parametrize("weights, needle", [
    ([math.nan], "must be a finite number"), ([math.inf], "must be a finite number"),
    (["1"], "must be a finite number"), ([1.0, 2.0], "2 reward weights given for 1"),
])
def test_reward_weights(weights, needle):
    fn = named(lambda prompts, completions, **kw: [1.0, 1.0], "ok")
    with pytest.raises(ConfigError, match=needle):
        call_reward_functions([fn], weights, PROMPTS, COMPLETIONS)


@pytest.mark.parametrize("rule, options", [("top_per_prompt", {}), ("top_k", {"k": 1}),
                                           ("threshold", {"min_reward": 0.0})])
def test_plus_infinity_is_an_error_naming_the_entry(rule, options):
    with pytest.raises(DataError) as info:
        registry().selection_rules.get(rule).select([[0.5, 0.1], [1.0, math.inf]], **options)
    assert f"selection rule {rule!r}: rewards[1][1] is +inf" in str(info.value)


@pytest.mark.parametrize("rule, options", [("top_per_prompt", {}), ("top_k", {"k": 1}),
                                           ("threshold", {"min_reward": -1e9})])
def test_minus_infinity_is_never_selected(rule, options):
    pairs = registry().selection_rules.get(rule).select([[-math.inf, 0.5], [-math.inf, math.nan]], **options)
    assert pairs == [(0, 1)]


@pytest.mark.parametrize("rewards, needle", [
    ("abc", "must be a list of lists"), ([[1.0, "x"]], "rewards[0][1] is not a number"),
    ([3.0], "rewards[0] must be a list of numbers"), ({"a": [1.0]}, "must be a list of lists"),
])
def test_malformed_reward_matrices(rewards, needle):
    with pytest.raises(DataError) as info:
        registry().selection_rules.get("top_per_prompt").select(rewards)
    assert needle in str(info.value)


def test_estimator_rejects_infinite_rewards():
    import torch

    with pytest.raises(DataError, match="advantage estimator 'grpo': rewards contain"):
        registry().advantage_estimators.get("grpo")(torch.tensor([1.0, math.inf]), num_generations=2)


def test_selection_rule_output_is_checked():
    from types import SimpleNamespace

    from rlhf_plugins.stages.rejection_sampling.sampler import SamplingRun

    totals = [[0.5, 0.1]]
    for returned, needle in ((None, "returned NoneType"), ([5], "returned 5, not a (prompt, completion) pair"),
                             ([(0, 7)], "outside the reward matrix")):
        rule = SimpleNamespace(select=lambda rewards, r=returned: r)
        fake = SimpleNamespace(c=SimpleNamespace(rule=rule), s=SimpleNamespace(selection="odd"))
        with pytest.raises(PluginError, match=re.escape(needle)):
            SamplingRun.select(fake, totals)


# --- the CLI: a reward function crashing mid-run ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bad-rewards-model") / "tiny")


def test_sample_with_a_crashing_reward_function(tmp_path, tiny_dir):
    plugin = tmp_path / "crashing_reward_plugin.py"
    plugin.write_text(
        "import rlhf_plugins\n\n"
        "@rlhf_plugins.reward_function\n"
        "def crashing_reward_14(prompts, completions, **kw):\n"
        "    raise ZeroDivisionError('division by zero')\n")
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rs.yaml", {
        "model": str(tiny_dir), "output_dir": str(out), "num_prompts": 2, "num_samples": 2,
        "max_new_tokens": 2, "reward_functions": ["crashing_reward_14"], "plugins": [str(plugin)]})
    try:
        cli_error(["sample", "--config", cfg], "reward function 'crashing_reward_14' raised "
                  "ZeroDivisionError in __call__(): division by zero [plugin '__script__']")
    finally:
        from rlhf_plugins.decorators import _script

        _script.components["reward_functions"].pop("crashing_reward_14", None)
        registry(reload=True)
    # generation is cached for the rerun, but nothing that looks like a result was written
    assert not (out / "summary.json").exists() and not (out / "selected.jsonl").exists()
