"""Pure tensor losses for reward/value heads and KL estimators (public API).

Everything here is a function of tensors only: no models, no trainers. Conventions:

- Inputs that must line up (chosen/rejected, values/returns/mask, logp/ref_logp) must have the
  same shape; a mismatch raises :class:`~rlhf_plugins.errors.DataError`.
- Reductions are means over the valid elements. When nothing is valid (every label -100, an
  all-zero mask) a loss is ``0`` (still attached to the graph), never NaN.
- Numerically stable forms only: ``logsigmoid``/``softplus``/``logsumexp``/``expm1``.

This module imports torch at the top; ``rlhf_plugins/__init__`` never imports it.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .advantage_types import Advantages  # re-exported for convenience
from .errors import ConfigError, DataError
from .head_data import IGNORE_INDEX, PRM_CLASS_OF_LABEL  # the label constants live there (no torch)

__all__ = [
    "Advantages",
    "IGNORE_INDEX",
    "KL_KINDS",
    "PRM_CLASS_OF_LABEL",
    "bradley_terry_loss",
    "kl_estimate",
    "masked_mean",
    "orm_loss",
    "plackett_luce_loss",
    "prm_loss",
    "value_loss",
]

KL_KINDS = ("k1", "k2", "k3")


def _check_same_shape(where: str, **tensors: torch.Tensor | None) -> None:
    """Raise DataError unless every given (non-None) tensor has the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise DataError(f"{where}: shape mismatch ({desc}); these tensors must have the same shape")


def _as_tensor_like(value: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=ref.device, dtype=ref.dtype)
    return torch.as_tensor(value, device=ref.device, dtype=ref.dtype)


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps the autograd graph of `tensors` (for batches with nothing valid)."""
    total = sum((t.sum() * 0.0) for t in tensors)
    return total if isinstance(total, torch.Tensor) else torch.zeros(())


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None,
                dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of `x` over positions where `mask` != 0 (weighted by `mask`); 0 where nothing is valid.

    `mask` must broadcast to `x`; masked-out entries never contribute, even if they are NaN/inf.
    `dim=None` reduces over everything.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim, keepdim=keepdim)
    try:
        mask_b = torch.broadcast_to(mask.to(x.device), x.shape)
    except RuntimeError:
        raise DataError(f"masked_mean: mask shape {list(mask.shape)} does not broadcast to "
                        f"x shape {list(x.shape)}") from None
    weights = mask_b.to(x.dtype if x.is_floating_point() else torch.float32)
    valid = mask_b != 0
    numerator = torch.where(valid, x * weights, torch.zeros((), dtype=weights.dtype, device=x.device))
    if dim is None:
        num, den = numerator.sum(), weights.sum()
    else:
        num, den = numerator.sum(dim=dim, keepdim=keepdim), weights.sum(dim=dim, keepdim=keepdim)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry pairwise loss ``-logsigmoid(r_c - r_r - margin)``, (weighted) mean over pairs.

    With `weights`, the result is ``sum(w * l) / sum(w)``: giving each of a prompt's C(K, 2)
    pairs weight ``1 / C(K, 2)`` (InstructGPT's balanced loss) averages per prompt, then over
    prompts. `margin` is a scalar or a tensor shaped like `chosen` (Llama 2's margin loss).
    """
    _check_same_shape("bradley_terry_loss", chosen=chosen, rejected=rejected)
    if chosen.numel() == 0:
        raise DataError("bradley_terry_loss: empty batch (no pairs)")
    diff = chosen - rejected
    if margin is not None:
        margin_t = _as_tensor_like(margin, diff)
        if margin_t.dim() > 0:
            _check_same_shape("bradley_terry_loss", chosen=chosen, margin=margin_t)
        diff = diff - margin_t
    losses = -F.logsigmoid(diff)
    if weights is None:
        return losses.mean()
    weights_t = _as_tensor_like(weights, losses)
    _check_same_shape("bradley_terry_loss", chosen=chosen, weights=weights_t)
    if bool((weights_t < 0).any()):
        raise DataError("bradley_terry_loss: weights must be non-negative")
    total = weights_t.sum()
    if float(total) == 0.0:
        raise DataError("bradley_terry_loss: weights sum to 0")
    return (weights_t * losses).sum() / total


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plackett-Luce ranking loss for `scores` [N, K] ordered best to worst, mean over N.

    Per row: ``-sum_{k<K-1} (s_k - logsumexp(s_k, ..., s_{K-1}))`` (the negative log-probability
    of the whole ranking); at K=2 this is exactly ``-logsigmoid(s_0 - s_1)`` (Bradley-Terry).
    `mask` [N, K] (bool, a prefix per row) marks real entries when rows rank different numbers
    of completions; a row with a single real entry contributes 0.
    """
    if scores.dim() != 2:
        raise DataError(f"plackett_luce_loss: scores must be [N, K], got shape {list(scores.shape)}")
    n, k = scores.shape
    if n == 0 or k < 2:
        raise DataError(f"plackett_luce_loss: need N >= 1 rows and K >= 2 ranked scores, got "
                        f"shape {list(scores.shape)}")
    if mask is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        _check_same_shape("plackett_luce_loss", scores=scores, mask=mask)
        valid = mask.to(device=scores.device, dtype=torch.bool)
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise DataError("plackett_luce_loss: mask must mark a prefix of each row "
                            "(the ranked completions first, padding after)")
    neg_inf = torch.finfo(scores.dtype).min
    masked_scores = torch.where(valid, scores, torch.full_like(scores, neg_inf))
    # log-sum-exp of each suffix s_k..s_{K-1}: reverse, cumulative logsumexp, reverse back.
    suffix_lse = torch.logcumsumexp(masked_scores.flip(-1), dim=-1).flip(-1)
    terms = masked_scores - suffix_lse
    # The last real entry's term is log(1) = 0; padding entries contribute nothing.
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return -terms.sum(dim=-1).mean()


def orm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token BCE-with-logits over positions where ``labels != -100``, mean over those positions.

    `logits` is [B, T] (or [B, T, 1]); `labels` [B, T] holds 0/1 (soft labels in [0, 1] are
    accepted) or -100 for unsupervised positions (prompt, padding).
    """
    if logits.dim() == labels.dim() + 1 and logits.shape[-1] == 1:
        logits = logits.squeeze(-1)
    _check_same_shape("orm_loss", logits=logits, labels=labels)
    labels = labels.to(logits.device)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_loss(logits)
    targets = labels[valid].to(logits.dtype)
    if bool(((targets < 0) | (targets > 1)).any()):
        raise DataError("orm_loss: labels must be in [0, 1] or -100 (ignored)")
    return F.binary_cross_entropy_with_logits(logits[valid], targets)


