"""rlhf_plugins.policy_objectives against plain-Python loop references (from the verl / paper
definitions), hand-computed aggregations, gradients at ratio 1, and TRL 1.16's exact tensor
expressions from ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py)."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.policy_objectives import (
    AGG_MODES,
    POLICY_LOSSES,
    TRL_LOSS_TYPE_AGG,
    PolicyLoss,
    aggregate,
    cispo,
    clip_cov,
    geo_mean,
    gpg,
    gspo,
    kl_cov,
    policy_gradient,
    ppo_clip,
    sapo,
)

# --- fixtures and the Python reference ------------------------------------------------------

MASK = [[1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0]]  # left padding and a short row
SEQ_ADV = [1.3, -0.7, 0.4, -1.9]


def batch(seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 0.35):
    """(log_probs, old_log_probs, seq advantages [B], token advantages [B, T], mask [B, T])."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(MASK, dtype=torch.int32)
    old = -torch.rand(mask.shape, generator=g, dtype=dtype) * 3 - 0.05
    lp = old + spread * torch.randn(mask.shape, generator=g, dtype=dtype)
    tok_adv = torch.randn(mask.shape, generator=g, dtype=dtype)
    return lp, old, torch.tensor(SEQ_ADV, dtype=dtype), tok_adv, mask


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.detach()]


def adv_rows(adv: torch.Tensor, T: int) -> list[list[float]]:
    return [[float(a)] * T for a in adv] if adv.dim() == 1 else rows(adv)


def ref_aggregate(mat: list[list[float]], mask: list[list[int]], mode: str,
                  const: float | None = None) -> float:
    sums = [sum(x for x, m in zip(r, mr) if m) for r, mr in zip(mat, mask)]
    lens = [sum(mr) for mr in mask]
    B = len(mat)
    if mode == "token_mean":
        return sum(sums) / (const if const is not None else max(sum(lens), 1))
    if mode == "seq_mean_token_mean":
        return sum(s / max(n, 1) for s, n in zip(sums, lens)) / B
    if mode == "seq_mean_token_sum":
        return sum(sums) / B
    return sum(s / (const if const is not None else len(mat[0])) for s in sums) / B


def per_token(fn, lp, old, adv, mask) -> list[list[float]]:
    """Apply a scalar per-token function f(logp, old, A) over the rows (0 on padding)."""
    A = adv_rows(adv, lp.shape[1])
    return [[fn(a, b, c) if m else 0.0 for a, b, c, m in zip(ra, rb, rc, rm)]
            for ra, rb, rc, rm in zip(rows(lp), rows(old), A, mask.tolist())]


def close(x: torch.Tensor | float, y: float, tol: float = 1e-10) -> bool:
    x = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    return abs(x - y) <= tol * max(1.0, abs(y))


# --- aggregate ------------------------------------------------------------------------------

def test_aggregate_hand_computed():
    mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # last row has no real token
    # real sums: row0 = 3 (len 2), row1 = 4 (len 1), row2 = 0 (len 0); N = 3, B = 3, T = 3
    assert close(aggregate(mat, mask, "token_mean"), 7 / 3, 1e-7)
    assert close(aggregate(mat, mask, "seq_mean_token_mean"), (1.5 + 4.0 + 0.0) / 3, 1e-7)
    assert close(aggregate(mat, mask, "seq_mean_token_sum"), 7 / 3, 1e-7)
    assert close(aggregate(mat, mask, "seq_mean_token_sum_norm"), 7 / (3 * 3), 1e-7)
    assert close(aggregate(mat, mask, "seq_mean_token_sum_norm", norm_constant=7), 7 / 21, 1e-7)
    assert close(aggregate(mat, mask, "token_mean", norm_constant=14), 0.5, 1e-7)
    assert close(aggregate(mat, mask, "token_mean", norm_constant=torch.tensor(14.0)), 0.5, 1e-7)
    assert float(aggregate(mat, torch.zeros_like(mask), "token_mean")) == 0.0
    nan_pad = mat.clone()
    nan_pad[2] = float("nan")
    assert close(aggregate(nan_pad, mask, "token_mean"), 7 / 3, 1e-7)  # padding never leaks


