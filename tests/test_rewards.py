"""Built-in reward functions and `call_reward_functions` (validation, TRL's None/nansum rule)."""
from __future__ import annotations

import math

import pytest

import rlhf_plugins
from rlhf_plugins.errors import ConfigError, DataError, PluginError, UnknownComponentError
from rlhf_plugins.rewarding import (
    call_reward_functions,
    completion_text,
    prompt_text,
    resolve_reward_functions,
)


@pytest.fixture(scope="module")
def funcs():
    return rlhf_plugins.registry(reload=True).reward_functions


def conv(text):
    return [{"role": "assistant", "content": text}]


def test_builtins_registered_with_trl_compatible_names(funcs):
    from trl.trainer.utils import get_callable_name, is_async_callable

    for name in ("exact_answer", "format", "length_penalty"):
        f = funcs.get(name)
        assert funcs.provenance(name).plugin == "rlhf_plugins.builtin.rewards"
        assert funcs.description(name)
        assert f.__name__ == name == get_callable_name(f)  # TRL logs rewards/<__name__>/mean
        assert not is_async_callable(f)
        configured = f.configure()
        assert configured.__name__ == name and configured == f


def test_trl_grpo_trainer_runs_with_the_components_as_reward_funcs(funcs, tmp_path):
    """TRL's own trainer names, calls and logs our objects (tiny random model, one step)."""
    helpers = pytest.importorskip("helpers_models")
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_plugins.data import synth

    model_dir = helpers.make_tiny_model_dir(tmp_path)
    rows = [{"prompt": r["prompt"][0]["content"], "answer": r["answer"]}
            for r in synth.rl_rows(4, seed=0)]
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=8, max_steps=1, logging_steps=1,
                      report_to=[], use_cpu=True, save_strategy="no")
    trainer = GRPOTrainer(model=str(model_dir), args=args,
                          train_dataset=datasets.Dataset.from_list(rows),
                          reward_funcs=[funcs.get("exact_answer"), funcs.get("format"),
                                        funcs.get("length_penalty", target=4)])
    assert trainer.reward_func_names == ["exact_answer", "format", "length_penalty"]
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    # random tokens never contain a well-formed answer: 0 for the verifier and the format check
    assert logged["rewards/exact_answer/mean"] == 0.0
    assert logged["rewards/format/mean"] == 0.0
    assert logged["rewards/length_penalty/mean"] <= 0.0


# --- exact_answer ---------------------------------------------------------------------------

