"""Built-in rejection-sampling selection rules (family ``selection_rules``).

Every rule implements ``select(rewards, **params) -> list[tuple[int, int]]``:

- ``rewards`` is ragged: one sequence of rewards per prompt, completions in generation order.
  ``None`` and NaN mean "unscored" and are never selected; a prompt with no scored completion
  (all NaN, or no completions at all) contributes nothing.
- The result is ``(prompt_index, completion_index)`` pairs sorted by prompt then completion,
  without duplicates, and deterministic for the same input and parameters.
- Ties are broken towards the lower completion index (and, across prompts for the global
  rules, towards the lower prompt index).

Parameters can be bound once with ``configure(**params)`` (what ``registry().selection_rules
.get(name, **params)`` does) and/or passed to ``select``; call-time values win. Unknown or
invalid parameters raise :class:`~rlhf_plugins.errors.ConfigError` naming the rule and the
parameter; malformed rewards raise :class:`~rlhf_plugins.errors.DataError`.

Pure Python: importing this module does not import torch or numpy.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from rlhf_plugins import hookimpl
from rlhf_plugins.errors import ConfigError, DataError

Pair = tuple[int, int]


def _clean_rewards(rule: str, rewards: Any) -> list[list[float]]:
    """Validate ``rewards`` and return them as floats, with NaN for unscored (None) entries."""
    if isinstance(rewards, (str, bytes, Mapping)) or not hasattr(rewards, "__iter__"):
        raise DataError(f"selection rule {rule!r}: rewards must be a list of lists of numbers "
                        f"(one list per prompt), got {type(rewards).__name__}")
    out: list[list[float]] = []
    for i, row in enumerate(rewards):
        if hasattr(row, "tolist") and not isinstance(row, (list, tuple)):
            row = row.tolist()  # numpy arrays / tensors, without importing either
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise DataError(f"selection rule {rule!r}: rewards[{i}] must be a list of numbers "
                            f"(the rewards of prompt {i}), got {type(row).__name__}")
        clean: list[float] = []
        for j, value in enumerate(row):
            if value is None:
                clean.append(math.nan)
            elif isinstance(value, numbers.Real):
                clean.append(float(value))
            else:
                raise DataError(f"selection rule {rule!r}: rewards[{i}][{j}] is not a number "
                                f"({value!r})")
        out.append(clean)
    return out


def _candidates(rewards: list[list[float]]) -> list[tuple[float, int, int]]:
    """Every scored (reward, prompt, completion) triple, in generation order."""
    return [(r, i, j) for i, row in enumerate(rewards) for j, r in enumerate(row)
            if not math.isnan(r)]


def _best_first(cands: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """Sort by reward descending; ties go to the lower prompt, then the lower completion."""
    return sorted(cands, key=lambda c: (-c[0], c[1], c[2]))


def _int_param(rule: str, key: str, value: Any, *, minimum: int = 1) -> int:
    """Check an integer parameter (bools and floats are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"selection rule {rule!r}: parameter {key!r} must be an integer, "
                          f"got {value!r}")
    if value < minimum:
        raise ConfigError(f"selection rule {rule!r}: parameter {key!r} must be >= {minimum}, "
                          f"got {value}")
    return int(value)


def _check_k(rule: str, k: int, pool: int) -> None:
    """`k` may not exceed the number of scored candidates."""
    if k > pool:
        raise ConfigError(f"selection rule {rule!r}: parameter 'k'={k} is larger than the "
                          f"{pool} scored (non-NaN) completions available")


