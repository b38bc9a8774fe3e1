"""Dynamic sampling (DAPO): drop the groups a selection rule rejects, before the policy update.

One family, two uses: any selection rule (family ``selection_rules``) can serve as a group
filter. :func:`group_keep_mask` groups the flat rewards of a generation batch (consecutive
blocks of ``num_generations``, TRL's layout), asks the rule to select from them, and **keeps a
group when the rule selects at least one of its completions**; a kept group keeps all its
completions (the update needs the whole group for its baseline). Global rules (``top_k``) thus
keep the groups that hold one of the k best completions of the batch.

:class:`NonzeroVariance` is DAPO's filter: it selects every scored completion of the groups
whose scored rewards are not all equal (a group of equal rewards has zero advantage under any
group baseline, so it only dilutes the loss normalisation).

Pure Python: importing this module does not import torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from .errors import ConfigError, DataError
from .sdk import SelectionRule, option, reward_value
from .selection_contract import call_selection_rule

__all__ = ["NonzeroVariance", "completion_keep_mask", "group_filter_metrics", "group_keep_mask"]


@dataclass(frozen=True)
class NonzeroVariance(SelectionRule):
    """Every scored completion of the prompts whose scored rewards are not all equal (DAPO)."""

    name: ClassVar[str] = "nonzero_variance"
    description: ClassVar[str] = ("DAPO dynamic sampling: every scored completion of prompts whose "
                                  "rewards are not all equal")

    tolerance: float = option(0.0, help="rewards spanning <= tolerance (max - min) count as all equal")
    keep_singletons: bool = option(True, help="keep a prompt that has exactly one completion (if scored), "
                                              "as verl's DAPO does (a group of one has no variance)")

    def validate_options(self) -> None:
        """tolerance is a finite number >= 0."""
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")

    def choose(self, rewards: list[list[float]]) -> list[tuple[int, int]]:
        """All scored pairs of the prompts with reward spread > tolerance (or singletons)."""
        pairs: list[tuple[int, int]] = []
        for i, row in enumerate(rewards):
            scored = [j for j, r in enumerate(row) if not math.isnan(r)]
            if not scored:
                continue
            values = [row[j] for j in scored]
            if (len(row) == 1 and self.keep_singletons) or max(values) - min(values) > self.tolerance:
                pairs.extend((i, j) for j in scored)
        return pairs


def _flat_rewards(rewards: Any) -> list[float]:
    """[B] rewards (list, tuple, tensor, array; None = NaN) as floats; DataError when malformed."""
    if hasattr(rewards, "tolist") and not isinstance(rewards, (list, tuple)):
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, (list, tuple)):
        raise DataError(f"group filter: rewards must be a flat [B] sequence of numbers, got "
                        f"{type(rewards).__name__}")
    return [reward_value(value, f"group filter: rewards[{i}]") for i, value in enumerate(rewards)]


def _check_groups(batch: int, num_generations: Any) -> int:
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ConfigError(f"group filter: num_generations must be an int >= 1, got {num_generations!r}")
    if batch % num_generations:
        raise DataError(f"group filter: batch size {batch} is not divisible by num_generations="
                        f"{num_generations} (groups are consecutive blocks)")
    return batch // num_generations


def group_keep_mask(rule: Any, rewards: Any, num_generations: int) -> list[bool]:
    """One bool per group: True when `rule` selects at least one of the group's completions.

    `rule` is a configured selection rule (anything with ``select(rewards_per_prompt)``);
    `rewards` is the flat [B] batch (None/NaN = unscored) with groups as consecutive blocks of
    `num_generations` completions.
    """
    if not callable(getattr(rule, "select", None)):
        raise ConfigError(f"group filter: {rule!r} is not a selection rule (it has no select())")
    flat = _flat_rewards(rewards)
    n_groups = _check_groups(len(flat), num_generations)
    grouped = [flat[g * num_generations:(g + 1) * num_generations] for g in range(n_groups)]
    selected = {i for i, _ in call_selection_rule(rule, grouped)}
    return [g in selected for g in range(n_groups)]


def completion_keep_mask(keep: Sequence[bool], num_generations: int) -> list[bool]:
    """The per-group mask expanded to one bool per completion ([B])."""
    _check_groups(len(keep) * num_generations, num_generations)
    return [bool(k) for k in keep for _ in range(num_generations)]


def group_filter_metrics(keep: Sequence[bool]) -> dict[str, float]:
    """groups / groups_kept / groups_dropped counts and dropped_fraction (0 for no groups)."""
    total = len(keep)
    kept = sum(1 for k in keep if k)
    return {"groups": float(total), "groups_kept": float(kept), "groups_dropped": float(total - kept),
            "dropped_fraction": (total - kept) / total if total else 0.0}