def test_aggregate_matches_reference_on_random():
    lp, _, _, _, mask = batch(3)
    for mode in AGG_MODES:
        assert close(aggregate(lp, mask, mode), ref_aggregate(rows(lp), mask.tolist(), mode))


def test_aggregate_errors():
    mat, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ConfigError, match="unknown agg mode"):
        aggregate(mat, mask, "seq-mean-token-mean")
    with pytest.raises(ConfigError, match="norm_constant only applies"):
        aggregate(mat, mask, "seq_mean_token_mean", norm_constant=3)
    with pytest.raises(ConfigError, match="norm_constant must be"):
        aggregate(mat, mask, "token_mean", norm_constant=0)
    with pytest.raises(DataError, match="0/1"):
        aggregate(mat, torch.full((2, 3), 0.5), "token_mean")
    with pytest.raises(DataError, match="same shape"):
        aggregate(mat, torch.ones(2, 4), "token_mean")


# --- each objective against its loop reference ------------------------------------------------

def ppo_ref(lo: float, hi: float, dual: float | None = None):
    def f(lp: float, old: float, a: float) -> float:
        r = math.exp(lp - old)
        loss = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
        if dual is not None and a < 0:
            loss = min(loss, -dual * a)
        return loss
    return f


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("token_adv", [False, True])
def test_ppo_clip_matches_reference(mode, token_adv):
    lp, old, adv, tok, mask = batch(1)
    a = tok if token_adv else adv
    out = ppo_clip(lp, old, a, mask, agg=mode, clip_low=0.2, clip_high=0.28)
    assert isinstance(out, PolicyLoss)
    expected = ref_aggregate(per_token(ppo_ref(0.2, 0.28), lp, old, a, mask), mask.tolist(), mode)
    assert close(out.loss, expected)
    # clip fractions: token-weighted over real tokens
    A = adv_rows(a, lp.shape[1])
    low = high = n = 0
    for ra, rb, rc, rm in zip(rows(lp), rows(old), A, mask.tolist()):
        for x, y, c, m in zip(ra, rb, rc, rm):
            if m:
                r = math.exp(x - y)
                n += 1
                low += r < 0.8 and c < 0
                high += r > 1.28 and c > 0
    assert close(out.metrics["clip_frac_low"], low / n, 1e-6)
    assert close(out.metrics["clip_frac_high"], high / n, 1e-6)
    assert close(out.metrics["clip_frac"], (low + high) / n, 1e-6)
    assert low + high > 0  # the fixture exercises the clip


def test_ppo_clip_dual_clip_matches_reference():
    lp, old, adv, tok, mask = batch(2, spread=1.5)
    out = ppo_clip(lp, old, tok, mask, dual_clip=1.5)
    assert close(out.loss, ref_aggregate(per_token(ppo_ref(0.2, 0.2, 1.5), lp, old, tok, mask),
                                         mask.tolist(), "token_mean"))
    assert out.metrics["dual_clip_frac"] > 0
    with pytest.raises(ConfigError, match="dual_clip"):
        ppo_clip(lp, old, tok, mask, dual_clip=1.0)