@dataclass(frozen=True)
class _Rule:
    """Shared machinery: parameter binding, validation of names, the `select` entry point."""

    params: Mapping[str, Any] = field(default_factory=dict)

    name = "_rule"
    description = ""
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[Mapping[str, Any]] = {}

    def configure(self, **params: Any) -> "_Rule":
        """A copy with `params` bound (validated now, so bad config fails before any work)."""
        merged = {**self.params, **params}
        self._check_params(merged, partial=True)
        return type(self)(params=merged)

    def select(self, rewards: Sequence[Sequence[float]], **params: Any) -> list[Pair]:
        """Selected (prompt, completion) pairs, sorted by prompt then completion."""
        merged = {**self.params, **params}
        full = self._check_params(merged, partial=False)
        clean = _clean_rewards(self.name, rewards)
        pairs = self._select(clean, **full)
        return sorted(pairs)

    def _check_params(self, params: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
        allowed = set(self.required) | set(self.optional)
        for key in params:
            if key not in allowed:
                expected = ", ".join(sorted(allowed)) or "none"
                raise ConfigError(f"selection rule {self.name!r}: unknown parameter {key!r} "
                                  f"(expected: {expected})")
        if not partial:
            for key in self.required:
                if key not in params:
                    raise ConfigError(f"selection rule {self.name!r}: missing required "
                                      f"parameter {key!r}")
        full = {**self.optional, **params}
        return self._validate(full, partial=partial)

    def _validate(self, params: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        return params

    def _select(self, rewards: list[list[float]], **params: Any) -> list[Pair]:
        raise NotImplementedError


@dataclass(frozen=True)
class TopPerPrompt(_Rule):
    """The highest-reward completion of every prompt (ties: lower completion index)."""

    name = "top_per_prompt"
    description = "Best completion of each prompt (argmax per prompt; every scored prompt once)"

    def _select(self, rewards: list[list[float]], **params: Any) -> list[Pair]:
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            best = _best_first([(r, i, j) for j, r in enumerate(row) if not math.isnan(r)])
            if best:
                pairs.append((i, best[0][2]))
        return pairs


@dataclass(frozen=True)
class TopK(_Rule):
    """The `k` highest-reward pairs over the flattened reward matrix."""

    name = "top_k"
    description = "The k best (prompt, completion) pairs overall (a prompt may get several or none)"
    required = ("k",)

    def _validate(self, params: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        if "k" in params:
            params["k"] = _int_param(self.name, "k", params["k"])
        return params

    def _select(self, rewards: list[list[float]], *, k: int) -> list[Pair]:
        cands = _candidates(rewards)
        _check_k(self.name, k, len(cands))
        return [(i, j) for _, i, j in _best_first(cands)[:k]]


@dataclass(frozen=True)
class Threshold(_Rule):
    """Every completion with reward >= `min_reward`, optionally at most `max_per_prompt` each."""

    name = "threshold"
    description = "Every completion with reward >= min_reward (optionally capped per prompt)"
    required = ("min_reward",)
    optional = {"max_per_prompt": None}

    def _validate(self, params: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        if "min_reward" in params:
            value = params["min_reward"]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ConfigError(f"selection rule {self.name!r}: parameter 'min_reward' must be "
                                  f"a number, got {value!r}")
            params["min_reward"] = float(value)
        if params.get("max_per_prompt") is not None:
            params["max_per_prompt"] = _int_param(self.name, "max_per_prompt",
                                                  params["max_per_prompt"])
        return params

    def _select(self, rewards: list[list[float]], *, min_reward: float,
                max_per_prompt: int | None) -> list[Pair]:
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            keep = _best_first([(r, i, j) for j, r in enumerate(row)
                                if not math.isnan(r) and r >= min_reward])
            if max_per_prompt is not None:
                keep = keep[:max_per_prompt]
            pairs.extend((i, j) for _, i, j in keep)
        return pairs


@dataclass(frozen=True)
class RandomPerPrompt(_Rule):
    """One uniformly random scored completion per prompt: the control for `top_per_prompt`."""

    name = "random_per_prompt"
    description = "One random scored completion per prompt (seeded control for top_per_prompt)"
    optional = {"seed": 0}

    def _validate(self, params: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        params["seed"] = _int_param(self.name, "seed", params.get("seed", 0), minimum=-2**63)
        return params

    def _select(self, rewards: list[list[float]], *, seed: int) -> list[Pair]:
        rng = random.Random(seed)
        pairs: list[Pair] = []
        for i, row in enumerate(rewards):
            valid = [j for j, r in enumerate(row) if not math.isnan(r)]
            if valid:
                pairs.append((i, valid[rng.randrange(len(valid))]))
        return pairs


@dataclass(frozen=True)
class RandomK(_Rule):
    """`k` uniformly random scored pairs from the whole pool: the control for `top_k`."""

    name = "random_k"
    description = "k random scored (prompt, completion) pairs (seeded control for top_k)"
    required = ("k",)
    optional = {"seed": 0}

    def _validate(self, params: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        if "k" in params:
            params["k"] = _int_param(self.name, "k", params["k"])
        params["seed"] = _int_param(self.name, "seed", params.get("seed", 0), minimum=-2**63)
        return params

    def _select(self, rewards: list[list[float]], *, k: int, seed: int) -> list[Pair]:
        cands = _candidates(rewards)
        _check_k(self.name, k, len(cands))
        chosen = random.Random(seed).sample(range(len(cands)), k)
        return [(cands[c][1], cands[c][2]) for c in chosen]


BUILTIN_RULES = (TopPerPrompt(), TopK(), Threshold(), RandomPerPrompt(), RandomK())


@hookimpl
def register_selection_rules(register):
    """Register the built-in selection rules."""
    for rule in BUILTIN_RULES:
        register(rule)
