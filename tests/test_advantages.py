"""Built-in advantage estimators against loop-based references (textbook recursions)."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_plugins
from rlhf_plugins.advantage_types import Advantages
from rlhf_plugins.errors import ConfigError, DataError

SEQUENCE_LEVEL = ("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline")


def est(name, **options):
    return rlhf_plugins.registry().advantage_estimators.get(name, **options)


# --- loop-based references (plain Python floats) -------------------------------------------

def ref_gae_row(rewards, values, mask, gamma, lam):
    """Textbook reverse recursion over the real tokens of one row; rewards: scalar or per token."""
    real = [t for t, m in enumerate(mask) if m]
    token_r = [0.0] * len(mask)
    if isinstance(rewards, float):
        if real:
            token_r[real[-1]] = rewards
    else:
        token_r = list(rewards)
    adv = [0.0] * len(mask)
    last_gae = 0.0
    for j in reversed(range(len(real))):
        t = real[j]
        next_value = values[real[j + 1]] if j + 1 < len(real) else 0.0
        delta = token_r[t] + gamma * next_value - values[t]
        last_gae = delta + gamma * lam * last_gae
        adv[t] = last_gae
    returns = [adv[t] + values[t] if mask[t] else 0.0 for t in range(len(mask))]
    return adv, returns


def ref_gae(rewards, values, mask, gamma, lam):
    advs, rets = [], []
    for b in range(values.shape[0]):
        r = float(rewards[b]) if rewards.dim() == 1 else rewards[b].tolist()
        a, ret = ref_gae_row(r, values[b].tolist(), mask[b].tolist(), gamma, lam)
        advs.append(a)
        rets.append(ret)
    return torch.tensor(advs, dtype=torch.float64), torch.tensor(rets, dtype=torch.float64)


def ref_sequence(name, rewards, k, eps=1e-4):
    """Per-group loops; NaN rewards are unscorable (left out of baselines, advantage 0)."""
    rewards = [float(x) for x in rewards]
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        scorable = [r for r in group if not math.isnan(r)]
        for i, r in enumerate(group):
            if math.isnan(r):
                out.append(0.0)
                continue
            mean = sum(scorable) / len(scorable)
            if name == "grpo":
                if max(scorable) == min(scorable):
                    out.append(0.0)
                else:
                    out.append((r - mean) / (statistics.stdev(scorable) + eps))
            elif name == "dr_grpo":
                out.append(r - mean)
            elif name == "rloo":
                others = [x for j, x in enumerate(group) if j != i and not math.isnan(x)]
                out.append(r - sum(others) / len(others) if others else 0.0)
            elif name == "reinforce":
                out.append(r)
            elif name == "reinforce_baseline":
                everything = [x for x in rewards if not math.isnan(x)]
                out.append(r - sum(everything) / len(everything))
    return torch.tensor(out, dtype=torch.float64)


def ragged_mask(g, batch, length, kind):
    """Masks with different lengths: right padding, left padding, or random holes; some empty."""
    if kind == "holes":
        mask = torch.rand(batch, length, generator=g) < 0.6
    else:
        lengths = torch.randint(0, length + 1, (batch,), generator=g)
        lengths[0] = length
        positions = torch.arange(length)
        mask = positions[None, :] < lengths[:, None]
        if kind == "left":
            mask = mask.flip(1)
    return mask


# --- the course notes' worked example --------------------------------------------------------

def test_gae_course_notes_worked_example():
    """Reward 0.73 at <eos>, gamma = lam = 1: advantage = 0.73 - V_t (table of the notes)."""
    gae = est("gae")
    values = torch.tensor([[0.45, 0.55, 0.62, 0.68, 0.73]])  # "The", "answer", "is", "5", <eos>
    out = gae(torch.tensor([0.73]), values=values, gamma=1.0, lam=1.0)
    assert torch.allclose(out.advantages, torch.tensor([[0.28, 0.18, 0.11, 0.05, 0.0]]), atol=1e-6)
    assert torch.allclose(out.returns, torch.full((1, 5), 0.73), atol=1e-6)  # target V = 0.73
    # the notes' six value predictions (0.45 -> ... -> 0.73), right-padded in a batch of two
    values6 = torch.tensor([[0.45, 0.55, 0.62, 0.68, 0.71, 0.73, 5.0],
                            [0.45, 0.55, 0.62, 0.68, 0.73, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    out = gae(torch.tensor([0.73, 0.73]), values=values6, mask=mask, gamma=1.0, lam=1.0)
    assert torch.allclose(out.advantages, torch.tensor(
        [[0.28, 0.18, 0.11, 0.05, 0.02, 0.0, 0.0], [0.28, 0.18, 0.11, 0.05, 0.0, 0.0, 0.0]]), atol=1e-6)


# --- GAE vs the textbook recursion -------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), length=st.integers(1, 40),
       gamma=st.sampled_from([1.0, 0.99, 0.9, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.5, 0.0]),
       kind=st.sampled_from(["right", "left", "holes"]), token_rewards=st.booleans(),
       chunk=st.sampled_from([1, 3, 64]))
def test_gae_matches_textbook_recursion(seed, batch, length, gamma, lam, kind, token_rewards, chunk):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(g, batch, length, kind)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    shape = (batch, length) if token_rewards else (batch,)
    rewards = torch.randn(*shape, generator=g, dtype=torch.float64)
    out = est("gae", chunk=chunk)(rewards, mask=mask, values=values, gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(rewards * mask if token_rewards else rewards, values, mask, gamma, lam)
    assert out.advantages.shape == (batch, length) and out.advantages.dtype == torch.float64
    assert torch.allclose(out.advantages, ref_adv, atol=1e-9, rtol=1e-9)
    assert torch.allclose(out.returns, ref_ret, atol=1e-9, rtol=1e-9)


def test_gae_float32_long_sequences_match_reference():
    g = torch.Generator().manual_seed(7)
    mask = ragged_mask(g, 4, 300, "right")
    values = torch.randn(4, 300, generator=g)
    rewards = torch.randn(4, generator=g)
    out = est("gae")(rewards, mask=mask, values=values, gamma=1.0, lam=0.95)
    ref_adv, _ = ref_gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    assert out.advantages.dtype == torch.float32
    assert torch.allclose(out.advantages.double(), ref_adv, atol=1e-4)


def test_gae_padding_does_not_leak():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask(g, 5, 12, "holes")
    values = torch.randn(5, 12, generator=g)
    rewards = torch.randn(5, 12, generator=g)
    base = est("gae")(rewards, mask=mask, values=values, gamma=0.9, lam=0.8)
    noise_v = torch.where(mask, values, torch.full_like(values, 1e6))
    noise_r = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))
    noisy = est("gae")(noise_r, mask=mask, values=noise_v, gamma=0.9, lam=0.8)
    assert torch.equal(base.advantages, noisy.advantages)
    assert torch.equal(base.returns, noisy.returns)
    assert (base.advantages[~mask] == 0).all() and (base.returns[~mask] == 0).all()


def test_gae_scalar_reward_goes_on_last_real_token():
    values = torch.zeros(2, 5)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = est("gae")(torch.tensor([2.0, 3.0]), mask=mask, values=values, gamma=1.0, lam=0.0)
    # lam = 0: A_t = r_t + V_{t+1} - V_t = the reward only where it was placed
    assert torch.equal(out.advantages, torch.tensor([[0, 0, 2.0, 0, 0], [0, 0, 0, 0, 3.0]]))


def test_gae_empty_row_and_unscorable_row():
    values = torch.full((3, 4), 0.5)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    out = est("gae")(torch.tensor([1.0, float("nan"), 1.0]), mask=mask, values=values)
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[:2] == 0).all()  # no tokens / unscorable: no signal
    assert torch.equal(out.returns[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # returns = values
    ref_adv, _ = ref_gae_row(1.0, [0.5] * 4, [1, 1, 1, 0], 1.0, 0.95)
    assert torch.allclose(out.advantages[2], torch.tensor(ref_adv)) and out.advantages[2, 2] == 0.5


def test_gae_accepts_bf16_values_and_int_mask():
    values = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16)
    out = est("gae")(torch.tensor([1.0]), mask=torch.tensor([[1, 1]]), values=values, lam=1.0)
    assert out.advantages.dtype == torch.float32
    assert torch.allclose(out.advantages, torch.tensor([[0.5, 0.75]]))


# --- sequence-level estimators vs per-group loops --------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 6), k=st.integers(2, 6),
       name=st.sampled_from(SEQUENCE_LEVEL), ties=st.booleans(), nans=st.booleans())
def test_sequence_estimators_match_loop_reference(seed, groups, k, name, ties, nans):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * k, generator=g, dtype=torch.float64)
    if ties:  # binary verifiable rewards: many zero-std groups
        rewards = (rewards > 0.3).to(torch.float64)
    if nans:
        rewards[torch.rand(groups * k, generator=g) < 0.2] = float("nan")
        rewards[0] = 1.0  # keep at least one scorable reward in the batch
    out = est(name)(rewards, num_generations=k)
    assert isinstance(out, Advantages) and out.returns is None
    assert out.advantages.shape == (groups * k,)
    assert not torch.isnan(out.advantages).any()
    assert torch.allclose(out.advantages, ref_sequence(name, rewards, k), atol=1e-9, rtol=1e-9)


def test_rloo_closed_form():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    expected = 4 / 3 * (grouped - grouped.mean(1, keepdim=True))
    assert torch.allclose(est("rloo")(rewards, num_generations=4).advantages, expected.view(-1))


def test_grpo_zero_std_groups_are_zero_not_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.0, 1.0, 0.5])
    adv = est("grpo")(rewards, num_generations=3).advantages
    assert torch.equal(adv[:6], torch.zeros(6))
    assert not torch.isnan(adv).any()
    assert torch.equal(est("grpo", eps=0.0)(rewards[:6], num_generations=3).advantages, torch.zeros(6))
    assert torch.equal(est("grpo")(torch.tensor([0.3, 2.0]), num_generations=1).advantages,
                       torch.zeros(2))


def test_grpo_matches_trl_formula():
    """Same numbers as TRL GRPOTrainer's scale_rewards='group' / 'batch' code (its nanstd, eps)."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(5)
    k = 4
    rewards = torch.randn(16, generator=g)
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
    std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k)
    trl_group = (rewards - mean) / (std + 1e-4)
    assert torch.allclose(est("grpo")(rewards, num_generations=k).advantages, trl_group, atol=1e-6)
    trl_batch = (rewards - mean) / (nanstd(rewards) + 1e-4)
    assert torch.allclose(est("grpo", scale="batch")(rewards, num_generations=k).advantages,
                          trl_batch, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_LEVEL)