def test_ppo_clip_delta_and_kl():
    lp, old, adv, _, mask = batch(4, spread=0.8)
    ref = old - 0.1
    def f(x, y, a):
        r = math.exp(x - y)
        return -min(min(r, 1.5) * a, min(max(r, 0.8), 1.2) * a)
    out = ppo_clip(lp, old, adv, mask, delta=1.5, kl_coef=0.04, ref_log_probs=ref)
    kl = per_token(lambda x, y, a: 0.0, lp, old, adv, mask)
    base = per_token(f, lp, old, adv, mask)
    for i, (rl, rr) in enumerate(zip(rows(lp), rows(ref))):
        for t, (x, z) in enumerate(zip(rl, rr)):
            if MASK[i][t]:
                kl[i][t] = math.exp(z - x) - (z - x) - 1
    total = [[b + 0.04 * k for b, k in zip(rb, rk)] for rb, rk in zip(base, kl)]
    assert close(out.loss, ref_aggregate(total, MASK, "token_mean"))
    assert close(out.metrics["kl"], ref_aggregate(kl, MASK, "token_mean"), 1e-8)
    with pytest.raises(DataError, match="'ppo_clip'.*ref_log_probs"):
        ppo_clip(lp, old, adv, mask, kl_coef=0.1)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gspo_matches_reference(mode):
    lp, old, adv, tok, mask = batch(5, spread=0.02)
    lo, hi = 3e-3, 4e-3
    mat = []
    for rl, ro, ra, rm in zip(rows(lp), rows(old), adv_rows(tok, lp.shape[1]), MASK):
        n = sum(rm)
        s = math.exp(sum(x - y for x, y, m in zip(rl, ro, rm) if m) / max(n, 1))
        mat.append([-min(s * a, min(max(s, 1 - lo), 1 + hi) * a) if m else 0.0 for a, m in zip(ra, rm)])
    out = gspo(lp, old, tok, mask, agg=mode, clip_low=lo, clip_high=hi)
    assert close(out.loss, ref_aggregate(mat, MASK, mode))
    assert out.metrics["clip_frac"] > 0


def test_cispo_matches_reference_and_gradient_is_clipped_weight():
    lp, old, adv, tok, mask = batch(6, spread=0.6)
    lp.requires_grad_(True)
    f = lambda x, y, a: -min(max(math.exp(x - y), 0.9), 1.3) * a * x  # noqa: E731
    out = cispo(lp, old, tok, mask, clip_low=0.1, clip_high=0.3)
    assert close(out.loss, ref_aggregate(per_token(f, lp, old, tok, mask), MASK, "token_mean"))
    out.loss.backward()
    n = sum(map(sum, MASK))
    grad, lp = lp.grad, lp.detach()
    for i in range(4):
        for t in range(6):
            w = min(max(math.exp(float(lp[i, t] - old[i, t])), 0.9), 1.3)
            expected = -w * float(tok[i, t]) / n if MASK[i][t] else 0.0
            assert close(grad[i, t], expected, 1e-9)
    unbounded = cispo(lp, old, tok, mask, clip_high=4.0)
    g = lambda x, y, a: -min(math.exp(x - y), 5.0) * a * x  # noqa: E731
    assert close(unbounded.loss, ref_aggregate(per_token(g, lp, old, tok, mask), MASK, "token_mean"))


def test_policy_gradient_and_gpg_match_reference():
    lp, old, adv, tok, mask = batch(7, spread=0.5)
    for mode in AGG_MODES:
        pg = policy_gradient(lp, old, adv, mask, agg=mode)
        ref = per_token(lambda x, y, a: -math.exp(x - y) * a, lp, old, adv, mask)
        assert close(pg.loss, ref_aggregate(ref, MASK, mode))
        out = gpg(lp, old, tok, mask, agg=mode)
        ref = per_token(lambda x, y, a: -x * a, lp, old, tok, mask)
        assert close(out.loss, ref_aggregate(ref, MASK, mode))


def test_sapo_matches_reference():
    lp, old, adv, tok, mask = batch(8, spread=0.7)
    def f(x, y, a):
        tau = 1.0 if a > 0 else 1.05
        return -(4 / tau) / (1 + math.exp(-tau * (math.exp(x - y) - 1))) * a
    for mode in AGG_MODES:
        out = sapo(lp, old, tok, mask, agg=mode)
        assert close(out.loss, ref_aggregate(per_token(f, lp, old, tok, mask), MASK, mode), 1e-6)


