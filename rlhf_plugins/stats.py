"""Intervals for held-out accuracies: Wilson for one stage, paired bootstrap and McNemar for two.

The pipeline evaluates every stage on the same problems, so two stages are compared *paired*:
per problem, (correct after B) - (correct after A). Pure Python (no numpy/torch).
"""
from __future__ import annotations

import math
import random
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_paired(a: Sequence[bool], b: Sequence[bool]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same problems (got {len(a)} and {len(b)})")


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], *, resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference b - a, lower, upper): percentile bootstrap over problems, resampled in pairs."""
    _check_paired(a, b)
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    diffs = [int(bool(y)) - int(bool(x)) for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return sum(diffs) / n, lo, hi


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """(b-only correct, a-only correct, two-sided exact p): the binomial test on discordant pairs."""
    _check_paired(a, b)
    gained = sum(1 for x, y in zip(a, b) if y and not x)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    m = gained + lost
    if m == 0:
        return gained, lost, 1.0
    k = min(gained, lost)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return gained, lost, min(1.0, 2 * tail)


def compare(a: Sequence[bool], b: Sequence[bool], *, seed: int = 0) -> dict[str, float]:
    """Paired summary of stage b against stage a on the same problems."""
    diff, lo, hi = paired_bootstrap(a, b, seed=seed)
    gained, lost, p = mcnemar_exact(a, b)
    return {"difference": diff, "ci_low": lo, "ci_high": hi, "gained": gained, "lost": lost,
            "mcnemar_p": p, "excludes_zero": bool(lo > 0 or hi < 0)}
