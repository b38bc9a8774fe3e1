"""rlhf_plugins.advantage_math against plain-Python loop references written from verl's
``verl/trainer/ppo/core_algos.py`` definitions (and the papers), plus NaN/validation behaviour."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_plugins.advantage_math import (
    gdpo,
    gpg,
    grpo_passk,
    masked_whiten,
    opo,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    remax,
)
from rlhf_plugins.advantage_types import Advantages
from rlhf_plugins.errors import ConfigError, DataError

MASK = [[1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0]]


def mask_t() -> torch.Tensor:
    return torch.tensor(MASK)


# --- Python references ------------------------------------------------------------------------

def ref_whiten(values: list[list[float]], mask: list[list[int]]) -> list[list[float]]:
    """verl masked_whiten: unbiased variance over masked entries, rsqrt(var + 1e-8); 0 off-mask."""
    xs = [v for row, mr in zip(values, mask) for v, m in zip(row, mr) if m]
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    scale = 1 / math.sqrt(var + 1e-8)
    return [[(v - mean) * scale if m else 0.0 for v, m in zip(row, mr)] for row, mr in zip(values, mask)]


def broadcast(adv: list[float], mask: list[list[int]]) -> list[list[float]]:
    return [[a if m else 0.0 for m in mr] for a, mr in zip(adv, mask)]


def groups(xs: list, k: int) -> list[list]:
    return [xs[i:i + k] for i in range(0, len(xs), k)]


def std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def assert_close(got: torch.Tensor, expected, tol: float = 1e-9) -> None:
    exp = torch.tensor(expected, dtype=torch.float64)
    assert got.shape == exp.shape, (got.shape, exp.shape)
    assert torch.allclose(got.double(), exp, atol=tol, rtol=tol), (got, exp)


R6 = [1.0, 0.0, 0.5, 2.0, -1.0, 0.25]


# --- REINFORCE++ --------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_plus_plus_matches_loop(gamma):
    g = torch.Generator().manual_seed(0)
    mask = [row[:] for row in MASK]
    mask[1][2] = 0  # a hole: verl restarts the return there
    rewards = torch.randn(6, 5, generator=g, dtype=torch.float64)
    returns = []
    for row, mr in zip(rewards.tolist(), mask):
        out, running = [0.0] * 5, 0.0
        for t in range(4, -1, -1):
            running = (row[t] if mr[t] else 0.0) + gamma * running
            out[t] = running
            running = running if mr[t] else 0.0
        returns.append(out)
    out = reinforce_plus_plus(rewards, torch.tensor(mask), gamma=gamma)
    assert isinstance(out, Advantages) and out.returns is None
    assert_close(out.advantages, ref_whiten(returns, mask))


def test_reinforce_plus_plus_outcome_reward_hand_computed():
    # one reward on each last real token, gamma = 1: every real token carries its row's reward
    rewards = torch.zeros(2, 3)
    rewards[0, 1], rewards[1, 2] = 1.0, 3.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # values 1, 1, 3, 3, 3: mean 2.2, unbiased var = (2*1.44 + 3*0.64)/4 = 1.2
    s = 1 / math.sqrt(1.2 + 1e-8)
    assert_close(reinforce_plus_plus(rewards, mask).advantages,
                 [[-1.2 * s, -1.2 * s, 0.0], [0.8 * s, 0.8 * s, 0.8 * s]], 1e-6)


def test_reinforce_plus_plus_errors():
    with pytest.raises(DataError, match="'reinforce_plus_plus'.*NaN"):
        reinforce_plus_plus(torch.tensor([[float("nan"), 0.0]]), torch.ones(1, 2))
    with pytest.raises(ConfigError, match="gamma"):
        reinforce_plus_plus(torch.zeros(1, 2), torch.ones(1, 2), gamma=1.5)
    with pytest.raises(DataError, match="mask"):
        reinforce_plus_plus(torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(DataError, match="0/1"):
        reinforce_plus_plus(torch.zeros(1, 2), torch.tensor([[1, 2]]))
    # NaN on padding is ignored
    out = reinforce_plus_plus(torch.tensor([[1.0, float("nan")], [2.0, 0.0]]), torch.tensor([[1, 0], [1, 1]]))
    assert bool(torch.isfinite(out.advantages).all())


# --- REINFORCE++-baseline -----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_reinforce_plus_plus_baseline_matches_loop(k):
    centered = []
    for grp in groups(R6, k):
        mean = 0.0 if k == 1 else sum(grp) / k
        centered += [r - mean for r in grp]
    expected = ref_whiten(broadcast(centered, MASK), MASK)
    assert_close(reinforce_plus_plus_baseline(torch.tensor(R6, dtype=torch.float64), mask_t(), k).advantages,
                 expected)


def test_reinforce_plus_plus_baseline_nan_is_left_out():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    centered = [1.0 - 1.0, 0.0, 0.0 - 1.0, 2.0 - 1.0, -1.0 - (-0.25), 0.5 - (-0.25)]  # groups of 2
    mask = [row[:] if i != 1 else [0] * 5 for i, row in enumerate(MASK)]
    expected = ref_whiten(broadcast(centered, mask), mask)
    out = reinforce_plus_plus_baseline(r, mask_t(), 2).advantages
    assert_close(out, expected)
    assert float(out[1].abs().sum()) == 0.0


# --- OPO -------------------------------------------------------------------------------------------

def test_opo_matches_loop():
    lengths = [sum(r) for r in MASK]  # 3 5 2 4 1 3
    adv = []
    for grp, lens in zip(groups(R6, 3), groups(lengths, 3)):
        b = sum(L * r for L, r in zip(lens, grp)) / sum(lens)
        adv += [r - b for r in grp]
    assert_close(opo(torch.tensor(R6, dtype=torch.float64), mask_t(), 3).advantages, broadcast(adv, MASK))


def test_opo_hand_computed_and_group_of_one():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # b = (3*1 + 1*0) / 4 = 0.75
    assert_close(opo(torch.tensor([1.0, 0.0]), mask, 2).advantages,
                 [[0.25, 0.25, 0.25, 0.0], [-0.75, 0, 0, 0]], 1e-7)
    assert_close(opo(torch.tensor([1.0, 0.0]), mask, 1).advantages, [[1, 1, 1, 0], [0, 0, 0, 0]], 1e-7)
    empty = opo(torch.tensor([1.0, 2.0]), torch.zeros(2, 3), 2).advantages
    assert float(empty.abs().sum()) == 0.0


# --- pass@k ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_loop(norm):
    rewards = [0.2, 0.9, 0.5, 1.0, 1.0, 0.3, -2.0, 4.0, 1.5]
    adv = [0.0] * len(rewards)
    for gi, grp in enumerate(groups(rewards, 3)):
        order = sorted(range(3), key=lambda i: grp[i], reverse=True)
        gap = grp[order[0]] - grp[order[1]]
        if norm:
            gap = gap / (std(grp) + 1e-6)
        if gap != 0:
            adv[gi * 3 + order[0]] = gap
    out = grpo_passk(torch.tensor(rewards, dtype=torch.float64), 3, norm_adv_by_std=norm)
    assert_close(out.advantages, adv)
    # the tie group (1.0, 1.0, 0.3) gives nobody an advantage
    assert float(out.advantages[3:6].abs().sum()) == 0.0


def test_grpo_passk_mask_nan_and_errors():
    r = torch.tensor([1.0, float("nan"), 0.0, 3.0])
    out = grpo_passk(r, 2, mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]), norm_adv_by_std=False)
    assert_close(out.advantages, [[0, 0], [0, 0], [0, 0], [3, 3]], 1e-7)  # group 0 has one scorable
    with pytest.raises(ConfigError, match="'grpo_passk'.*num_generations"):
        grpo_passk(torch.zeros(4), 1)
    with pytest.raises(DataError, match="divisible"):
        grpo_passk(torch.zeros(5), 2)


# --- GPG -------------------------------------------------------------------------------------------

def test_gpg_matches_loop():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    alpha = len(rewards) / sum(1 for r in rewards if r != 0)  # 8 / 2 = 4
    adv = []
    for grp in groups(rewards, 4):
        m = sum(grp) / 4
        adv += [alpha * (r - m) / 2.0 for r in grp]
    out = gpg(torch.tensor(rewards, dtype=torch.float64), 4, f_norm=2.0)
    assert_close(out.advantages, adv)
    assert_close(gpg(torch.tensor(rewards), 4, mask=torch.ones(8, 2)).advantages,
                 [[a, a] for a in [alpha * (r - m) for grp in groups(rewards, 4)
                                   for m in [sum(grp) / 4] for r in grp]], 1e-6)
    zeros = gpg(torch.zeros(4), 2).advantages  # alpha = 4 / max(0, 1), all centred to 0
    assert float(zeros.abs().sum()) == 0.0


# --- GDPO ------------------------------------------------------------------------------------------

def ref_gdpo(rc: list[list[float]], w: list[float], k: int, mask=None, eps: float = 1e-6):
    B, F = len(rc), len(rc[0])
    normed = [[math.nan] * F for _ in range(B)]
    for f in range(F):
        for g0 in range(0, B, k):
            vals = [(i, rc[i][f]) for i in range(g0, g0 + k) if not math.isnan(rc[i][f])]
            xs = [v for _, v in vals]
            for i, v in vals:
                if k == 1:
                    normed[i][f] = v
                elif max(xs) == min(xs):
                    normed[i][f] = 0.0
                else:
                    normed[i][f] = (v - sum(xs) / len(xs)) / (std(xs) + eps)
    summed = [sum(w[f] * x for f, x in enumerate(row) if not math.isnan(x)) for row in normed]
    scorable = [not all(math.isnan(x) for x in row) for row in rc]
    if mask is None:
        keep = [[1] if s else [0] for s in scorable]
        return [r[0] for r in ref_whiten([[v] for v in summed], keep)]
    tok_mask = [[m if s else 0 for m in mr] for mr, s in zip(mask, scorable)]
    return ref_whiten(broadcast(summed, mask), tok_mask)


NAN = float("nan")
RC = [[1.0, 0.0, 10.0], [0.0, 1.0, 30.0], [1.0, NAN, 20.0],
      [0.0, 0.0, 5.0], [0.0, 1.0, NAN], [0.0, 1.0, 7.0]]


@pytest.mark.parametrize("use_mask", [False, True])
def test_gdpo_matches_loop(use_mask):
    w = [1.0, 0.5, 2.0]
    mask = MASK if use_mask else None
    out = gdpo(torch.tensor(RC, dtype=torch.float64), w, 3, mask=None if mask is None else mask_t())
    assert_close(out.advantages, ref_gdpo(RC, w, 3, mask))


def test_gdpo_unscorable_rows_group_of_one_and_errors():
    rc = [row[:] for row in RC]
    rc[5] = [NAN, NAN, NAN]
    out = gdpo(torch.tensor(rc, dtype=torch.float64), None, 3)
    assert_close(out.advantages, ref_gdpo(rc, [1.0, 1.0, 1.0], 3))
    assert float(out.advantages[5]) == 0.0
    assert_close(gdpo(torch.tensor(RC, dtype=torch.float64), None, 1).advantages, ref_gdpo(RC, [1.0] * 3, 1))
    with pytest.raises(ConfigError, match="'gdpo'.*reward_weights"):
        gdpo(torch.tensor(RC), [1.0, 2.0], 3)
    with pytest.raises(DataError, match="'gdpo'.*reward_components"):
        gdpo(torch.tensor(R6), None, 3)
    with pytest.raises(DataError, match="inf"):
        gdpo(torch.tensor([[1.0, float("inf")], [0.0, 0.0]]), None, 2)


# --- ReMax -----------------------------------------------------------------------------------------

def test_remax():
    r = torch.tensor([1.0, 0.5, NAN])
    b = torch.tensor([0.25, 1.0, 0.0])
    assert_close(remax(r, b).advantages, [0.75, -0.5, 0.0], 1e-7)
    assert_close(remax(r, b, torch.tensor([[1, 0], [1, 1], [1, 1]])).advantages,
                 [[0.75, 0.0], [-0.5, -0.5], [0.0, 0.0]], 1e-7)
    with pytest.raises(DataError, match="'remax'.*baseline_rewards"):
        remax(r, b[:2])


# --- shared helpers and conventions ----------------------------------------------------------------

def test_masked_whiten_small_batches_do_not_blow_up():
    one = masked_whiten(torch.tensor([[3.0, 7.0]]), torch.tensor([[True, False]]))
    assert float(one.abs().sum()) == 0.0
    none = masked_whiten(torch.tensor([[3.0]]), torch.tensor([[False]]))
    assert float(none.abs().sum()) == 0.0


def test_outputs_are_detached_and_keep_float64():
    r = torch.tensor(R6, dtype=torch.float64, requires_grad=True)
    for out in (opo(r, mask_t(), 3), gpg(r, 3), grpo_passk(r, 3), remax(r, r.detach() * 0),
                reinforce_plus_plus_baseline(r, mask_t(), 3)):
        assert not out.advantages.requires_grad and out.advantages.dtype == torch.float64
    assert opo(torch.tensor(R6, dtype=torch.float16), mask_t(), 3).advantages.dtype == torch.float32


@pytest.mark.parametrize("fn", [
    lambda r, k: reinforce_plus_plus_baseline(r, mask_t(), k), lambda r, k: opo(r, mask_t(), k),
    lambda r, k: gpg(r, k), lambda r, k: grpo_passk(r, k)])
def test_group_and_reward_validation(fn):
    with pytest.raises(ConfigError, match="num_generations"):
        fn(torch.tensor(R6), 0)
    with pytest.raises(DataError, match="divisible"):
        fn(torch.tensor(R6), 4)
    with pytest.raises(DataError, match="inf"):
        fn(torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0, 0.0]), 2)
    with pytest.raises(DataError, match="rewards"):
        fn(torch.zeros(6, 2), 2)