def test_sequence_estimators_with_token_rewards(name):
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask(g, 8, 6, "right")
    mask[:, 0] = True
    token_rewards = torch.randn(8, 6, generator=g, dtype=torch.float64)
    token_rewards[~mask] = float("nan")  # padding is never read
    out = est(name)(token_rewards, num_generations=4, mask=mask)
    sequence = torch.where(mask, token_rewards, 0.0).sum(1)
    expected = ref_sequence(name, sequence, 4)[:, None] * mask
    assert out.advantages.shape == (8, 6)
    assert torch.allclose(out.advantages, expected, atol=1e-9)


# --- errors ---------------------------------------------------------------------------------

def test_errors():
    r = torch.zeros(6)
    with pytest.raises(DataError, match="not divisible by num_generations=4"):
        est("grpo")(r, num_generations=4)
    with pytest.raises(ConfigError, match="num_generations must be an int >= 1"):
        est("dr_grpo")(r, num_generations=0)
    with pytest.raises(ConfigError, match="needs num_generations >= 2"):
        est("rloo")(r, num_generations=1)
    with pytest.raises(ConfigError, match="needs values"):
        est("gae")(r)
    with pytest.raises(DataError, match="values must be"):
        est("gae")(r, values=torch.zeros(5, 3))
    with pytest.raises(DataError, match="must have the same shape"):
        est("gae")(torch.zeros(6, 2), values=torch.zeros(6, 3))
    with pytest.raises(DataError, match="must have the same shape"):
        est("gae")(r, values=torch.zeros(6, 3), mask=torch.ones(6, 4))
    with pytest.raises(DataError, match="must have the same shape"):
        est("grpo")(torch.zeros(6, 2), num_generations=2, mask=torch.ones(6, 3))
    with pytest.raises(DataError, match="mask must be"):
        est("grpo")(r, mask=torch.ones(5, 3))
    with pytest.raises(DataError, match="0/1"):
        est("reinforce")(r, mask=torch.full((6, 3), 2))
    with pytest.raises(DataError, match=r"\[B\] or \[B, T\]"):
        est("reinforce")(torch.zeros(2, 2, 2))
    with pytest.raises(DataError, match="inf"):
        est("grpo")(torch.tensor([1.0, float("inf")]), num_generations=2)
    with pytest.raises(DataError, match="NaN/inf at real tokens"):
        est("gae")(torch.zeros(1), values=torch.tensor([[float("nan")]]))
    with pytest.raises(ConfigError, match="lam must be in"):
        est("gae")(r, values=torch.zeros(6, 3), lam=1.5)
    with pytest.raises(ConfigError, match="unknown option"):
        est("grpo", epsilon=0.1)
    with pytest.raises(ConfigError, match="scale must be"):
        est("grpo", scale="none")
    with pytest.raises(ConfigError, match="chunk must be"):
        est("gae", chunk=0)
    with pytest.raises(ConfigError, match="unknown option"):
        est("rloo", eps=0.1)


# --- registry -------------------------------------------------------------------------------

def test_registry_lookup_and_needs_values():
    family = rlhf_plugins.registry().advantage_estimators
    assert set(family.names()) >= {"gae", *SEQUENCE_LEVEL}
    assert family.get("gae").needs_values is True
    for name in SEQUENCE_LEVEL:
        assert family.get(name).needs_values is False
        assert family.description(name)
    assert family.provenance("gae").plugin == "rlhf_plugins.builtin.advantages"
    configured = family.get("grpo", eps=0.5)
    assert configured.eps == 0.5 and family.get("grpo").eps == 1e-4


def test_plugin_module_import_is_torch_free():
    code = ("import sys, rlhf_plugins; import rlhf_plugins.builtin.advantages; "
            "rlhf_plugins.registry().advantage_estimators.get('gae'); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
