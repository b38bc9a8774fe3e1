"""rlhf_plugins.losses against hand-computed values and exact KL from full distributions."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.losses import (
    PRM_CLASS_OF_LABEL,
    bradley_terry_loss,
    kl_estimate,
    masked_mean,
    orm_loss,
    plackett_luce_loss,
    prm_loss,
    value_loss,
)


def softplus(x: float) -> float:
    """log(1 + e^x), the hand reference (x small enough here for the naive form)."""
    return math.log(1.0 + math.exp(x))


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return abs(float(actual.detach()) - expected) <= tol * max(1.0, abs(expected))


# --- masked_mean --------------------------------------------------------------------------

def test_masked_mean_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert close(masked_mean(x, mask), (1 + 2 + 6) / 3)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 6.0]))
    assert torch.allclose(masked_mean(x, mask, dim=0), torch.tensor([1.0, 2.0, 6.0]))
    assert close(masked_mean(x), 3.5)


def test_masked_mean_ignores_nan_under_mask_and_empty_mask_is_zero():
    x = torch.tensor([1.0, float("nan"), float("inf"), 3.0])
    assert close(masked_mean(x, torch.tensor([1, 0, 0, 1])), 2.0)
    assert float(masked_mean(torch.tensor([5.0, 6.0]), torch.tensor([0, 0]))) == 0.0
    rows = masked_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0, 0], [1, 1]]), dim=1)
    assert torch.equal(rows, torch.tensor([0.0, 3.5]))


def test_masked_mean_bad_mask_shape():
    with pytest.raises(DataError, match="does not broadcast"):
        masked_mean(torch.ones(2, 3), torch.ones(3, 2))


# --- Bradley-Terry ------------------------------------------------------------------------

def test_bradley_terry_hand_value():
    chosen = torch.tensor([1.0, 0.5, -2.0])
    rejected = torch.tensor([0.0, 1.5, -2.0])
    # diffs 1, -1, 0: -logsigmoid(d) = log(1 + e^-d)
    expected = (softplus(-1.0) + softplus(1.0) + math.log(2.0)) / 3
    assert close(bradley_terry_loss(chosen, rejected), expected)


def test_bradley_terry_margin_and_weights():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 0.5])
    margin = torch.tensor([0.5, 1.0])
    # d - m = 0.5, -1.5
    expected_margin = (softplus(-0.5) + softplus(1.5)) / 2
    assert close(bradley_terry_loss(chosen, rejected, margin=margin), expected_margin)
    assert close(bradley_terry_loss(chosen, rejected, margin=0.5),
                 (softplus(-0.5) + softplus(1.0)) / 2)
    weights = torch.tensor([1.0, 3.0])
    expected_weighted = (1 * softplus(-1.0) + 3 * softplus(0.5)) / 4
    assert close(bradley_terry_loss(chosen, rejected, weights=weights), expected_weighted)


def test_bradley_terry_balanced_weights_average_per_prompt():
    # prompt A ranks 3 completions (3 pairs, weight 1/3 each), prompt B ranks 2 (1 pair, weight 1)
    chosen = torch.tensor([3.0, 3.0, 2.0, 1.0])
    rejected = torch.tensor([2.0, 0.0, 0.0, 4.0])
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    per_pair = [softplus(-1.0), softplus(-3.0), softplus(-2.0), softplus(3.0)]
    expected = (sum(per_pair[:3]) / 3 + per_pair[3]) / 2
    assert close(bradley_terry_loss(chosen, rejected, weights=weights), expected)


def test_bradley_terry_stable_and_gradient():
    chosen = torch.tensor([1000.0, -1000.0, 0.3], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.1])
    loss = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss)
    assert close(loss, (0.0 + 1000.0 + softplus(-0.2)) / 3, tol=1e-5)
    loss.backward()
    # d/dc [-logsigmoid(c - r)] = -(1 - sigmoid(c - r)) = -sigmoid(r - c)
    expected = [0.0, -1.0, -1 / (1 + math.exp(0.2))]  # -sigmoid(-1000) underflows to 0
    assert torch.allclose(chosen.grad, torch.tensor(expected) / 3, atol=1e-7)


def test_bradley_terry_errors():
    with pytest.raises(DataError, match="shape mismatch"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(DataError, match="shape mismatch"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))
    with pytest.raises(DataError, match="empty"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(DataError, match="non-negative"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), weights=torch.tensor([1.0, -1.0]))


# --- Plackett-Luce ------------------------------------------------------------------------

def test_plackett_luce_hand_value_k3():
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    e = math.exp
    prob = e(2) / (e(2) + e(1) + e(0)) * e(1) / (e(1) + e(0))
    assert close(plackett_luce_loss(scores), -math.log(prob))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 30), st.floats(-30, 30)), min_size=1, max_size=8))
def test_plackett_luce_equals_bradley_terry_at_k2(pairs):
    scores = torch.tensor(pairs, dtype=torch.float64)
    pl = plackett_luce_loss(scores)
    bt = bradley_terry_loss(scores[:, 0], scores[:, 1])
    assert torch.allclose(pl, bt, rtol=1e-12, atol=1e-12)


def test_plackett_luce_mask_and_order():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 123.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    e = math.exp
    row0 = -math.log(e(2) / (e(2) + e(1) + e(0)) * e(1) / (e(1) + e(0)))
    row1 = softplus(-1.5)
    assert close(plackett_luce_loss(scores, mask=mask), (row0 + row1) / 2)
    # the true order has a lower loss than its reverse
    assert plackett_luce_loss(scores[:1]) < plackett_luce_loss(scores[:1].flip(-1))
    with pytest.raises(DataError, match="prefix"):
        plackett_luce_loss(scores, mask=torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool))
    with pytest.raises(DataError, match=r"\[N, K\]"):
        plackett_luce_loss(torch.zeros(3))
    with pytest.raises(DataError, match="K >= 2"):
        plackett_luce_loss(torch.zeros(3, 1))


def test_plackett_luce_extreme_scores_finite():
    scores = torch.tensor([[500.0, -500.0, 0.0]], requires_grad=True)
    loss = plackett_luce_loss(scores)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert close(loss, 500.0, tol=1e-5)  # the 2nd choice (-500 over 0) costs ~500 nats


# --- ORM / PRM ----------------------------------------------------------------------------

def test_orm_loss_hand_value():
    logits = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    # BCE(x, 1) = softplus(-x); BCE(x, 0) = softplus(x)
    expected = (softplus(1.0) + softplus(2.0) + softplus(0.0)) / 3
    assert close(orm_loss(logits, labels), expected)
    assert close(orm_loss(logits.unsqueeze(-1), labels), expected)  # [B, T, 1] head output


def test_orm_loss_nothing_labelled_is_zero_with_graph_and_errors():
    logits = torch.tensor([[0.5, -1.0]], requires_grad=True)
    loss = orm_loss(logits, torch.full((1, 2), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(DataError, match="shape mismatch"):
        orm_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        orm_loss(torch.zeros(1, 2), torch.tensor([[2, 0]]))


def test_orm_loss_extreme_logits_finite():
    loss = orm_loss(torch.tensor([[200.0, -200.0]]), torch.tensor([[0, 1]]))
    assert close(loss, 200.0, tol=1e-6)


def test_prm_loss_hand_value():
    logits = torch.tensor([[[9.0, 9.0, 9.0], [1.0, 0.0, 2.0], [0.0, 3.0, 1.0]]])
    labels = torch.tensor([[-100, PRM_CLASS_OF_LABEL[1], PRM_CLASS_OF_LABEL[-1]]])
    assert labels.tolist() == [[-100, 2, 0]]

    def nll(row, cls):
        return math.log(sum(math.exp(v) for v in row)) - row[cls]

    expected = (nll([1.0, 0.0, 2.0], 2) + nll([0.0, 3.0, 1.0], 0)) / 2
    assert close(prm_loss(logits, labels), expected)


def test_prm_loss_errors_and_empty():
    with pytest.raises(DataError, match="class indices"):
        prm_loss(torch.zeros(1, 2, 3), torch.tensor([[3, -100]]))
    with pytest.raises(DataError, match="class indices"):
        prm_loss(torch.zeros(1, 2, 3), torch.tensor([[-1, 0]]))
    with pytest.raises(DataError, match=r"\+ \[3\]"):
        prm_loss(torch.zeros(1, 2, 2), torch.tensor([[0, 1]]))
    with pytest.raises(DataError, match="shape mismatch"):
        prm_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 1, 1]]))
    assert float(prm_loss(torch.zeros(1, 2, 3), torch.full((1, 2), -100))) == 0.0


# --- value loss ---------------------------------------------------------------------------

def test_value_loss_unclipped_hand_value():
    values = torch.tensor([[1.0, 2.0, 50.0]])
    returns = torch.tensor([[0.0, 4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert close(value_loss(values, returns, mask), 0.5 * (1.0 + 4.0) / 2)
    assert close(value_loss(values, returns, None), 0.5 * (1.0 + 4.0 + 2500.0) / 3)


def test_value_loss_clipped_hand_value_and_gradient():
    values = torch.tensor([1.0, 0.0, 0.5, 7.0], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    returns = torch.tensor([2.0, 1.0, 0.3, 0.0])
    mask = torch.tensor([1, 1, 1, 0])
    # 1: unclipped (1-2)^2 = 1, clipped v=0.2 -> 3.24 (max: clipped, grad 0 since v is clipped)
    # 2: v=old=0 -> 1 and 1
    # 3: unclipped (0.2)^2 = 0.04, clipped v=0.2 -> 0.01 (max: unclipped, grad 2*(0.5-0.3))
    loss = value_loss(values, returns, mask, old_values=old, clip=0.2)
    assert close(loss, 0.5 * (3.24 + 1.0 + 0.04) / 3)
    loss.backward()
    expected_grad = torch.tensor([0.0, 0.5 * 2 * (0.0 - 1.0), 0.5 * 2 * 0.2, 0.0]) / 3
    assert torch.allclose(values.grad, expected_grad, atol=1e-7)


def test_value_loss_errors():
    v = torch.zeros(2, 3)
    with pytest.raises(DataError, match="shape mismatch"):
        value_loss(v, torch.zeros(2, 4), None)
    with pytest.raises(DataError, match="shape mismatch"):
        value_loss(v, torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ConfigError, match="old_values"):
        value_loss(v, torch.zeros(2, 3), None, clip=0.2)
    with pytest.raises(ConfigError, match="> 0"):
        value_loss(v, torch.zeros(2, 3), None, old_values=v, clip=0.0)


# --- KL estimators ------------------------------------------------------------------------

def test_kl_estimates_per_sample_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    ref = torch.tensor([-1.5, -1.0, -0.3])
    d = [0.5, -1.0, 0.0]  # log pi - log pi_ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor(d))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([x * x / 2 for x in d]))
    k3 = [math.exp(-x) + x - 1 for x in d]  # r - log r - 1 with r = pi_ref / pi
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor(k3))


def test_kl_estimate_k3_precise_for_tiny_ratios():
    logp = torch.tensor([-1.0], dtype=torch.float32)
    ref = logp - 1e-4
    # exp(-d) + d - 1 ~ d^2 / 2 = 5e-9; the naive float32 form loses it to rounding
    assert abs(float(kl_estimate(logp, ref, "k3")) - 0.5e-8) < 1e-10


def test_kl_estimate_errors():
    with pytest.raises(ConfigError, match="unknown kind 'k4'"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(DataError, match="shape mismatch"):
        kl_estimate(torch.zeros(2), torch.zeros(3), "k1")


def _two_categoricals(seed: int, vocab: int = 12):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    exact_kl = float((logp.exp() * (logp - ref_logp)).sum())  # KL(pi || pi_ref)
    return g, logp, ref_logp, exact_kl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_expectations_under_pi_are_exact_kl(seed):
    """E_{x~pi}[k(x)] computed over the full vocabulary equals KL(pi || pi_ref) for k1 and k3."""
    _, logp, ref_logp, exact_kl = _two_categoricals(seed)
    p = logp.exp()
    for kind in ("k1", "k3"):
        expectation = float((p * kl_estimate(logp, ref_logp, kind)).sum())
        assert abs(expectation - exact_kl) < 1e-12, kind
    # the reverse direction KL(pi_ref || pi) is a different number: the check above has teeth
    reverse_kl = float((ref_logp.exp() * (ref_logp - logp)).sum())
    assert abs(reverse_kl - exact_kl) > 1e-3
    # k2 is biased (its expectation is not the KL) but non-negative per sample
    k2 = kl_estimate(logp, ref_logp, "k2")
    assert (k2 >= 0).all() and abs(float((p * k2).sum()) - exact_kl) > 1e-6
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimates_sample_means_converge_to_exact_kl(seed):
    g, logp, ref_logp, exact_kl = _two_categoricals(seed)
    n = 200_000
    tokens = torch.multinomial(logp.exp(), n, replacement=True, generator=g)  # samples from pi
    lp, rlp = logp[tokens], ref_logp[tokens]
    for kind in ("k1", "k3"):
        samples = kl_estimate(lp, rlp, kind)
        stderr = float(samples.std()) / math.sqrt(n)
        assert abs(float(samples.mean()) - exact_kl) < 5 * stderr, (kind, exact_kl)
    k2 = kl_estimate(lp, rlp, "k2")
    assert (k2 >= 0).all()
    k2_exact = float((logp.exp() * 0.5 * (logp - ref_logp) ** 2).sum())
    assert abs(float(k2.mean()) - k2_exact) < 5 * float(k2.std()) / math.sqrt(n)