@pytest.mark.parametrize("completion,answer,expected", [
    ("15% = 0.15.\n\n0.15 * 80 = 12.\n\nThe answer is 12.", "12", 1.0),
    ("15% = 0.15.\n\n0.15 * 80 = 1.2.\n\nThe answer is 1.2.", "12", 0.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ("So the total is\n#### 1,234", "1234", 1.0),
    ("#### 1,234", "1,234", 1.0),
    ("The answer is $1,234.50.", "1234.5", 1.0),
    ("The answer is -7.", "-7", 1.0),
    ("The answer is 0.75.", "3/4", 1.0),
    ("The answer is 3/4.", "0.75", 1.0),
    ("the final answer is: **42**", "42", 1.0),
    ("We get \\boxed{36}.", "36", 1.0),
    ("The answer is 5. Wait, no. The answer is 6.", "6", 1.0),  # the last marker counts
    ("The answer is 6. Hmm, #### 5", "6", 0.0),
    ("12", "12", 0.0),  # no answer marker: not verified (strict by default)
    ("", "12", 0.0),
    ("The answer is twelve.", "12", 0.0),
    ("The answer is 12.", 12, 1.0),
    ("The answer is 12.", 12.0, 1.0),
    ("The answer is 12.", "Janet has 16 - 3 - 4 = 9 eggs... #### 12", 1.0),  # a GSM8K solution
    ("The answer is 120.", "12", 0.0),
])
def test_exact_answer_cases(funcs, completion, answer, expected):
    f = funcs.get("exact_answer")
    assert f(["q"], [completion], answer=[answer]) == [expected]
    assert f(["q"], [conv(completion)], answer=[answer]) == [expected]  # TRL conversational


def test_exact_answer_none_where_no_reference(funcs):
    f = funcs.get("exact_answer")
    out = f(["a", "b", "c"], ["The answer is 1.", "The answer is 2.", "The answer is 3."],
            answer=["1", None, ""])
    assert out == [1.0, None, None]


def test_exact_answer_options(funcs):
    assert funcs.get("exact_answer", fallback_last_number=True)(["q"], ["so 12 it is"],
                                                                answer=["12"]) == [1.0]
    assert funcs.get("exact_answer", answer_column="solution")(
        ["q"], ["#### 3"], solution=["#### 3"]) == [1.0]
    assert funcs.get("exact_answer", tolerance=0.01)(["q"], ["The answer is 100.5."],
                                                     answer=["100"]) == [1.0]
    assert funcs.get("exact_answer")(["q"], ["The answer is 100.5."], answer=["100"]) == [0.0]


def test_exact_answer_bad_input(funcs):
    f = funcs.get("exact_answer")
    with pytest.raises(DataError, match="needs the 'answer' column"):
        f(["q"], ["The answer is 1."], completion_ids=[[1]], trainer_state=None)
    with pytest.raises(DataError, match="row 1: reference answer 'abc' is not a number"):
        f(["q", "q"], ["x", "y"], answer=["1", "abc"])
    with pytest.raises(DataError, match="one value per completion"):
        f(["q", "q"], ["x", "y"], answer=["1"])
    with pytest.raises(ConfigError, match="unknown option 'tolerence'.*tolerance"):
        f.configure(tolerence=0.1)
    with pytest.raises(ConfigError, match="tolerance must be a number >= 0"):
        f.configure(tolerance=-1)


# --- format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,expected", [
    ("3 + 4 = 7.\n\nThe answer is 7.", 1.0),
    ("The answer is 7", 1.0),
    ("The answer is 7.\n", 1.0),
    ("The answer is 7. Let me explain why.", 0.0),  # must be the final line, alone
    ("The answer is 7.\n\nBut maybe it is 8.", 0.0),
    ("3 + 4 = 7.", 0.0),
    ("#### 7", 0.0),  # default style is the answer line
    ("", 0.0),
])
def test_format_default_style(funcs, completion, expected):
    assert funcs.get("format")(["q"], [completion]) == [expected]
    assert funcs.get("format")(["q"], [conv(completion)]) == [expected]


def test_format_styles_and_min_steps(funcs):
    texts = ["a = 1.\n\nThe answer is 1.", "step\n#### 1", "The answer is 1."]
    assert funcs.get("format", style="gsm8k")(None, texts) == [0.0, 1.0, 0.0]
    assert funcs.get("format", style="any")(None, texts) == [1.0, 1.0, 1.0]
    assert funcs.get("format", min_steps=1)(None, texts) == [1.0, 0.0, 0.0]
    assert funcs.get("format", min_steps=2)(None, texts) == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="style must be one of"):
        funcs.get("format", style="latex")


# --- length_penalty -------------------------------------------------------------------------

def test_length_penalty_values(funcs):
    texts = ["x" * 50, "x" * 100, "x" * 250]
    assert funcs.get("length_penalty", target=100)(None, texts) == [0.0, 0.0, -1.5]
    assert funcs.get("length_penalty", target=100, scale=2)(None, texts) == [0.0, 0.0, -3.0]
    assert funcs.get("length_penalty", target=100, two_sided=True)(None, texts) == [-0.5, 0.0, -1.5]
    words = ["one two three four", "one"]
    assert funcs.get("length_penalty", target=2, unit="words")(None, words) == [-1.0, 0.0]
    ids = [[1] * 30, [1] * 10]
    assert funcs.get("length_penalty", target=20, unit="tokens")(
        None, ["a", "b"], completion_ids=ids) == [-0.5, 0.0]
    with pytest.raises(DataError, match="completion_ids"):
        funcs.get("length_penalty", unit="tokens")(None, ["a"])
    with pytest.raises(ConfigError, match="target must be > 0"):
        funcs.get("length_penalty", target=0)
    with pytest.raises(ConfigError, match="unit must be one of"):
        funcs.get("length_penalty", unit="bytes")


