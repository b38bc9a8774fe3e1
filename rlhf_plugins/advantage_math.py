"""Pure advantage estimators (public API; imports torch, so components import it lazily).

Each function follows the verl estimator named in its docstring
(``verl/trainer/ppo/core_algos.py``) and returns :class:`~rlhf_plugins.advantage_types.Advantages`
(``returns`` is None: none of these uses a critic). Conventions, shared with
``plugins/advantages.py``:

- Groups are consecutive blocks of ``num_generations`` rows (TRL's layout); ``B % K != 0`` is a
  DataError. As in verl, a group of one has baseline 0 (and std 1 where a std is used).
- ``mask`` [B, T] is 0/1 (or bool). Functions that whiten over tokens need it; elsewhere it is
  optional and, when given, the [B] advantages come back broadcast over the real tokens as
  [B, T] (0 on padding) - verl's output shape.
- NaN rewards mean "unscorable" (TRL's convention): left out of every baseline, std and
  whitening statistic, and given advantage 0. +/-inf is a DataError.
- Whitening is verl's ``masked_whiten``: ``(x - mean) * rsqrt(var + 1e-8)`` with the unbiased
  variance over the real tokens (a batch with fewer than two entries whitens to 0).
- Outputs are detached float32 (float64 for float64 inputs) on the inputs' device.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .advantage_types import Advantages
from .errors import ConfigError, DataError

__all__ = [
    "gdpo", "gpg", "grpo_passk", "masked_whiten", "opo", "reinforce_plus_plus",
    "reinforce_plus_plus_baseline", "remax",
]

WHITEN_EPS = 1e-8


# --- input checks -------------------------------------------------------------------------

def _rewards(name: str, rewards: Any, dims: int, what: str = "rewards") -> torch.Tensor:
    """`rewards` as a detached float tensor with `dims` dims; DataError for inf/empty/bad shape."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    rewards = rewards.detach()
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    if rewards.dim() != dims or rewards.shape[0] == 0:
        shape = "[B]" if dims == 1 else "[B, T]" if what != "reward_components" else "[B, F]"
        raise DataError(f"advantage {name!r}: {what} must be a non-empty {shape} tensor, got shape "
                        f"{list(rewards.shape)}")
    if bool(torch.isinf(rewards).any()):
        raise DataError(f"advantage {name!r}: {what} contain +/-inf")
    return rewards


def _groups(name: str, batch: int, k: Any, minimum: int = 1) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise ConfigError(f"advantage {name!r}: num_generations must be an int >= {minimum}, got {k!r}")
    if batch % k:
        raise DataError(f"advantage {name!r}: batch size {batch} is not divisible by "
                        f"num_generations={k} (groups are consecutive blocks)")