def prm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """3-class cross-entropy at labelled step positions, mean over them.

    `logits` [B, T, 3]; `labels` [B, T] with class indices 0 = incorrect (-1), 1 = neutral (0),
    2 = correct (+1) (see ``PRM_CLASS_OF_LABEL``), and -100 everywhere else.
    """
    if logits.dim() != labels.dim() + 1 or logits.shape[-1] != 3:
        raise DataError(f"prm_loss: logits must be labels' shape + [3], got logits "
                        f"{list(logits.shape)} and labels {list(labels.shape)}")
    _check_same_shape("prm_loss", logits_without_classes=logits[..., 0], labels=labels)
    labels = labels.to(logits.device).long()
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_loss(logits)
    picked = labels[valid]
    if bool(((picked < 0) | (picked > 2)).any()):
        bad = sorted(set(picked[(picked < 0) | (picked > 2)].tolist()))
        raise DataError(f"prm_loss: labels must be class indices 0/1/2 or -100, got {bad[:5]} "
                        "(map step labels -1/0/+1 with PRM_CLASS_OF_LABEL)")
    return F.cross_entropy(logits[valid], picked)


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None,
               old_values: torch.Tensor | None = None, clip: float | None = None) -> torch.Tensor:
    """Masked value regression ``0.5 * mean((v - R)^2)``, PPO-clipped when `clip` is given.

    Clipped: ``0.5 * mean(max((v - R)^2, (clip(v, old - c, old + c) - R)^2))`` (the 0.5 is the
    convention of OpenAI baselines / TRL's former PPOTrainer, so ``vf_coef`` values carry over;
    it is applied with and without clipping). `returns` and `old_values` are targets: they are
    detached. `mask` (same shape, 1 = real token) may be None for "all valid".
    """
    _check_same_shape("value_loss", values=values, returns=returns, mask=mask, old_values=old_values)
    returns = returns.detach().to(values.dtype)
    loss = (values - returns) ** 2
    if clip is not None:
        if old_values is None:
            raise ConfigError("value_loss: clip needs old_values (the values at rollout time)")
        if not clip > 0:
            raise ConfigError(f"value_loss: clip must be > 0, got {clip}")
        old = old_values.detach().to(values.dtype)
        clipped = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor,
                kind: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token Schulman estimator of KL(pi || pi_ref) for tokens sampled from pi (no reduction).

    With ``d = logp - ref_logp`` (log pi - log pi_ref of the sampled token):
    ``k1 = d`` (unbiased, can be negative), ``k2 = d**2 / 2`` (biased, >= 0),
    ``k3 = exp(-d) + d - 1`` (unbiased, >= 0). Reduce with :func:`masked_mean`.
    """
    _check_same_shape("kl_estimate", logp=logp, ref_logp=ref_logp)
    log_ratio = logp - ref_logp.to(logp.device)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        # exp(r) - r - 1 with r = ref_logp - logp; expm1 keeps precision when r is tiny.
        r = -log_ratio
        return torch.expm1(r) - r
    raise ConfigError(f"kl_estimate: unknown kind {kind!r}; choose one of {', '.join(KL_KINDS)}")