def test_completion_and_prompt_text():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert completion_text([{"role": "assistant",
                             "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    with pytest.raises(DataError):
        completion_text(3)


# --- call_reward_functions ------------------------------------------------------------------

def _trl_reference(outputs, weights):
    """TRL 1.16 GRPOTrainer: None -> NaN, weighted nansum, all-None rows -> NaN."""
    import torch

    t = torch.tensor([[math.nan if v is None else v for v in col] for col in outputs],
                     dtype=torch.float64).T
    total = (t * torch.tensor(weights, dtype=torch.float64).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(t).all(dim=1)] = math.nan
    return total.tolist()


def test_weighted_sum_matches_trl_rule():
    def a(prompts, completions, **kw):
        return [1.0, None, 0.5, None]

    def b(prompts, completions, **kw):
        return [2.0, 3.0, None, None]

    total, per = call_reward_functions([a, b], [0.5, 2.0], ["p"] * 4, ["c"] * 4)
    assert per == {"a": [1.0, None, 0.5, None], "b": [2.0, 3.0, None, None]}
    # by hand: 0.5*1 + 2*2 = 4.5; 2*3 = 6; 0.5*0.5 = 0.25; nothing -> NaN
    assert total[:3] == [4.5, 6.0, 0.25] and math.isnan(total[3])
    ref = _trl_reference([per["a"], per["b"]], [0.5, 2.0])
    assert total[:3] == ref[:3] and math.isnan(ref[3])


def test_builtins_through_call_reward_functions(funcs):
    completions = ["1 + 1 = 2.\n\nThe answer is 2.", conv("The answer is 3."), "no idea"]
    fs, ws = resolve_reward_functions(["exact_answer", {"name": "format", "weight": 0.5},
                                      {"name": "length_penalty", "weight": 1.0,
                                       "options": {"target": 10}}])
    total, per = call_reward_functions(fs, ws, ["q"] * 3, completions, answer=["2", "2", None])
    assert list(per) == ["exact_answer", "format", "length_penalty"]
    assert per["exact_answer"] == [1.0, 0.0, None]
    assert per["format"] == [1.0, 1.0, 0.0]
    lengths = [len("1 + 1 = 2.\n\nThe answer is 2."), len("The answer is 3."), len("no idea")]
    assert per["length_penalty"] == [-max(0, n - 10) / 10 for n in lengths]
    assert total == pytest.approx([1.0 + 0.5 + per["length_penalty"][0],
                                   0.0 + 0.5 + per["length_penalty"][1],
                                   0.0 + per["length_penalty"][2]])


def test_columns_are_passed_through_and_checked():
    seen = {}

    def spy(prompts, completions, **kw):
        seen.update(kw)
        return [0.0] * len(completions)

    call_reward_functions([spy], None, ["p", "q"], ["c", "d"], answer=["1", "2"], trainer_state=7)
    assert seen == {"answer": ["1", "2"], "trainer_state": 7}
    with pytest.raises(DataError, match="column 'answer' has 1 values for 2 completions"):
        call_reward_functions([spy], None, ["p", "q"], ["c", "d"], answer=["1"])
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        call_reward_functions([spy], None, ["p", "q"], ["c"])


def _returning(value, name="bad_func"):
    def f(prompts, completions, **kw):
        return value
    f.__name__ = name
    return f


@pytest.mark.parametrize("output,message", [
    ([1.0], "'bad_func' returned 1 rewards for 2 completions"),
    ([1.0, 2.0, 3.0], "'bad_func' returned 3 rewards for 2 completions"),
    ([1.0, "high"], r"'bad_func' returned a non-number \('high'\) for completion 1"),
    ([1.0, [2.0]], "'bad_func' returned a non-number"),
    ([math.nan, 1.0], "'bad_func' returned nan .* for completion 0"),
    ([1.0, math.inf], "'bad_func' returned inf"),
    ([1.0, -math.inf], "'bad_func' returned -inf"),
    (1.0, "'bad_func' returned float, expected a list"),
    (None, "'bad_func' returned NoneType"),
])
def test_bad_outputs_name_the_function(output, message):
    good = _returning([0.0, 0.0], "good")
    with pytest.raises(DataError, match=message):
        call_reward_functions([good, _returning(output)], None, ["p", "q"], ["c", "d"])


def test_array_like_outputs_are_accepted():
    import numpy as np
    import torch

    total, per = call_reward_functions(
        [_returning(np.array([1.0, 2.0]), "np_func"), _returning(torch.tensor([0.5, 0.25]), "t_func"),
         _returning((np.float32(1.0), True), "tuple_func")],
        [1.0, 1.0, 1.0], ["p", "q"], ["c", "d"])
    assert per == {"np_func": [1.0, 2.0], "t_func": [0.5, 0.25], "tuple_func": [1.0, 1.0]}
    assert total == [2.5, 3.25]


def test_names_weights_and_exceptions():
    f = _returning([1.0], "same")
    g = _returning([2.0], "same")
    total, per = call_reward_functions([f, g], [1.0, 1.0], ["p"], ["c"])
    assert list(per) == ["same", "same_2"] and total == [3.0]
    with pytest.raises(ConfigError, match="2 reward weights given for 1 reward functions"):
        call_reward_functions([f], [1.0, 2.0], ["p"], ["c"])
    with pytest.raises(ConfigError, match="must be a finite number"):
        call_reward_functions([f], [math.nan], ["p"], ["c"])
    with pytest.raises(ConfigError, match="no reward functions"):
        call_reward_functions([], None, ["p"], ["c"])

    def boom(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(PluginError, match="reward function 'boom' raised KeyError"):
        call_reward_functions([boom], None, ["p"], ["c"])


def test_async_reward_functions_are_awaited():
    async def later(prompts, completions, **kw):
        return [1.5 for _ in completions]

    total, per = call_reward_functions([later], [2.0], ["p", "q"], ["c", "d"])
    assert total == [3.0, 3.0] and per == {"later": [1.5, 1.5]}


def test_resolve_reward_functions_errors():
    with pytest.raises(UnknownComponentError, match="exact_answr.*Did you mean 'exact_answer'"):
        resolve_reward_functions(["exact_answr"])
    with pytest.raises(ConfigError, match="needs a 'name'"):
        resolve_reward_functions([{"weight": 1.0}])
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        resolve_reward_functions([{"name": "format", "weight": "high"}])
    with pytest.raises(ConfigError, match="unknown option 'targt'"):
        resolve_reward_functions([{"name": "length_penalty", "targt": 3}])
    custom = _returning([0.0], "mine")
    fs, ws = resolve_reward_functions([custom, "format"])
    assert fs[0] is custom and ws == [1.0, 1.0]


def test_third_party_function_resolves_by_name(rlhf_plugin):
    from rlhf_plugins.testing import component_plugin

    def always_one(prompts, completions, **kw):
        return [1.0] * len(completions)

    reg = rlhf_plugin(component_plugin("reward_functions", always_one, name="always_one_test"))
    fs, ws = resolve_reward_functions(["always_one_test"], registry=reg)
    assert call_reward_functions(fs, ws, ["p"], ["c"]) == ([1.0], {"always_one": [1.0]})
