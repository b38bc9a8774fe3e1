"""The estimator components of plugins/advantage_estimators_more.py, called directly, against
plain-Python loop references (verl's ``core_algos.py`` / paper definitions)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from test_advantage_math import (MASK, R6, RC, assert_close, broadcast, groups, mask_t, ref_gdpo,  # helpers
                                 ref_whiten, std)

from rlhf_plugins.advantage_types import Advantages
from rlhf_plugins.builtin.advantage_estimators_more import (GDPO, GPG, MORE_ESTIMATORS, OPO, GRPOPassK,
                                                            ReinforcePlusPlus, ReinforcePlusPlusBaseline,
                                                            ReMax)
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.protocols import AdvantageEstimatorProtocol as EstimatorProtocol
from rlhf_plugins.protocols import FAMILIES, member, missing_members
from rlhf_plugins.sdk import AdvantageEstimator

NAN = float("nan")


def test_names_capabilities_and_protocol():
    names = {cls.name for cls in MORE_ESTIMATORS}
    assert names == {"reinforce_plus_plus", "reinforce_plus_plus_baseline", "opo", "grpo_passk", "gpg",
                     "gdpo", "remax"}
    spec = FAMILIES["advantage_estimators"]
    for cls in MORE_ESTIMATORS:
        est = cls()
        assert isinstance(est, AdvantageEstimator) and isinstance(est, EstimatorProtocol)
        assert not missing_members(est, spec) and est.description
        assert member(est, "advantage_estimators", "needs_values") is False
        assert member(est, "advantage_estimators", "needs_reward_components") is (cls is GDPO)
        assert member(est, "advantage_estimators", "needs_greedy_baseline") is (cls is ReMax)


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, rlhf_plugins.builtin.advantage_estimators_more as m\n"
            "[cls() for cls in m.MORE_ESTIMATORS]\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_options_and_errors():
    assert GRPOPassK().configure(norm_adv_by_std=False, epsilon=0).epsilon == 0
    assert GPG().configure(f_norm="2e0").f_norm == 2.0
    with pytest.raises(ConfigError, match="grpo_passk.*epsilon"):
        GRPOPassK(epsilon=-1.0)
    with pytest.raises(ConfigError, match="gpg.*f_norm"):
        GPG().configure(f_norm=0)
    with pytest.raises(ConfigError, match="did you mean 'epsilon'"):
        GDPO().configure(epsilonn=1e-4)
    with pytest.raises(ConfigError, match="opo.*unknown option"):
        OPO().configure(eps=1.0)
    with pytest.raises(ConfigError, match="reward_components"):
        GDPO()(torch.tensor(R6), num_generations=3)
    with pytest.raises(ConfigError, match="baseline_rewards"):
        ReMax()(torch.tensor(R6))
    with pytest.raises(DataError, match="mask"):
        OPO()(torch.zeros(6, 5), num_generations=3, mask=torch.ones(6, 4))


# --- REINFORCE++ ---------------------------------------------------------------------------------

def ref_rpp(token_rewards: list[list[float]], mask: list[list[int]], gamma: float) -> list[list[float]]:
    """Returns-to-go per row (restarting after padding), whitened over the real tokens."""
    returns = []
    for row, mr in zip(token_rewards, mask):
        out, running = [0.0] * len(row), 0.0
        for t in range(len(row) - 1, -1, -1):
            running = (row[t] if mr[t] else 0.0) + gamma * running
            out[t] = running
            running = running if mr[t] else 0.0
        returns.append(out)
    return ref_whiten(returns, mask)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_outcome_rewards_sit_on_the_last_real_token(gamma):
    token = [[0.0] * 5 for _ in MASK]
    for i, mr in enumerate(MASK):
        token[i][max(t for t in range(5) if mr[t])] = R6[i]
    out = ReinforcePlusPlus()(torch.tensor(R6, dtype=torch.float64), mask=mask_t(), gamma=gamma)
    assert isinstance(out, Advantages) and out.returns is None
    assert_close(out.advantages, ref_rpp(token, MASK, gamma))


def test_reinforce_plus_plus_token_rewards_and_unscorable_rows():
    g = torch.Generator().manual_seed(1)
    token = torch.randn(6, 5, generator=g, dtype=torch.float64)
    out = ReinforcePlusPlus()(token, mask=mask_t(), gamma=0.95)
    assert_close(out.advantages, ref_rpp(token.tolist(), MASK, 0.95))
    token[2, 1] = NAN  # unscorable completion: out of the whitening, advantage 0
    mask = [row[:] if i != 2 else [0] * 5 for i, row in enumerate(MASK)]
    out = ReinforcePlusPlus()(token, mask=mask_t(), gamma=0.95)
    assert_close(out.advantages, ref_rpp(token.nan_to_num().tolist(), mask, 0.95))
    flat = ReinforcePlusPlus()(torch.tensor(R6, dtype=torch.float64))  # no mask: one token each
    assert_close(flat.advantages, [r[0] for r in ref_whiten([[r] for r in R6], [[1]] * 6)])


# --- REINFORCE++-baseline and OPO --------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_reinforce_plus_plus_baseline_matches_loop(k):
    centered = [r - sum(grp) / k for grp in groups(R6, k) for r in grp]
    est = ReinforcePlusPlusBaseline()
    assert_close(est(torch.tensor(R6, dtype=torch.float64), num_generations=k, mask=mask_t()).advantages,
                 ref_whiten(broadcast(centered, MASK), MASK))
    # [B, T] rewards: each row's sum over its real tokens is its reward
    token = torch.tensor(broadcast(R6, [[1] + [0] * 4] * 6), dtype=torch.float64)
    token[:, 1] = torch.where(mask_t()[:, 1] == 1, 0.0, 9.0)  # padding values are ignored
    assert_close(est(token, num_generations=k, mask=mask_t()).advantages,
                 ref_whiten(broadcast(centered, MASK), MASK))
    flat = est(torch.tensor(R6, dtype=torch.float64), num_generations=k)
    assert_close(flat.advantages, [r[0] for r in ref_whiten([[c] for c in centered], [[1]] * 6)])


def test_opo_matches_loop():
    lengths = [sum(r) for r in MASK]
    adv = []
    for grp, lens in zip(groups(R6, 3), groups(lengths, 3)):
        b = sum(L * r for L, r in zip(lens, grp)) / sum(lens)
        adv += [r - b for r in grp]
    assert_close(OPO()(torch.tensor(R6, dtype=torch.float64), num_generations=3, mask=mask_t()).advantages,
                 broadcast(adv, MASK))
    plain = [r - sum(grp) / 3 for grp in groups(R6, 3) for r in grp]  # equal lengths: group mean
    assert_close(OPO()(torch.tensor(R6, dtype=torch.float64), num_generations=3).advantages, plain)


# --- pass@k, GPG, GDPO, ReMax ------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_loop(norm):
    rewards = [0.2, 0.9, 0.5, 1.0, 1.0, 0.3, -2.0, 4.0, 1.5]
    adv = [0.0] * len(rewards)
    for gi, grp in enumerate(groups(rewards, 3)):
        order = sorted(range(3), key=lambda i: grp[i], reverse=True)
        gap = grp[order[0]] - grp[order[1]]
        adv[gi * 3 + order[0]] = gap / (std(grp) + 1e-6) if norm else gap
    est = GRPOPassK().configure(norm_adv_by_std=norm)
    out = est(torch.tensor(rewards, dtype=torch.float64), num_generations=3, mask=torch.ones(9, 2))
    assert_close(out.advantages, adv)  # [B] rewards give [B] advantages
    token = est(torch.tensor([[r, 0.0] for r in rewards], dtype=torch.float64), num_generations=3,
                mask=torch.tensor([[1, 1]] * 9))
    assert_close(token.advantages, [[a, a] for a in adv])
    with pytest.raises(ConfigError, match="num_generations"):
        est(torch.tensor(rewards), num_generations=1)


def test_gpg_matches_loop():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, NAN, 0.0]
    scored = [r for r in rewards if not math.isnan(r)]
    alpha = len(scored) / sum(1 for r in scored if r != 0)
    adv = []
    for grp in groups(rewards, 4):
        vals = [r for r in grp if not math.isnan(r)]
        m = sum(vals) / len(vals)
        adv += [0.0 if math.isnan(r) else alpha * (r - m) / 2.0 for r in grp]
    out = GPG(f_norm=2.0)(torch.tensor(rewards, dtype=torch.float64), num_generations=4)
    assert_close(out.advantages, adv)


@pytest.mark.parametrize("use_mask", [False, True])
def test_gdpo_matches_loop(use_mask):
    w = [1.0, 0.5, 2.0]
    rc = torch.tensor(RC, dtype=torch.float64)
    summed = torch.tensor([sum(x for x in row if not math.isnan(x)) for row in RC])
    out = GDPO()(summed, num_generations=3, mask=mask_t() if use_mask else None,
                 reward_components=rc, reward_weights=w)
    assert_close(out.advantages, ref_gdpo(RC, w, 3, MASK if use_mask else None))
    trl_eps = GDPO().configure(epsilon=1e-4)(summed, num_generations=3, reward_components=rc)
    assert_close(trl_eps.advantages, ref_gdpo(RC, [1.0] * 3, 3, None, eps=1e-4))


def test_remax_matches_definition():
    r = torch.tensor([1.0, 0.5, NAN, 2.0], dtype=torch.float64)
    b = torch.tensor([0.25, 1.0, 0.0, 2.5], dtype=torch.float64)
    assert_close(ReMax()(r, baseline_rewards=b).advantages, [0.75, -0.5, 0.0, -0.5])
    token = torch.tensor([[0.5, 0.5], [0.5, 7.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    assert_close(ReMax()(token, mask=mask, baseline_rewards=b).advantages,
                 [[0.75, 0.75], [-0.5, 0.0], [2.0, 2.0], [-0.5, -0.5]])


def test_outputs_detached_and_float64_kept():
    r = torch.tensor(R6, dtype=torch.float64, requires_grad=True)
    calls = [ReinforcePlusPlus()(r, mask=mask_t()),
             ReinforcePlusPlusBaseline()(r, num_generations=3, mask=mask_t()),
             OPO()(r, num_generations=3, mask=mask_t()), GRPOPassK()(r, num_generations=3),
             GPG()(r, num_generations=3), ReMax()(r, baseline_rewards=r.detach() * 0),
             GDPO()(r, num_generations=3, reward_components=r.detach()[:, None])]
    for out in calls:
        assert not out.advantages.requires_grad and out.advantages.dtype == torch.float64
