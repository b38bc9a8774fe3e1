"""Accuracy intervals against hand-computed values and brute-force references."""
from __future__ import annotations

import itertools
import math

import pytest

from rlhf_plugins.stats import compare, mcnemar_exact, paired_bootstrap, wilson_interval


def test_wilson_matches_the_textbook_formula():
    # 8 of 40 at z = 1.96: hand computation of (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    lo, hi = wilson_interval(8, 40, z=1.96)
    p, n, z = 0.2, 40, 1.96
    centre = (p + z * z / 80) / (1 + z * z / 40)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / 40)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert lo == pytest.approx(0.1050, abs=5e-4) and hi == pytest.approx(0.3476, abs=5e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_mcnemar_equals_brute_force_binomial():
    a = [1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    b = [1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1]
    gained, lost, p = mcnemar_exact(a, b)
    assert (gained, lost) == (6, 1)
    # brute force: every assignment of the 7 discordant pairs, P(outcome as or more extreme)
    m = 7
    probs = [sum(1 for bits in itertools.product([0, 1], repeat=m) if sum(bits) == k) / 2 ** m
             for k in range(m + 1)]
    assert p == pytest.approx(min(1.0, 2 * sum(probs[:2])))   # 2 * P(X <= 1) = 0.125
    assert p == pytest.approx(0.125)
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)


def _exact_bootstrap_percentiles(diffs: list[int], level: float) -> tuple[float, float]:
    """The percentile interval of the *exact* bootstrap distribution of mean(diffs).

    A resample is n independent draws from the n paired differences (each in -1, 0, 1), so its
    sum has the distribution of n draws with those frequencies: computed by convolution, not
    sampled. Quantile: the smallest mean whose cumulative probability reaches the tail.
    """
    n = len(diffs)
    probs = {v: diffs.count(v) / n for v in (-1, 0, 1)}
    dist = {0: 1.0}
    for _ in range(n):
        nxt: dict[int, float] = {}
        for total, p in dist.items():
            for v, q in probs.items():
                if q:
                    nxt[total + v] = nxt.get(total + v, 0.0) + p * q
        dist = nxt

    def quantile(a: float) -> float:
        running = 0.0
        for total in sorted(dist):
            running += dist[total]
            if running >= a - 1e-12:
                return total / n
        return max(dist) / n

    tail = (1 - level) / 2
    return quantile(tail), quantile(1 - tail)


def test_paired_bootstrap_interval_has_the_asked_coverage():
    """The interval is the 2.5% / 97.5% percentiles of the bootstrap distribution (computed
    exactly here), within one problem (1/n) of Monte Carlo error: a 90% or 99% interval, or one
    off by two problems, fails."""
    n = 200
    a = [1] * 10 + [0] * 190                      # 10 problems only A solved,
    b = [0] * 10 + [1] * 30 + [0] * 160           # 30 only B: diff +0.10, -1/0/+1 per problem
    diffs = [y - x for x, y in zip(a, b)]
    step = 1 / n
    exact = {level: _exact_bootstrap_percentiles(diffs, level) for level in (0.90, 0.95, 0.99)}
    # the check has the power it claims: neighbouring levels differ by more than the tolerance
    for other in (0.90, 0.99):
        assert max(abs(exact[other][0] - exact[0.95][0]), abs(exact[other][1] - exact[0.95][1])) > 1.5 * step
    for level, (lo_ref, hi_ref) in exact.items():
        diff, lo, hi = paired_bootstrap(a, b, resamples=4000, level=level)
        assert diff == pytest.approx(0.10)
        assert lo == pytest.approx(lo_ref, abs=step + 1e-9) and hi == pytest.approx(hi_ref, abs=step + 1e-9), \
            (level, (lo, hi), (lo_ref, hi_ref))
    # the default level is 95%
    assert paired_bootstrap(a, b, resamples=4000)[1:] == paired_bootstrap(a, b, resamples=4000, level=0.95)[1:]


def test_paired_bootstrap_interval_and_exclusion():
    a = [0] * 200
    b = [1] * 30 + [0] * 170
    diff, lo, hi = paired_bootstrap(a, b, resamples=4000)
    assert diff == pytest.approx(0.15)
    # exact percentiles of Binomial(200, 0.15) / 200 (the bootstrap distribution): 0.100, 0.200
    assert lo == pytest.approx(0.100, abs=0.005 + 1e-9) and hi == pytest.approx(0.200, abs=0.005 + 1e-9)
    same = compare(a, a)
    assert same["difference"] == 0 and not same["excludes_zero"]
    assert compare(a, b)["excludes_zero"]
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([1], [1, 0])