def _mask(name: str, mask: Any, ref: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """`mask` as a bool [B, T] tensor on `ref`'s device (T = `length` when given)."""
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    mask = mask.detach().to(ref.device)
    batch = ref.shape[0]
    if mask.dim() != 2 or mask.shape[0] != batch or (length is not None and mask.shape[1] != length):
        raise DataError(f"advantage {name!r}: mask must be [B, T] with B={batch}"
                        f"{'' if length is None else f', T={length}'}, got {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"advantage {name!r}: mask must hold only 0/1")
    return mask != 0


def _float_opt(name: str, label: str, value: Any, minimum: float = 0.0, strict: bool = False,
               maximum: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum) or value > maximum:
        raise ConfigError(f"advantage {name!r}: {label} must be a finite number in "
                          f"{'(' if strict else '['}{minimum}, {maximum}], got {value!r}")


# --- shared math --------------------------------------------------------------------------

def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl ``masked_whiten`` over entries where `mask` is true; 0 elsewhere (NaN there is fine)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    count = mask.sum().to(values.dtype)
    mean = torch.where(mask, values, zero).sum() / count.clamp(min=1)
    centered = torch.where(mask, values - mean, zero)
    var = (centered ** 2).sum() / (count - 1).clamp(min=1)
    return centered * torch.rsqrt(var + WHITEN_EPS)


def _group_stats(grouped: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-aware (count, mean, unbiased std) along dim 1 of `grouped` [G, K, ...].

    verl's group of one: mean 0, std 1. Std is 0 for fewer than two scorable entries.
    """
    scorable = ~torch.isnan(grouped)
    count = scorable.sum(dim=1, keepdim=True)
    zero = torch.zeros((), dtype=grouped.dtype, device=grouped.device)
    if k == 1:
        return count, torch.zeros_like(grouped[:, :1]), torch.ones_like(grouped[:, :1])
    mean = torch.where(scorable, grouped, zero).sum(dim=1, keepdim=True) / count.clamp(min=1)
    sq = torch.where(scorable, (grouped - mean) ** 2, zero).sum(dim=1, keepdim=True)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), zero)
    return count, mean, std


def _constant(grouped: torch.Tensor) -> torch.Tensor:
    """True (per group, keepdim) where every scorable entry along dim 1 is equal."""
    inf = torch.tensor(float("inf"), dtype=grouped.dtype, device=grouped.device)
    nan = torch.isnan(grouped)
    hi = torch.where(nan, -inf, grouped).amax(dim=1, keepdim=True)
    lo = torch.where(nan, inf, grouped).amin(dim=1, keepdim=True)
    return hi <= lo


def _out(adv: torch.Tensor, real: torch.Tensor | None) -> Advantages:
    """Zero the unscorable rows; broadcast [B] over the real tokens when a mask is given."""
    adv = torch.nan_to_num(adv, nan=0.0)
    if real is not None and adv.dim() == 1:
        adv = adv[:, None] * real.to(adv.dtype)
    return Advantages(advantages=adv, returns=None)


# --- estimators ---------------------------------------------------------------------------

def reinforce_plus_plus(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> Advantages:
    """REINFORCE++ (verl ``compute_reinforce_plus_plus_outcome_advantage``): [B, T] advantages.

    Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` per row, restarted after every
    padding position (verl's "reset after EOS"; rewards on padding are ignored), then whitened
    over all real tokens of the batch. NaN rewards at real tokens are a DataError.
    """
    name = "reinforce_plus_plus"
    rewards = _rewards(name, token_rewards, 2, "token_rewards")
    real = _mask(name, mask, rewards, rewards.shape[1])
    _float_opt(name, "gamma", gamma, maximum=1.0)
    if bool((torch.isnan(rewards) & real).any()):
        raise DataError(f"advantage {name!r}: token_rewards are NaN at real (mask=1) tokens")
    with torch.no_grad():
        keep = real.to(rewards.dtype)
        rewards = torch.where(real, rewards, torch.zeros_like(rewards))
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in range(rewards.shape[1] - 1, -1, -1):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
            running = running * keep[:, t]
        return Advantages(advantages=masked_whiten(returns, real), returns=None)


def reinforce_plus_plus_baseline(rewards: torch.Tensor, mask: torch.Tensor,
                                 num_generations: int) -> Advantages:
    """REINFORCE++-baseline (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``).

    ``r - mean_group(r)`` broadcast over the real tokens, then whitened over all real tokens of
    the batch (so longer completions weigh more in the statistics). Returns [B, T].
    """
    name = "reinforce_plus_plus_baseline"
    r = _rewards(name, rewards, 1)
    _groups(name, r.shape[0], num_generations)
    real = _mask(name, mask, r)
    with torch.no_grad():
        grouped = r.view(-1, num_generations)
        _, mean, _ = _group_stats(grouped, num_generations)
        centered = (grouped - mean).view(-1)
        tokens = real & ~torch.isnan(centered)[:, None]
        adv = masked_whiten(centered[:, None].expand(real.shape), tokens)
        return Advantages(advantages=adv, returns=None)


def opo(rewards: torch.Tensor, mask: torch.Tensor, num_generations: int) -> Advantages:
    """OPO (verl ``compute_opo_outcome_advantage``): ``r_i - sum_j L_j r_j / sum_j L_j`` per group.

    L_j is completion j's real-token count; a group whose scorable completions are all empty
    has baseline 0. Returns [B, T] (broadcast over real tokens).
    """
    name = "opo"
    r = _rewards(name, rewards, 1)
    _groups(name, r.shape[0], num_generations)
    real = _mask(name, mask, r)
    with torch.no_grad():
        grouped = r.view(-1, num_generations)
        lengths = real.sum(-1).to(r.dtype).view_as(grouped)
        scorable = ~torch.isnan(grouped)
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        weight = torch.where(scorable, lengths, zero).sum(1, keepdim=True)
        total = torch.where(scorable, lengths * grouped, zero).sum(1, keepdim=True)
        baseline = torch.where(weight > 0, total / torch.where(weight > 0, weight, 1.0), zero)
        if num_generations == 1:
            baseline = torch.zeros_like(baseline)
        return _out((grouped - baseline).view(-1), real)


def grpo_passk(rewards: torch.Tensor, num_generations: int, *, mask: torch.Tensor | None = None,
               norm_adv_by_std: bool = True, epsilon: float = 1e-6) -> Advantages:
    """Pass@k (verl ``compute_grpo_passk_outcome_advantage``, arXiv 2503.19595).

    Only the best completion of each group gets a non-zero advantage, ``r_max - r_second``,
    divided by ``std_group + epsilon`` (unbiased std over the group) when ``norm_adv_by_std``.
    Needs num_generations >= 2; a group with fewer than two scorable completions gets 0.
    """
    name = "grpo_passk"
    r = _rewards(name, rewards, 1)
    _groups(name, r.shape[0], num_generations, minimum=2)
    _float_opt(name, "epsilon", epsilon)
    real = None if mask is None else _mask(name, mask, r)
    with torch.no_grad():
        grouped = r.view(-1, num_generations)
        count, _, std = _group_stats(grouped, num_generations)
        inf = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
        top, top_idx = torch.topk(torch.where(torch.isnan(grouped), -inf, grouped), 2, dim=1)
        gap = top[:, :1] - top[:, 1:]
        if norm_adv_by_std:
            gap = gap / (std + epsilon)
        gap = torch.where(count >= 2, gap, torch.zeros_like(gap))
        adv = torch.zeros_like(grouped).scatter_(1, top_idx[:, :1], gap)
        return _out(adv.view(-1), real)


def gpg(rewards: torch.Tensor, num_generations: int, mask: torch.Tensor | None = None, *,
        f_norm: float = 1.0) -> Advantages:
    """GPG (verl ``compute_gpg_outcome_advantage``): ``alpha * (r - mean_group(r)) / f_norm``.

    ``alpha = B / max(M, 1)`` with M the number of non-zero rewards (both counted over
    scorable completions): it rescales for the completions that carry no signal.
    """
    name = "gpg"
    r = _rewards(name, rewards, 1)
    _groups(name, r.shape[0], num_generations)
    _float_opt(name, "f_norm", f_norm, strict=True)
    real = None if mask is None else _mask(name, mask, r)
    with torch.no_grad():
        scorable = ~torch.isnan(r)
        alpha = scorable.sum().to(r.dtype) / (scorable & (r != 0)).sum().clamp(min=1).to(r.dtype)
        grouped = r.view(-1, num_generations)
        _, mean, _ = _group_stats(grouped, num_generations)
        return _out((alpha * (grouped - mean) / f_norm).view(-1), real)


def gdpo(reward_components: torch.Tensor, reward_weights: Any = None, num_generations: int = 1, *,
         mask: torch.Tensor | None = None, epsilon: float = 1e-6) -> Advantages:
    """GDPO (verl ``compute_gdpo_outcome_advantage``, arXiv 2601.05242; TRL ``normalize_then_sum``).

    Each reward function f (column of ``reward_components`` [B, F], NaN = that function
    returned None) is normalised within its group, ``(r_f - mean) / (std + epsilon)`` (unbiased
    std; a group whose scorable values are all equal gives exactly 0; a group of one gives
    r_f, verl's mean 0 / std 1), NaN entries are skipped in the weighted sum over f, and the
    sum is whitened over the batch: over the real tokens as [B, T] when ``mask`` is given
    (verl), over the scorable rows as [B] otherwise. Rows with every function NaN get 0.
    TRL's variant uses epsilon=1e-4 and divides by ``std + 1e-4`` in the batch step.
    """
    name = "gdpo"
    rc = _rewards(name, reward_components, 2, "reward_components")
    batch, n_funcs = rc.shape
    if n_funcs == 0:
        raise DataError(f"advantage {name!r}: reward_components has no reward function (F = 0)")
    _groups(name, batch, num_generations)
    _float_opt(name, "epsilon", epsilon)
    if reward_weights is None:
        weights = torch.ones(n_funcs, dtype=rc.dtype, device=rc.device)
    else:
        weights = torch.as_tensor(reward_weights).detach().to(device=rc.device, dtype=rc.dtype)
        if tuple(weights.shape) != (n_funcs,) or not bool(torch.isfinite(weights).all()):
            raise ConfigError(f"advantage {name!r}: reward_weights must be {n_funcs} finite numbers, "
                              f"got {reward_weights!r}")
    real = None if mask is None else _mask(name, mask, rc)
    with torch.no_grad():
        grouped = rc.view(-1, num_generations, n_funcs)
        _, mean, std = _group_stats(grouped, num_generations)
        normed = (grouped - mean) / (std + epsilon)
        if num_generations > 1:
            normed = torch.where(_constant(grouped), torch.zeros_like(normed), normed)
        normed = normed.view(batch, n_funcs)
        unscorable = torch.isnan(rc).all(dim=1)
        summed = torch.where(torch.isnan(normed), torch.zeros_like(normed), normed * weights).sum(dim=1)
        if real is None:
            adv = masked_whiten(summed, ~unscorable)
        else:
            adv = masked_whiten(summed[:, None].expand(real.shape), real & ~unscorable[:, None])
        return Advantages(advantages=adv, returns=None)


def remax(rewards: torch.Tensor, baseline_rewards: torch.Tensor,
          mask: torch.Tensor | None = None) -> Advantages:
    """ReMax (verl ``compute_remax_outcome_advantage``): ``r - r_greedy`` (the greedy completion's reward).

    NaN in either reward gives 0. With a mask, the [B] advantages are broadcast over the real
    tokens (verl's return-to-go of an outcome reward is r at every real token).
    """
    name = "remax"
    r = _rewards(name, rewards, 1)
    b = _rewards(name, baseline_rewards, 1, "baseline_rewards").to(r.dtype)
    if b.shape != r.shape:
        raise DataError(f"advantage {name!r}: baseline_rewards {list(b.shape)} must match rewards "
                        f"{list(r.shape)}")
    real = None if mask is None else _mask(name, mask, r)
    return _out(r - b.to(r.device), real)