def test_geo_mean_matches_verl_definition():
    lp, old, adv, tok, mask = batch(9, spread=0.6)
    lo, hi = 0.3, 0.25
    seq_losses = []
    for rl, ro, ra, rm in zip(rows(lp), rows(old), rows(tok), MASK):
        n = sum(rm)
        acc = a_sum = 0.0
        for x, y, a, m in zip(rl, ro, ra, rm):
            if not m:
                continue
            d = x - y
            s = (a > 0) - (a < 0)
            acc += s * min(s * d, s * min(max(d, -lo), hi))
            a_sum += a
        seq_losses.append(-(a_sum / n) * math.exp(acc / n))
    out = geo_mean(lp, old, tok, mask, agg="seq_mean_token_mean", clip_low=lo, clip_high=hi)
    assert close(out.loss, sum(seq_losses) / 4)
    lengths = [sum(r) for r in MASK]
    tm = geo_mean(lp, old, tok, mask, clip_low=lo, clip_high=hi)  # token_mean: length-weighted
    assert close(tm.loss, sum(s * n for s, n in zip(seq_losses, lengths)) / sum(lengths))
    assert out.metrics["clip_frac_high"] + out.metrics["clip_frac_low"] > 0


def test_kl_cov_selects_top_covariance_tokens():
    lp, old, adv, tok, mask = batch(10, spread=0.4)
    n = sum(map(sum, MASK))
    ratio = 0.2
    k = max(1, int(n * ratio))
    cells = [(i, t) for i in range(4) for t in range(6) if MASK[i][t]]
    mean_a = sum(float(tok[i, t]) for i, t in cells) / n
    mean_l = sum(float(lp[i, t]) for i, t in cells) / n
    cov = {c: (float(tok[c]) - mean_a) * (float(lp[c]) - mean_l) for c in cells}
    chosen = set(sorted(cells, key=lambda c: cov[c], reverse=True)[:k])
    mat = [[0.0] * 6 for _ in range(4)]
    for c in cells:
        d = float(lp[c] - old[c])
        mat[c[0]][c[1]] = -float(tok[c]) * math.exp(d) + (2.0 * abs(d) if c in chosen else 0.0)
    out = kl_cov(lp, old, tok, mask, kl_cov_ratio=ratio, kl_cov_coef=2.0)
    assert close(out.loss, ref_aggregate(mat, MASK, "token_mean"))
    assert close(out.metrics["kl_cov_frac"], k / n, 1e-6)


