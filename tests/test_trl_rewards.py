"""TRL's reward functions as components: TRL's scores, lazy imports, threads, the math extra."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhf_plugins import registry
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.rewarding import call_reward_functions, resolve_reward_functions

COMPLETIONS = [[{"role": "assistant", "content": r"<think>1/3 of it</think> \boxed{\frac{1}{3}}"}],
               [{"role": "assistant", "content": r"so the answer is \boxed{\frac{1}{2}}"}],
               r"<think>no end. \boxed{4}"]
SOLUTIONS = [r"\frac{1}{3}", r"\frac{1}{3}", "4"]
IDS = [[1, 2, 3, 4], [5, 5, 5, 5, 5, 5], list(range(90))]
PROMPTS = ["q1", "q2", "q3"]
NAMES = ["trl_accuracy", "trl_reasoning_accuracy", "trl_think_format", "trl_soft_overlong",
         "trl_cosine_scaled", "trl_repetition_penalty"]


def _conv(completions):
    return [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]


def test_registered_without_importing_torch_or_trl():
    code = ("import sys, rlhf_plugins; names = rlhf_plugins.registry().reward_functions.names(); "
            f"assert set({NAMES!r}) <= set(names), names; "
            "assert 'torch' not in sys.modules and 'trl' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_based_rewards_equal_trls():
    from trl.rewards import (get_repetition_penalty_reward, get_soft_overlong_punishment,
                             think_format_reward)

    reg = registry().reward_functions
    kw = {"completion_ids": IDS}
    assert reg.get("trl_think_format")(PROMPTS, COMPLETIONS) == think_format_reward(_conv(COMPLETIONS))
    assert reg.get("trl_soft_overlong", max_completion_len=100, soft_punish_cache=20)(
        PROMPTS, COMPLETIONS, **kw) == get_soft_overlong_punishment(100, 20)(IDS) == [0.0, 0.0, -0.5]
    assert reg.get("trl_repetition_penalty", ngram_size=2)(PROMPTS, COMPLETIONS, **kw) == \
        get_repetition_penalty_reward(2, -1.0)(IDS)
    with pytest.raises(DataError, match="completion_ids"):
        reg.get("trl_repetition_penalty")(PROMPTS, COMPLETIONS)
    with pytest.raises(ConfigError, match="max_penalty"):
        reg.get("trl_repetition_penalty", max_penalty=0.5)


def test_math_verify_rewards_equal_trls_and_run_off_the_main_thread():
    pytest.importorskip("math_verify")
    from trl.rewards import accuracy_reward, get_cosine_scaled_reward, reasoning_accuracy_reward

    funcs, _ = resolve_reward_functions([
        {"name": "trl_accuracy", "solution_column": "answer"},
        {"name": "trl_reasoning_accuracy", "solution_column": "answer"},
        {"name": "trl_cosine_scaled", "solution_column": "answer", "max_len": 100}])
    columns = {"answer": SOLUTIONS, "completion_ids": IDS}
    expected = [accuracy_reward(_conv(COMPLETIONS), SOLUTIONS),
                reasoning_accuracy_reward(_conv(COMPLETIONS), SOLUTIONS),
                get_cosine_scaled_reward(100)(_conv(COMPLETIONS), SOLUTIONS, IDS)]
    assert expected[0] == [1.0, 0.0, 1.0] and expected[1] == [1.0, 0.0, 0.0]
    main = [f(PROMPTS, COMPLETIONS, **columns) for f in funcs]
    assert main == expected
    # math-verify's signal-based timeout only works in the main thread: off it, no timeout
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda f: f(PROMPTS, COMPLETIONS, **columns), funcs))
    assert threaded == expected
    total, per_function = call_reward_functions(funcs, [1.0, 1.0, 1.0], PROMPTS, COMPLETIONS, **columns)
    assert list(per_function) == ["trl_accuracy", "trl_reasoning_accuracy", "trl_cosine_scaled"]
    with pytest.raises(DataError, match="'solution' column"):
        registry().reward_functions.get("trl_accuracy")(PROMPTS, COMPLETIONS, answer=SOLUTIONS)


def test_missing_math_verify_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    for name in ("trl_accuracy", "trl_reasoning_accuracy", "trl_cosine_scaled"):
        with pytest.raises(ConfigError, match=r"rlhf-plugins\[math\]"):
            resolve_reward_functions([name])
    # the others need no extra
    resolve_reward_functions(["trl_think_format", "trl_soft_overlong", "trl_repetition_penalty"])
