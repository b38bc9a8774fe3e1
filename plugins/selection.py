"""Built-in rejection-sampling selection rules (family ``selection_rules``).

Every rule is an :class:`rlhf_plugins.sdk.SelectionRule`: ``select(rewards, **options)`` returns
``(prompt_index, completion_index)`` pairs, and each rule implements only ``choose``:

- ``rewards`` is ragged: one sequence of rewards per prompt, completions in generation order.
  ``None``, NaN and -inf mean "unscored" and are never selected; +inf is a
  :class:`~rlhf_plugins.errors.DataError` (a scorer returned an infinite score). A prompt with
  no scored completion (or no completions at all) contributes nothing.
- The result is sorted by prompt then completion, without duplicates, and deterministic for the
  same input and options.
- Ties are broken towards the lower completion index (and, across prompts for the global
  rules, towards the lower prompt index).

Options are dataclass fields: bound once with ``configure(**options)`` (what
``registry().selection_rules.get(name, **options)`` does) and/or passed to ``select``; call-time
values win. Unknown, ill-typed or out-of-range options raise
:class:`~rlhf_plugins.errors.ConfigError` naming the rule and the option.

Pure Python: importing this module does not import torch or numpy.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from rlhf_plugins import ConfigError, hookimpl
from rlhf_plugins.sdk import SelectionRule, option

Pair = tuple[int, int]


def _candidates(rewards: list[list[float]]) -> list[tuple[float, int, int]]:
    """Every scored (reward, prompt, completion) triple, in generation order."""
    return [(r, i, j) for i, row in enumerate(rewards) for j, r in enumerate(row)
            if not math.isnan(r)]


def _best_first(cands: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """Sort by reward descending; ties go to the lower prompt, then the lower completion."""
    return sorted(cands, key=lambda c: (-c[0], c[1], c[2]))


def _at_least(key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"option {key!r} must be >= {minimum}, got {value}")


def _check_k(rule: SelectionRule, k: int, pool: int) -> None:
    """`k` may not exceed the number of scored candidates."""
    if k > pool:
        raise ConfigError(f"{rule._label()}: option 'k'={k} is larger than the {pool} scored "
                          "(finite, non-NaN) completions available")


@dataclass(frozen=True)
class TopPerPrompt(SelectionRule):
    """The highest-reward completion of every prompt (ties: lower completion index)."""

    name: ClassVar[str] = "top_per_prompt"
    description: ClassVar[str] = ("Best completion of each prompt (argmax per prompt; every "
                                  "scored prompt once)")

    def choose(self, rewards: list[list[float]]) -> list[Pair]:
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            best = _best_first([(r, i, j) for j, r in enumerate(row) if not math.isnan(r)])
            if best:
                pairs.append((i, best[0][2]))
        return pairs


@dataclass(frozen=True)
class TopK(SelectionRule):
    """The `k` highest-reward pairs over the flattened reward matrix."""

    name: ClassVar[str] = "top_k"
    description: ClassVar[str] = ("The k best (prompt, completion) pairs overall (a prompt may "
                                  "get several or none)")
    required_options: ClassVar[tuple[str, ...]] = ("k",)

    k: int | None = option(None, help="how many pairs to keep (required; at most the number "
                                      "of scored completions)")

    def validate_options(self) -> None:
        _at_least("k", self.k)

    def choose(self, rewards: list[list[float]]) -> list[Pair]:
        cands = _candidates(rewards)
        _check_k(self, self.k, len(cands))
        return [(i, j) for _, i, j in _best_first(cands)[: self.k]]


@dataclass(frozen=True)
class Threshold(SelectionRule):
    """Every completion with reward >= `min_reward`, optionally at most `max_per_prompt` each."""

    name: ClassVar[str] = "threshold"
    description: ClassVar[str] = ("Every completion with reward >= min_reward (optionally "
                                  "capped per prompt)")
    required_options: ClassVar[tuple[str, ...]] = ("min_reward",)

    min_reward: float | None = option(None, help="keep completions with reward >= this (required)")
    max_per_prompt: int | None = option(None, help="keep at most this many per prompt, the best "
                                                   "first (null: no cap)")

    def validate_options(self) -> None:
        if self.min_reward is not None and math.isnan(self.min_reward):
            raise ValueError("option 'min_reward' must be a number, got nan")
        _at_least("max_per_prompt", self.max_per_prompt)

    def choose(self, rewards: list[list[float]]) -> list[Pair]:
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            keep = _best_first([(r, i, j) for j, r in enumerate(row)
                                if not math.isnan(r) and r >= self.min_reward])
            if self.max_per_prompt is not None:
                keep = keep[: self.max_per_prompt]
            pairs.extend((i, j) for _, i, j in keep)
        return pairs


@dataclass(frozen=True)
class RandomPerPrompt(SelectionRule):
    """One uniformly random scored completion per prompt: the control for `top_per_prompt`."""

    name: ClassVar[str] = "random_per_prompt"
    description: ClassVar[str] = ("One random scored completion per prompt (seeded control for "
                                  "top_per_prompt)")

    seed: int = option(0, help="random seed (the same seed gives the same selection)")

    def choose(self, rewards: list[list[float]]) -> list[Pair]:
        rng = random.Random(self.seed)
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            valid = [j for j, r in enumerate(row) if not math.isnan(r)]
            if valid:
                pairs.append((i, valid[rng.randrange(len(valid))]))
        return pairs


@dataclass(frozen=True)
class RandomK(SelectionRule):
    """`k` uniformly random scored pairs from the whole pool: the control for `top_k`."""

    name: ClassVar[str] = "random_k"
    description: ClassVar[str] = ("k random scored (prompt, completion) pairs (seeded control "
                                  "for top_k)")
    required_options: ClassVar[tuple[str, ...]] = ("k",)

    k: int | None = option(None, help="how many pairs to keep (required; at most the number "
                                      "of scored completions)")
    seed: int = option(0, help="random seed (the same seed gives the same selection)")

    def validate_options(self) -> None:
        _at_least("k", self.k)

    def choose(self, rewards: list[list[float]]) -> list[Pair]:
        cands = _candidates(rewards)
        _check_k(self, self.k, len(cands))
        chosen = random.Random(self.seed).sample(range(len(cands)), self.k)
        return [(cands[c][1], cands[c][2]) for c in chosen]


BUILTIN_RULES = (TopPerPrompt(), TopK(), Threshold(), RandomPerPrompt(), RandomK())


@hookimpl
def register_selection_rules(register):
    """Register the built-in selection rules."""
    from rlhf_plugins.group_filters import NonzeroVariance

    for rule in (*BUILTIN_RULES, NonzeroVariance()):
        register(rule)