def test_clip_cov_cuts_gradient_of_selected_tokens():
    lp, old, adv, tok, mask = batch(11, spread=0.0)  # ratio 1: nothing PPO-clipped
    lp = lp.clone().requires_grad_(True)
    # all cov values fall inside a wide window; ratio 1.0 -> every real token gets cut
    out = clip_cov(lp, old, tok, mask, clip_cov_ratio=1.0, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and float(lp.grad.abs().sum()) == 0.0
    assert out.metrics["clip_cov_frac"] == 1.0
    none = clip_cov(lp.detach(), old, tok, mask, clip_cov_lb=1e8, clip_cov_ub=1e9)  # no candidate
    assert close(none.loss, float(ppo_clip(lp.detach(), old, tok, mask).loss))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    kw = dict(clip_cov_ratio=0.3, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    a = clip_cov(lp.detach(), old, tok, mask, generator=g1, **kw)
    b = clip_cov(lp.detach(), old, tok, mask, generator=g2, **kw)
    assert torch.equal(a.loss, b.loss)


# --- gradients at ratio 1 ------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [ppo_clip, cispo, policy_gradient, sapo])
@pytest.mark.parametrize("token_adv", [False, True])
def test_gradient_at_ratio_one_token_mean(fn, token_adv):
    lp, _, adv, tok, mask = batch(12)
    a = tok if token_adv else adv
    lp = lp.clone().requires_grad_(True)
    fn(lp, lp.detach().clone(), a, mask).loss.backward()
    full = a if a.dim() == 2 else a[:, None].expand_as(lp)
    expected = -full * mask / mask.sum()
    assert torch.allclose(lp.grad, expected, atol=1e-12, rtol=1e-9)


def test_gspo_gradient_at_ratio_one():
    lp, _, adv, _, mask = batch(13)
    lp = lp.clone().requires_grad_(True)
    gspo(lp, None, adv, mask, agg="seq_mean_token_mean").loss.backward()
    B = lp.shape[0]
    lengths = mask.sum(-1, keepdim=True)
    expected = -adv[:, None] * mask / (B * lengths)
    assert torch.allclose(lp.grad, expected, atol=1e-12, rtol=1e-9)


def test_padding_may_hold_garbage_and_gets_zero_gradient():
    lp, old, adv, _, mask = batch(14)
    pad = mask == 0
    lp = lp.masked_fill(pad, float("nan")).requires_grad_(True)
    old = old.masked_fill(pad, float("inf"))
    for fn in POLICY_LOSSES.values():
        lp.grad = None
        out = fn(lp, old, adv, mask)
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach())), fn.__name__
        assert bool(torch.isfinite(lp.grad).all()) and float(lp.grad[pad].abs().sum()) == 0.0, fn.__name__


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_validation_errors_name_the_loss(name):
    fn = POLICY_LOSSES[name]
    lp, old, adv, _, mask = batch(15)
    with pytest.raises(DataError, match=f"'{name}'.*mask"):
        fn(lp, old, adv, mask[:, :3])
    with pytest.raises(DataError, match=f"'{name}'.*0/1"):
        fn(lp, old, adv, mask * 2)
    with pytest.raises(DataError, match=f"'{name}'.*advantages"):
        fn(lp, old, adv[:2], mask)
    with pytest.raises(DataError, match=f"'{name}'.*old_log_probs"):
        fn(lp, old[:, :2], adv, mask)
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match=f"'{name}'.*NaN/inf"):
        fn(bad, old, adv, mask)
    with pytest.raises(DataError, match=f"'{name}'.*advantages"):
        fn(lp, old, torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=lp.dtype), mask)
    with pytest.raises(DataError, match=f"'{name}'.*log_probs"):
        fn(lp[0], old[0], adv[:1], mask[0])
    with pytest.raises(ConfigError, match=f"'{name}'.*unknown option"):
        fn(lp, old, adv, mask, clipp_low=0.1)
    with pytest.raises(ConfigError, match=f"'{name}'.*agg"):
        fn(lp, old, adv, mask, agg="token-mean")


def test_bad_option_values_are_config_errors():
    lp, old, adv, _, mask = batch(16)
    with pytest.raises(ConfigError, match="clip_low"):
        ppo_clip(lp, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ConfigError, match="tau_pos"):
        sapo(lp, old, adv, mask, tau_pos=0.0)
    with pytest.raises(ConfigError, match="kl_coef"):
        ppo_clip(lp, old, adv, mask, kl_coef=float("nan"))


# --- exact equality with TRL 1.16's GRPOTrainer._compute_loss ----------------------------------

def trl_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, loss_type,
             epsilon_low=0.2, epsilon_high=0.2, delta=None, beta=0.0, ref_per_token_logps=None,
             importance_sampling_level="token", max_completion_length=None, num_items_in_batch=None,
             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """TRL's tensor expressions, copied from grpo_trainer.py `_compute_loss` (lines ~3055-3183),
    with num_processes = gradient_accumulation_steps = steps_per_generation = 1."""
    mask = completion_mask
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)                                         # l.3059
    log_ratio = per_token_logps - old_per_token_logps                                # l.3083
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:                                                                            # l.3087
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)                                       # l.3095
    if beta != 0.0:                                                                  # l.3100
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
    if loss_type == "cispo":                                                         # l.3110
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:                 # l.3113
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif loss_type == "sapo":                                                        # l.3122
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl                       # l.3150
    if loss_type in ["grpo", "sapo"]:                                                # l.3154
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":                                                          # l.3159
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":                                                       # l.3164
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type in ["cispo", "dapo"]:                                               # l.3170
        normalizer = num_items_in_batch.clamp(min=1.0) / 1
        return (per_token_loss * mask).sum() / normalizer
    if loss_type == "luspo":                                                         # l.3179
        return (per_token_loss * mask).sum(-1).mean()
    raise AssertionError(loss_type)


