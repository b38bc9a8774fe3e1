"""The contract between a caller and a selection rule, checked at every call.

A ``selection_rules`` component is called as ``rule.select(rewards)`` on one list of rewards per
prompt (NaN = unscored). Rejection sampling keeps the completions it selects; a PPO group filter
keeps the groups it selects one completion of. Both get the same guarantee here: the result must
be an iterable of ``(prompt, completion)`` integer pairs inside the reward matrix that never name
an unscored (NaN or -inf) completion. Anything else, and any exception raised inside the rule,
is a ComponentError naming the rule, its plugin and the offending pair, instead of an
IndexError deep in the caller or a silently kept unscored sample.

Pure Python: importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .guard import contract_error, guarded

__all__ = ["call_selection_rule"]

FAMILY = "selection_rules"


def call_selection_rule(rule: Any, rewards: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """`rule.select(rewards)` under the contract (module docstring): the sorted, distinct pairs."""
    def fail(what: str) -> Exception:
        return contract_error(rule, FAMILY, what, "select()")

    with guarded(rule, FAMILY, "select()"):
        pairs = rule.select(rewards)
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise fail(f"returned {type(pairs).__name__}, expected a list of (prompt, completion) pairs")
    out = set()
    for pair in pairs:
        try:
            i, j = int(pair[0]), int(pair[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise fail(f"returned {pair!r}, not a (prompt, completion) pair of integers") from None
        if not (0 <= i < len(rewards) and 0 <= j < len(rewards[i])):
            raise fail(f"returned {pair!r}, outside the reward matrix ({len(rewards)} prompts)")
        value = rewards[i][j]
        if value is None or math.isnan(value) or value == -math.inf:
            raise fail(f"selected the unscored (NaN or -inf) completion {pair!r}")
        out.add((i, j))
    return sorted(out)
