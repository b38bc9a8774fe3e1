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


def test_paired_bootstrap_interval_and_exclusion():
    a = [0] * 200
    b = [1] * 30 + [0] * 170
    diff, lo, hi = paired_bootstrap(a, b, resamples=4000)
    assert diff == pytest.approx(0.15)
    assert 0.09 < lo < 0.15 < hi < 0.21           # binomial sd sqrt(.15*.85/200) = 0.025
    same = compare(a, a)
    assert same["difference"] == 0 and not same["excludes_zero"]
    assert compare(a, b)["excludes_zero"]
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([1], [1, 0])