def trl_case(seed: int, dtype: torch.dtype):
    lp, old, adv, _, mask = batch(seed, dtype=dtype, spread=0.4)
    return lp.detach().requires_grad_(True), old, adv, mask.int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_ppo_clip_bit_equal_to_trl(loss_type, dtype, beta):
    lp, old, adv, mask = trl_case(20, dtype)
    ref = old + 0.05
    num_items = mask.sum()
    expected = trl_loss(lp, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                        beta=beta, ref_per_token_logps=ref, max_completion_length=8,
                        num_items_in_batch=num_items)
    const = {"dr_grpo": 8, "dapo": num_items.clamp(min=1.0) / 1}.get(loss_type)
    got = ppo_clip(lp, old, adv, mask, agg=TRL_LOSS_TYPE_AGG[loss_type], clip_low=0.2, clip_high=0.28,
                   kl_coef=beta, ref_log_probs=ref, norm_constant=const).loss
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    (g_exp,) = torch.autograd.grad(expected, lp)
    (g_got,) = torch.autograd.grad(got, lp)
    assert torch.equal(g_got * mask, g_exp * mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_clip_defaults_equal_trl_default_dapo_on_one_micro_batch(dtype):
    # TRL 1.16 defaults: loss_type="dapo", epsilon=0.2, epsilon_high=None (= 0.2), beta=0; with one
    # process and the whole generation batch in one micro-batch, num_items_in_batch = mask.sum().
    lp, old, adv, mask = trl_case(25, dtype)
    expected = trl_loss(lp, old, adv, mask, loss_type="dapo", num_items_in_batch=mask.sum())
    assert torch.equal(ppo_clip(lp, old, adv, mask).loss, expected)


def test_ppo_clip_delta_bit_equal_to_trl():
    lp, old, adv, mask = trl_case(21, torch.float32)
    expected = trl_loss(lp, old, adv, mask, loss_type="bnpo", delta=1.3)
    assert torch.equal(ppo_clip(lp, old, adv, mask, delta=1.3).loss, expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_bit_equal_to_trl_sequence_level(loss_type):
    lp, old, adv, mask = trl_case(22, torch.float32)
    num_items = mask.sum()
    expected = trl_loss(lp, old, adv, mask, loss_type=loss_type, epsilon_low=3e-4, epsilon_high=4e-4,
                        importance_sampling_level="sequence", num_items_in_batch=num_items)
    const = num_items.clamp(min=1.0) / 1 if loss_type == "dapo" else None
    got = gspo(lp, old, adv, mask, agg=TRL_LOSS_TYPE_AGG[loss_type], norm_constant=const).loss
    assert torch.equal(got, expected)


def test_cispo_and_sapo_bit_equal_to_trl():
    lp, old, adv, mask = trl_case(23, torch.float32)
    num_items = mask.sum()
    expected = trl_loss(lp, old, adv, mask, loss_type="cispo", epsilon_high=5.0, num_items_in_batch=num_items)
    got = cispo(lp, old, adv, mask, clip_high=4.0, norm_constant=num_items.clamp(min=1.0) / 1).loss
    assert torch.equal(got, expected)
    expected = trl_loss(lp, old, adv, mask, loss_type="sapo")
    assert torch.equal(sapo(lp, old, adv, mask, agg=TRL_LOSS_TYPE_AGG["sapo"]).loss, expected)


def test_on_policy_old_none_equals_detached_copy():
    lp, _, adv, _, mask = batch(24)
    a = ppo_clip(lp, None, adv, mask).loss
    b = ppo_clip(lp, lp.detach().clone(), adv, mask).loss
    assert torch.equal(a, b)
