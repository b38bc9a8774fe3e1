"""Selection rules (family `selection_rules`): the course notes' example, ties, NaN, ragged input,
matched random controls, parameter errors and properties checked with hypothesis."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_plugins
from rlhf_plugins.errors import ConfigError, DataError

NAN = math.nan

# The course notes' rejection-sampling example: 5 prompts x 4 completions.
COURSE = [
    [0.7, 0.3, 0.5, 0.2],
    [0.4, 0.8, 0.6, 0.5],
    [0.9, 0.3, 0.4, 0.7],
    [0.2, 0.5, 0.8, 0.6],
    [0.5, 0.4, 0.3, 0.6],
]
RULES = ("top_per_prompt", "top_k", "threshold", "random_per_prompt", "random_k")


@pytest.fixture(scope="module")
def rules():
    return rlhf_plugins.registry(reload=True).selection_rules


def test_builtins_are_registered_with_descriptions(rules):
    assert set(RULES) <= set(rules.names())
    for name in RULES:
        assert rules.provenance(name).plugin == "rlhf_plugins.builtin.selection"
        assert rules.description(name)


def test_course_example_top_per_prompt_takes_one_per_prompt(rules):
    # argmax of each row (hand-read from the matrix): 0.7, 0.8, 0.9, 0.8, 0.6
    assert rules.get("top_per_prompt").select(COURSE) == [(0, 0), (1, 1), (2, 0), (3, 2), (4, 3)]


def test_course_example_top_5_gives_prompt_3_two_and_prompt_5_none(rules):
    picked = rules.get("top_k").select(COURSE, k=5)
    # 0.9 (p3), 0.8 (p2), 0.8 (p4), 0.7 (p1), 0.7 (p3): prompt 3 twice, prompt 5 never
    assert picked == [(0, 0), (1, 1), (2, 0), (2, 3), (3, 2)]
    per_prompt = [sum(1 for i, _ in picked if i == p) for p in range(5)]
    assert per_prompt == [1, 1, 2, 1, 0]
    assert sorted((COURSE[i][j] for i, j in picked), reverse=True) == [0.9, 0.8, 0.8, 0.7, 0.7]


def test_top_k_tie_at_the_cut_goes_to_the_lower_prompt(rules):
    # k=4: 0.9, 0.8, 0.8 then one of the two 0.7s (prompt 0 wins over prompt 2)
    assert rules.get("top_k").select(COURSE, k=4) == [(0, 0), (1, 1), (2, 0), (3, 2)]


def test_threshold_on_course_example(rules):
    rule = rules.get("threshold")
    expected = [(0, 0), (1, 1), (1, 2), (2, 0), (2, 3), (3, 2), (3, 3), (4, 3)]  # r >= 0.6
    assert rule.select(COURSE, min_reward=0.6) == expected
    assert rule.select(COURSE, min_reward=0.6, max_per_prompt=1) == [
        (0, 0), (1, 1), (2, 0), (3, 2), (4, 3)]
    assert rule.select(COURSE, min_reward=0.85) == [(2, 0)]
    assert rule.select(COURSE, min_reward=5.0) == []


def test_ties_go_to_the_lower_completion_index(rules):
    rewards = [[1.0, 1.0, 1.0], [0.5, 2.0, 2.0], [3.0, -1.0, 3.0]]
    assert rules.get("top_per_prompt").select(rewards) == [(0, 0), (1, 1), (2, 0)]
    assert rules.get("top_k").select(rewards, k=2) == [(2, 0), (2, 2)]
    assert rules.get("top_k").select(rewards, k=3) == [(1, 1), (2, 0), (2, 2)]
    assert rules.get("threshold").select(rewards, min_reward=1.0, max_per_prompt=1) == [
        (0, 0), (1, 1), (2, 0)]


def test_nan_and_none_are_never_selected_and_empty_prompts_contribute_nothing(rules):
    rewards = [[NAN, 0.1, NAN], [NAN, NAN], [], [None, 0.3], [0.2]]
    assert rules.get("top_per_prompt").select(rewards) == [(0, 1), (3, 1), (4, 0)]
    assert rules.get("top_k").select(rewards, k=3) == [(0, 1), (3, 1), (4, 0)]
    assert rules.get("threshold").select(rewards, min_reward=-math.inf) == [(0, 1), (3, 1), (4, 0)]
    for seed in range(20):
        assert rules.get("random_per_prompt").select(rewards, seed=seed) == [(0, 1), (3, 1), (4, 0)]
        assert rules.get("random_k").select(rewards, k=3, seed=seed) == [(0, 1), (3, 1), (4, 0)]
    with pytest.raises(ConfigError, match="'k'=4 .* 3 scored"):
        rules.get("top_k").select(rewards, k=4)
    assert rules.get("top_per_prompt").select([[NAN], []]) == []
    assert rules.get("top_per_prompt").select([]) == []


def test_ragged_lists_and_minus_infinity_is_never_selected(rules):
    rewards = [[0.1], [0.5, 0.2, 0.9, 0.4, 0.3], [-math.inf, 0.0], [-math.inf, -1.0], [-math.inf]]
    assert rules.get("top_per_prompt").select(rewards) == [(0, 0), (1, 2), (2, 1), (3, 1)]
    assert rules.get("top_k").select(rewards, k=3) == [(1, 0), (1, 2), (1, 3)]
    # -inf is unscored: even the lowest threshold and the random controls skip it
    assert rules.get("threshold").select(rewards, min_reward=-math.inf) == [
        (0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (3, 1)]
    for seed in range(10):
        assert rules.get("random_per_prompt").select(rewards, seed=seed)[2:] == [(2, 1), (3, 1)]
        assert rules.get("random_k").select(rewards, k=8, seed=seed) == rules.get(
            "threshold").select(rewards, min_reward=-math.inf)
    with pytest.raises(ConfigError, match="'k'=9 is larger than the 8 scored"):
        rules.get("top_k").select(rewards, k=9)


@pytest.mark.parametrize("rule,options", [
    ("top_per_prompt", {}), ("top_k", {"k": 1}), ("threshold", {"min_reward": 0.0}),
    ("random_per_prompt", {}), ("random_k", {"k": 1})])
def test_plus_infinity_is_a_data_error_naming_the_position(rules, rule, options):
    with pytest.raises(DataError, match=r"rewards\[1\]\[0\] is \+inf"):
        rules.get(rule).select([[0.5], [math.inf, 0.1]], **options)


def test_sequences_of_other_types_are_accepted(rules):
    import numpy as np
    import torch

    expected = rules.get("top_k").select(COURSE, k=5)
    assert rules.get("top_k").select(np.array(COURSE), k=5) == expected
    assert rules.get("top_k").select(torch.tensor(COURSE, dtype=torch.float64), k=5) == expected
    assert rules.get("top_k").select(tuple(tuple(r) for r in COURSE), k=5) == expected


def test_random_rules_are_reproducible_and_matched_in_count(rules):
    import random

    rng = random.Random(0)
    rewards = [[rng.random() for _ in range(rng.randint(1, 8))] for _ in range(30)]
    rpp, rk = rules.get("random_per_prompt"), rules.get("random_k")
    assert rpp.select(rewards, seed=7) == rpp.select(rewards, seed=7)
    assert rk.select(rewards, k=12, seed=7) == rk.select(rewards, k=12, seed=7)
    assert rpp.select(rewards, seed=7) != rpp.select(rewards, seed=8)
    assert rk.select(rewards, k=12, seed=7) != rk.select(rewards, k=12, seed=8)
    assert len(rpp.select(rewards, seed=3)) == len(rules.get("top_per_prompt").select(rewards)) == 30
    assert [i for i, _ in rpp.select(rewards, seed=3)] == list(range(30))
    assert len(rk.select(rewards, k=12, seed=3)) == len(rules.get("top_k").select(rewards, k=12)) == 12
    # the default seed is fixed (0): the control is deterministic without configuration
    assert rk.select(rewards, k=12) == rk.select(rewards, k=12, seed=0)


def test_random_per_prompt_is_roughly_uniform(rules):
    rewards = [[0.0, 0.0, 0.0, 0.0]] * 4000
    counts = [0, 0, 0, 0]
    for _, j in rules.get("random_per_prompt").select(rewards, seed=1):
        counts[j] += 1
    assert all(900 < c < 1100 for c in counts), counts


def test_results_are_stable_across_processes():
    code = ("import rlhf_plugins; r=rlhf_plugins.registry().selection_rules;"
            "R=[[i*0.37%1, (i*7)%5/5, 0.5] for i in range(20)];"
            "print(r.get('random_k').select(R, k=9, seed=5), r.get('random_per_prompt').select(R, seed=5))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1


def test_configure_binds_parameters_and_call_time_values_win(rules):
    top5 = rules.get("top_k", k=5)
    assert top5.select(COURSE) == rules.get("top_k").select(COURSE, k=5)
    assert top5.select(COURSE, k=1) == [(2, 0)]
    assert rules.get("threshold", min_reward=0.85).select(COURSE) == [(2, 0)]


@pytest.mark.parametrize("rule,params,message", [
    ("top_k", {}, "'top_k': missing required option 'k'"),
    ("random_k", {}, "'random_k': missing required option 'k'"),
    ("top_k", {"k": 0}, "'top_k': option 'k' must be >= 1"),
    ("top_k", {"k": -3}, "'top_k': option 'k' must be >= 1"),
    ("top_k", {"k": 21}, "'top_k': option 'k'=21 is larger than the 20"),
    ("random_k", {"k": 21}, "'random_k': option 'k'=21 is larger than the 20"),
    ("top_k", {"k": 2.5}, "'top_k': option 'k': expected an integer"),
    ("top_k", {"k": True}, "'top_k': option 'k': expected an integer"),
    ("top_k", {"k": "5"}, "'top_k': option 'k': expected an integer"),
    ("top_k", {"k": 5, "min_reward": 1}, "'top_k': unknown option 'min_reward'"),
    ("top_per_prompt", {"k": 1}, "'top_per_prompt': unknown option 'k'"),
    ("threshold", {}, "'threshold': missing required option 'min_reward'"),
    ("threshold", {"min_reward": NAN}, "'threshold': option 'min_reward' must be a number"),
    ("threshold", {"min_reward": "high"}, "'threshold': option 'min_reward': expected a number"),
    ("threshold", {"min_reward": 0, "max_per_prompt": 0},
     "'threshold': option 'max_per_prompt' must be >= 1"),
    ("random_per_prompt", {"seed": "x"}, "'random_per_prompt': option 'seed': expected an integer"),
])
def test_bad_parameters_name_the_rule_and_parameter(rules, rule, params, message):
    with pytest.raises(ConfigError) as info:
        rules.get(rule).select(COURSE, **params)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_parameters_fail_at_configure_time(rules):
    with pytest.raises(ConfigError, match="'top_k': option 'k' must be >= 1"):
        rules.get("top_k", k=0)
    with pytest.raises(ConfigError, match="unknown option 'kk'.*did you mean 'k'"):
        rules.get("top_k", kk=3)


def test_options_are_typed_fields_with_help(rules):
    top_k = rules.get("top_k", k=5.0)  # YAML may give an integral float
    assert top_k.k == 5 and type(top_k.k) is int and top_k.options == {"k": 5}
    assert rules.get("threshold", min_reward=1).options == {"min_reward": 1, "max_per_prompt": None}
    for name in RULES:
        for opt in rules.options(name):
            assert opt["help"] and opt["type"], (name, opt)
    assert [o["name"] for o in rules.options("random_k")] == ["k", "seed"]
    assert rules.get("top_k").required_options == ("k",)


@pytest.mark.parametrize("rewards,where", [
    ([[0.1, "a"]], r"rewards\[0\]\[1\]"),
    ([0.1, 0.2], r"rewards\[0\]"),
    ("abc", "list of lists"),
    ([[0.1], "x"], r"rewards\[1\]"),
])
def test_malformed_rewards_are_data_errors(rules, rewards, where):
    with pytest.raises(DataError, match=where):
        rules.get("top_per_prompt").select(rewards)


# --- properties ----------------------------------------------------------------------------

reward_values = st.one_of(st.floats(-5, 5, allow_nan=False), st.just(NAN), st.just(-math.inf),
                          st.sampled_from([0.0, 0.5, 1.0]))  # repeated values make ties likely


def _scored(r):
    """NaN and -inf are unscored: never selected."""
    return not math.isnan(r) and r != -math.inf
reward_lists = st.lists(st.lists(reward_values, max_size=6), max_size=8)


def _valid(rewards):
    return [(r, i, j) for i, row in enumerate(rewards) for j, r in enumerate(row) if _scored(r)]


def _check_shape(pairs, rewards):
    assert pairs == sorted(pairs)
    assert len(set(pairs)) == len(pairs)
    for i, j in pairs:
        assert 0 <= i < len(rewards) and 0 <= j < len(rewards[i])
        assert _scored(rewards[i][j])


@settings(max_examples=150, deadline=None)
@given(rewards=reward_lists, data=st.data())
def test_property_top_k_picks_maximal_rewards(rules, rewards, data):
    valid = _valid(rewards)
    if not valid:
        return
    k = data.draw(st.integers(1, len(valid)))
    pairs = rules.get("top_k").select(rewards, k=k)
    _check_shape(pairs, rewards)
    assert len(pairs) == k
    chosen = set(pairs)
    selected = [r for r, i, j in valid if (i, j) in chosen]
    unselected = [(r, i, j) for r, i, j in valid if (i, j) not in chosen]
    if unselected:
        assert min(selected) >= max(r for r, _, _ in unselected)
        # at the cut, ties go to lower (prompt, completion) positions
        cut = min(selected)
        tied_in = [(i, j) for r, i, j in valid if r == cut and (i, j) in chosen]
        tied_out = [(i, j) for r, i, j in unselected if r == cut]
        if tied_out:
            assert max(tied_in) < min(tied_out)
    # the matched control returns the same number of distinct scored pairs
    random_pairs = rules.get("random_k").select(rewards, k=k, seed=data.draw(st.integers(0, 99)))
    _check_shape(random_pairs, rewards)
    assert len(random_pairs) == k


@settings(max_examples=150, deadline=None)
@given(rewards=reward_lists, seed=st.integers(0, 10_000))
def test_property_per_prompt_rules(rules, rewards, seed):
    top = rules.get("top_per_prompt").select(rewards)
    rnd = rules.get("random_per_prompt").select(rewards, seed=seed)
    for pairs in (top, rnd):
        _check_shape(pairs, rewards)
    scored_prompts = [i for i, row in enumerate(rewards) if any(_scored(r) for r in row)]
    assert [i for i, _ in top] == scored_prompts == [i for i, _ in rnd]
    for i, j in top:
        row = [r for r in rewards[i] if _scored(r)]
        assert rewards[i][j] == max(row)
        assert j == min(c for c, r in enumerate(rewards[i]) if r == max(row))


@settings(max_examples=150, deadline=None)
@given(rewards=reward_lists, min_reward=st.floats(-5, 5), cap=st.one_of(st.none(), st.integers(1, 4)))
def test_property_threshold(rules, rewards, min_reward, cap):
    pairs = rules.get("threshold").select(rewards, min_reward=min_reward, max_per_prompt=cap)
    _check_shape(pairs, rewards)
    assert all(rewards[i][j] >= min_reward for i, j in pairs)
    for i, row in enumerate(rewards):
        passing = [j for j, r in enumerate(row) if _scored(r) and r >= min_reward]
        mine = [j for p, j in pairs if p == i]
        if cap is None:
            assert mine == passing
        else:
            assert len(mine) == min(cap, len(passing))
            if len(passing) > cap:  # the kept ones are the best of the passing ones
                kept = [row[j] for j in mine]
                dropped = [row[j] for j in passing if j not in mine]
                assert min(kept) >= max(dropped)


def test_module_does_not_import_torch_or_numpy():
    code = ("import sys, rlhf_plugins.builtin.selection as s, rlhf_plugins;"
            "rlhf_plugins.registry().selection_rules.get('top_k').select([[1.0, 2.0]], k=1);"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
