"""rlhf_plugins.group_filters: DAPO's nonzero_variance rule, any selection rule as a group filter,
and the dropped-fraction metrics."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

import rlhf_plugins
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.group_filters import (NonzeroVariance, completion_keep_mask, group_filter_metrics,
                                        group_keep_mask)
from rlhf_plugins.protocols import FAMILIES, missing_members
from rlhf_plugins.sdk import SelectionRule

NAN = float("nan")


def ref_keep(rewards: list[float], k: int, tolerance: float = 0.0) -> list[bool]:
    """A group is kept when its scored rewards are not all equal (a lone completion always is)."""
    keep = []
    for g in range(0, len(rewards), k):
        scored = [r for r in rewards[g:g + k] if not math.isnan(r)]
        keep.append(bool(scored) and (k == 1 or max(scored) - min(scored) > tolerance))
    return keep


def test_nonzero_variance_is_a_selection_rule():
    rule = NonzeroVariance()
    assert isinstance(rule, SelectionRule) and rule.name == "nonzero_variance" and rule.description
    assert not missing_members(rule, FAMILIES["selection_rules"])
    # it selects every scored completion of the groups with spread, nothing of the others
    assert rule.select([[1.0, 0.0, None], [0.5, 0.5], [NAN, 2.0], [3.0, 1.0]]) == \
        [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert rule.select([[0.7]]) == [(0, 0)]  # a prompt with one completion is kept (verl)
    assert rule.configure(keep_singletons=False).select([[0.7]]) == []
    assert rule.select([[NAN]]) == []


def test_options_are_validated():
    assert NonzeroVariance().configure(tolerance="1e-3").tolerance == 1e-3
    for bad in (-1.0, float("inf")):
        with pytest.raises(ConfigError, match="nonzero_variance.*tolerance"):
            NonzeroVariance(tolerance=bad)
    with pytest.raises(ConfigError, match="did you mean 'tolerance'"):
        NonzeroVariance().configure(tolerence=0.1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_group_keep_mask_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    rewards = (torch.randint(0, 2, (16,), generator=g).float()).tolist()  # 0/1 rewards: many flat groups
    rewards[5] = NAN
    assert group_keep_mask(NonzeroVariance(), rewards, k) == ref_keep(rewards, k)
    assert group_keep_mask(NonzeroVariance(), torch.tensor(rewards), k) == ref_keep(rewards, k)


def test_tolerance_counts_small_spreads_as_equal():
    rewards = [0.5, 0.5001, 1.0, 0.0, 0.2, 0.2]
    assert group_keep_mask(NonzeroVariance(), rewards, 2) == [True, True, False]
    assert group_keep_mask(NonzeroVariance(tolerance=1e-3), rewards, 2) == [False, True, False]


def test_any_selection_rule_serves_as_a_filter():
    rules = rlhf_plugins.registry().selection_rules
    rewards = [0.1, 0.9, 0.2, 0.3, NAN, 0.6, 0.0, 0.0]
    # threshold: a group is kept when one of its completions reaches min_reward
    assert group_keep_mask(rules.get("threshold", min_reward=0.55), rewards, 2) == [True, False, True, False]
    # top_k (global): the groups holding one of the batch's 2 best completions
    assert group_keep_mask(rules.get("top_k", k=2), rewards, 2) == [True, False, True, False]
    assert group_keep_mask(rules.get("top_per_prompt"), rewards, 2) == [True, True, True, True]


def test_expansion_and_metrics():
    keep = [True, False, True, False, False]
    assert completion_keep_mask(keep, 2) == [True, True, False, False, True, True, False, False, False, False]
    assert group_filter_metrics(keep) == {"groups": 5.0, "groups_kept": 2.0, "groups_dropped": 3.0,
                                          "dropped_fraction": 0.6}
    assert group_filter_metrics([])["dropped_fraction"] == 0.0


def test_errors():
    rule = NonzeroVariance()
    with pytest.raises(DataError, match="divisible"):
        group_keep_mask(rule, [1.0, 2.0, 3.0], 2)
    with pytest.raises(ConfigError, match="num_generations"):
        group_keep_mask(rule, [1.0, 2.0], 0)
    with pytest.raises(DataError, match=r"rewards\[1\]"):
        group_keep_mask(rule, [1.0, "x"], 2)
    with pytest.raises(DataError, match="flat"):
        group_keep_mask(rule, "1.0", 1)
    with pytest.raises(ConfigError, match="not a selection rule"):
        group_keep_mask(lambda r: r, [1.0, 2.0], 2)



class _Rule:
    """A selection rule returning whatever it is given (the contract's inputs), by name."""

    name = "odd_rule"

    def __init__(self, returned):
        self.returned = returned

    def select(self, rewards):
        if isinstance(self.returned, Exception):
            raise self.returned
        return self.returned


@pytest.mark.parametrize("returned, needle", [
    (None, "returned NoneType, expected a list of (prompt, completion) pairs"),
    ([(0,)], "returned (0,), not a (prompt, completion) pair of integers"),
    ([(2, 0)], "returned (2, 0), outside the reward matrix (2 prompts)"),
    ([(0, 2)], "returned (0, 2), outside the reward matrix"),
    ([(1, 1)], "selected the unscored (NaN or -inf) completion (1, 1)"),
    (KeyError("boom"), "raised KeyError in select(): 'boom'"),
])
def test_a_group_filter_rule_is_held_to_the_selection_contract(returned, needle):
    """The rule a PPO group filter asks gets rejection sampling's checks: one ComponentError
    naming the rule (before: an out-of-range index was a DataError, an unscored completion or a
    one-element pair passed or crashed with an IndexError)."""
    from rlhf_plugins.errors import ComponentError

    with pytest.raises(ComponentError, match=r"selection rule 'odd_rule' " + re.escape(needle)):
        group_keep_mask(_Rule(returned), [1.0, 0.0, 1.0, NAN], 2)
    # a well-behaved answer goes through: group 0 kept by its completion 1
    assert group_keep_mask(_Rule([(0, 1), [0, 1]]), [1.0, 0.0, 1.0, NAN], 2) == [True, False]

def test_importing_the_module_does_not_import_torch():
    code = "import sys, rlhf_plugins.group_filters\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
