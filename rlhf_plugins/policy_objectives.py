"""Pure policy-gradient objectives (public API; imports torch, so components import it lazily).

Every loss is ``fn(log_probs, old_log_probs, advantages, mask, *, agg="token_mean",
ref_log_probs=None, **options) -> PolicyLoss``: ``log_probs``/``old_log_probs``/``mask`` are
[B, T] (``old_log_probs=None`` means on-policy, ``log_probs.detach()``), ``advantages`` is [B]
(broadcast to the tokens) or [B, T]. Only real tokens (mask == 1) count: padding may hold any
value (even NaN) and gets no loss and zero gradient. Non-finite values at real tokens, shape
mismatches and non-0/1 masks are :class:`DataError`; bad options are :class:`ConfigError`.
``kl_coef > 0`` adds TRL's per-token KL term ``kl_coef * (exp(ref - lp) - (ref - lp) - 1)``
before aggregation (needs ``ref_log_probs``). ``norm_constant`` is passed to :func:`aggregate`.

The per-token formulas follow TRL 1.16's ``GRPOTrainer._compute_loss`` operation for operation
where TRL has the loss (ppo_clip, gspo, cispo, sapo), so equal inputs give bit-equal losses;
the others follow verl's ``verl/trainer/ppo/core_algos.py``. TRL ``loss_type`` -> ``agg``:

- ``grpo``, ``sapo`` -> ``seq_mean_token_mean``; ``bnpo`` -> ``token_mean``;
- ``dapo`` (TRL's default), ``cispo`` -> ``token_mean`` with ``norm_constant`` = TRL's
  normaliser (active tokens of the generation batch, rescaled to one accumulation window;
  equal to the micro-batch's token count when the whole batch is one micro-batch);
- ``dr_grpo`` -> ``seq_mean_token_sum_norm`` with ``norm_constant=max_completion_length``;
- ``luspo`` -> ``seq_mean_token_sum``.

TRL further divides grpo/bnpo/dr_grpo/luspo/sapo by the gradient-accumulation steps; that
scaling belongs to the trainer, not to these functions.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from .errors import ConfigError, DataError
from .sdk import PolicyLoss

__all__ = [
    "AGG_MODES", "POLICY_LOSSES", "TRL_LOSS_TYPE_AGG", "PolicyLoss", "aggregate", "cispo",
    "clip_cov", "geo_mean", "gpg", "gspo", "kl_cov", "policy_gradient", "ppo_clip", "sapo",
]

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")

TRL_LOSS_TYPE_AGG = {
    "grpo": "seq_mean_token_mean", "sapo": "seq_mean_token_mean", "bnpo": "token_mean",
    "dapo": "token_mean", "cispo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm",
    "luspo": "seq_mean_token_sum",
}
"""The agg mode reproducing each TRL 1.16 ``loss_type`` (see the module docstring for constants)."""


class _Inputs(NamedTuple):
    lp: torch.Tensor    # log_probs, 0 on padding (keeps the graph)
    old: torch.Tensor   # detached, 0 on padding
    adv: torch.Tensor   # [B, T], 0 on padding
    real: torch.Tensor  # bool [B, T]
    ref: torch.Tensor | None
    agg: str
    norm_constant: Any


# --- helpers ------------------------------------------------------------------------------

def _count_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _bool_mask(where: str, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"{where}: mask must hold only 0/1")
    return mask != 0


def _in_range(value: Any, minimum: float = 0.0, strict: bool = False, maximum: float = math.inf) -> bool:
    """Whether `value` is a finite real number (not a bool) in [minimum, maximum] / (minimum, maximum]."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and minimum <= value <= maximum and not (strict and value == minimum)


def _opt(loss: str, label: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
         maximum: float = math.inf, none_ok: bool = False) -> None:
    """ConfigError unless `value` is a finite number in range (or None when `none_ok`)."""
    if not (value is None and none_ok) and not _in_range(value, minimum, strict, maximum):
        bound = f"{'>' if strict else '>='} {minimum}"
        bound += f" and <= {maximum}" if maximum < math.inf else ""
        raise ConfigError(f"policy loss {loss!r}: {label} must be a finite number {bound}, got {value!r}")


def _clip_opts(loss: str, clip_low: Any, clip_high: Any, low_none_ok: bool = False) -> None:
    _opt(loss, "clip_low", clip_low, maximum=1.0, none_ok=low_none_ok)
    _opt(loss, "clip_high", clip_high)


def _check_agg(where: str, mode: str, norm_constant: Any) -> None:
    if mode not in AGG_MODES:
        raise ConfigError(f"{where}: unknown agg mode {mode!r}; choose one of {', '.join(AGG_MODES)}")
    if norm_constant is None:
        return
    if mode not in ("token_mean", "seq_mean_token_sum_norm"):
        raise ConfigError(f"{where}: norm_constant only applies to agg 'token_mean' or "
                          f"'seq_mean_token_sum_norm', not {mode!r}")
    value = float(norm_constant) if isinstance(norm_constant, torch.Tensor) and norm_constant.dim() == 0 \
        else norm_constant
    if not _in_range(value, strict=True):
        raise ConfigError(f"{where}: norm_constant must be a finite number > 0, got {norm_constant!r}")


def _prepare(name: str, args: dict[str, Any]) -> _Inputs:
    """Validate an objective's inputs and common options; zero the padding.

    `args` holds the objective's parameters (its ``locals()`` on entry), which all share the
    names log_probs, old_log_probs, advantages, mask, ref_log_probs, agg, norm_constant, unknown.
    """
    where = f"policy loss {name!r}"
    log_probs, old_log_probs, advantages, mask = (
        args["log_probs"], args["old_log_probs"], args["advantages"], args["mask"])
    ref_log_probs, agg, norm_constant, unknown = (
        args["ref_log_probs"], args["agg"], args["norm_constant"], args["unknown"])
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")
    _check_agg(where, agg, norm_constant)
    for label, t in (("log_probs", log_probs), ("mask", mask), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{where}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if log_probs.dim() != 2 or log_probs.shape[0] == 0:
        raise DataError(f"{where}: log_probs must be a non-empty [B, T], got {list(log_probs.shape)}")
    shape = tuple(log_probs.shape)
    if tuple(mask.shape) != shape:
        raise DataError(f"{where}: mask {list(mask.shape)} must match log_probs {list(shape)}")
    real = _bool_mask(where, mask.to(log_probs.device))
    if old_log_probs is None:
        old_log_probs = log_probs.detach()
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise DataError(f"{where}: advantages must be [B] or [B, T] = {list(shape)}, "
                        f"got {list(advantages.shape)}")
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)

    def clean(label: str, t: Any, keep_grad: bool = False) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"{where}: {label} must be a tensor of shape {list(shape)}, got {got}")
        t = t if keep_grad else t.detach()
        t = t.to(device=log_probs.device, dtype=log_probs.dtype)
        if bool((~torch.isfinite(t.detach()) & real).any()):
            raise DataError(f"{where}: {label} has NaN/inf at real (mask=1) tokens")
        return torch.where(real, t, zero)

    if advantages.dim() == 1:
        if not bool(torch.isfinite(advantages).all()):
            raise DataError(f"{where}: advantages contain NaN/inf")
        advantages = advantages[:, None].expand(shape)
    return _Inputs(lp=clean("log_probs", log_probs, keep_grad=True),
                   old=clean("old_log_probs", old_log_probs), adv=clean("advantages", advantages),
                   real=real, ref=None if ref_log_probs is None else clean("ref_log_probs", ref_log_probs),
                   agg=agg, norm_constant=norm_constant)


def _mean(x: torch.Tensor, real: torch.Tensor) -> float:
    """Masked mean over real tokens as a float (0 when nothing is real)."""
    with torch.no_grad():
        x = x.detach().to(_count_dtype(x.dtype))
        return float(torch.where(real, x, torch.zeros_like(x)).sum() / real.sum().clamp(min=1))


def _finish(name: str, inp: _Inputs, per_token: torch.Tensor, kl_coef: float,
            metrics: dict[str, float]) -> PolicyLoss:
    """Add the optional reference-KL term (TRL's form and order), aggregate, wrap."""
    _opt(name, "kl_coef", kl_coef)
    if kl_coef:
        if inp.ref is None:
            raise DataError(f"policy loss {name!r}: kl_coef={kl_coef} needs ref_log_probs")
        per_token_kl = torch.exp(inp.ref - inp.lp) - (inp.ref - inp.lp) - 1
        per_token = per_token + kl_coef * per_token_kl
        metrics["kl"] = _mean(per_token_kl, inp.real)
    metrics["approx_kl"] = _mean(inp.old - inp.lp, inp.real)
    return PolicyLoss(aggregate(per_token, inp.real, inp.agg, norm_constant=inp.norm_constant), metrics)


# --- aggregation --------------------------------------------------------------------------

def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", *,
              norm_constant: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the real tokens of `mask` (verl's ``agg_loss``).

    With S_b = sum of row b's real-token losses, L_b its real-token count, N = sum L_b:
    ``token_mean`` = sum_b S_b / N (or / norm_constant, e.g. TRL dapo's global count);
    ``seq_mean_token_mean`` = mean_b S_b / L_b; ``seq_mean_token_sum`` = mean_b S_b;
    ``seq_mean_token_sum_norm`` = mean_b S_b / C (Dr. GRPO; C = norm_constant, default T; older
    verl divided the total by T without the 1/B). A row with no real tokens counts as 0 and
    an all-padding batch gives 0 (TRL's ``clamp(min=1)``), never NaN.
    """
    _check_agg("aggregate", mode, norm_constant)
    if loss_mat.dim() != 2 or tuple(mask.shape) != tuple(loss_mat.shape):
        raise DataError(f"aggregate: loss_mat must be [B, T] and mask the same shape, got "
                        f"{list(loss_mat.shape)} and {list(mask.shape)}")
    real = _bool_mask("aggregate", mask.to(loss_mat.device))
    masked = torch.where(real, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    count_dtype = _count_dtype(loss_mat.dtype)
    if mode == "token_mean":
        denom = real.sum().to(count_dtype).clamp(min=1.0) if norm_constant is None else norm_constant
        return masked.sum() / denom
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / real.sum(-1).to(count_dtype).clamp(min=1.0)).mean()
    if mode == "seq_mean_token_sum":
        return masked.sum(-1).mean()
    constant = loss_mat.shape[-1] if norm_constant is None else norm_constant
    return masked.sum() / (loss_mat.shape[0] * constant)


# --- the objectives -----------------------------------------------------------------------

def ppo_clip(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
             mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
             clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
             delta: float | None = None, kl_coef: float = 0.0, norm_constant: Any = None,
             **unknown: Any) -> PolicyLoss:
    """PPO/GRPO clipped surrogate ``-min(r*A, clip(r, 1-clip_low, 1+clip_high)*A)`` per token.

    Bit-equal to TRL's grpo/bnpo/dr_grpo/dapo/luspo per-token loss (TRL ``epsilon`` ->
    clip_low, ``epsilon_high`` -> clip_high, ``delta`` -> delta: two-sided clip of the unclipped
    ratio, INTELLECT-2). ``dual_clip=c`` (> 1, verl ``clip_ratio_c``, Ye et al. 2019) caps the
    loss of A < 0 tokens at ``-c*A``. Metrics: clip_frac_low (r < 1-clip_low, A < 0),
    clip_frac_high (r > 1+clip_high, A > 0), clip_frac (either), dual_clip_frac, approx_kl.
    """
    name = "ppo_clip"
    inp = _prepare(name, locals())
    _clip_opts(name, clip_low, clip_high)
    _opt(name, "dual_clip", dual_clip, minimum=1.0, strict=True, none_ok=True)
    _opt(name, "delta", delta, strict=True, none_ok=True)
    coef_1 = torch.exp(inp.lp - inp.old)
    coef_2 = torch.clamp(coef_1, 1 - clip_low, 1 + clip_high)
    ratio = coef_1
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * inp.adv, coef_2 * inp.adv)
    low = (ratio < 1 - clip_low) & (inp.adv < 0)
    high = (ratio > 1 + clip_high) & (inp.adv > 0)
    metrics = {"clip_frac_low": _mean(low, inp.real), "clip_frac_high": _mean(high, inp.real),
               "clip_frac": _mean(low | high, inp.real)}
    if dual_clip is not None:
        floor = -inp.adv * dual_clip
        negative = inp.adv < 0
        metrics["dual_clip_frac"] = _mean(negative & (per_token > floor), inp.real)
        per_token = torch.where(negative, torch.min(per_token, floor), per_token)
    return _finish(name, inp, per_token, kl_coef, metrics)


def gspo(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
         mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
         clip_low: float = 3e-4, clip_high: float = 4e-4, kl_coef: float = 0.0,
         norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """GSPO: PPO clipping of the sequence ratio ``s_b = exp(mean_t(logp - old_logp))`` per sequence.

    Computed as TRL's ``importance_sampling_level="sequence"`` (bit-equal): s_b [B, 1] is
    broadcast over the row's tokens. verl's ``compute_policy_loss_gspo`` writes the token ratio
    ``sg(s_b) * exp(logp - sg(logp))``: same value, and the same gradient for every agg mode
    here (each weights all tokens of a row equally). The paper/verl aggregate with
    ``seq_mean_token_mean``; default clips are the paper's 3e-4 / 4e-4.
    """
    name = "gspo"
    inp = _prepare(name, locals())
    _clip_opts(name, clip_low, clip_high)
    lengths = inp.real.sum(-1).to(_count_dtype(inp.lp.dtype)).clamp(min=1.0)
    log_w = ((inp.lp - inp.old) * inp.real).sum(-1) / lengths
    coef_1 = torch.exp(log_w.unsqueeze(-1))
    coef_2 = torch.clamp(coef_1, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(coef_1 * inp.adv, coef_2 * inp.adv)
    low = (coef_1 < 1 - clip_low) & (inp.adv < 0)
    high = (coef_1 > 1 + clip_high) & (inp.adv > 0)
    metrics = {"clip_frac_low": _mean(low, inp.real), "clip_frac_high": _mean(high, inp.real),
               "clip_frac": _mean(low | high, inp.real), "seq_ratio_mean": float(coef_1.detach().mean())}
    return _finish(name, inp, per_token, kl_coef, metrics)


def cispo(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
          mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
          clip_low: float | None = None, clip_high: float = 4.0, kl_coef: float = 0.0,
          norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """CISPO (MiniMax-M1): ``-sg(clip(r, 1-clip_low, 1+clip_high)) * A * logp`` per token.

    ``clip_low=None`` means no lower bound (the paper's setting and TRL's). TRL's cispo caps the
    ratio at ``epsilon_high`` itself (ScaleRL's 5.0): use ``clip_high = epsilon_high - 1``
    (the default 4.0 gives TRL's recommended 5.0 exactly). verl: ``compute_policy_loss_cispo``.
    """
    name = "cispo"
    inp = _prepare(name, locals())
    _clip_opts(name, clip_low, clip_high, low_none_ok=True)
    ratio = torch.exp(inp.lp - inp.old)
    lower = None if clip_low is None else 1 - clip_low
    clamped_ratios = torch.clamp(ratio, min=lower, max=1 + clip_high).detach()
    per_token = -clamped_ratios * inp.adv * inp.lp
    high = ratio > 1 + clip_high
    low = (ratio < lower) if lower is not None else torch.zeros_like(high)
    metrics = {"clip_frac_low": _mean(low, inp.real), "clip_frac_high": _mean(high, inp.real),
               "clip_frac": _mean(low | high, inp.real)}
    return _finish(name, inp, per_token, kl_coef, metrics)


def policy_gradient(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, *, agg: str = "token_mean",
                    ref_log_probs: torch.Tensor | None = None, kl_coef: float = 0.0,
                    norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """Importance-weighted policy gradient without clipping: ``-r * A`` per token, r = exp(logp - old)."""
    name = "policy_gradient"
    inp = _prepare(name, locals())
    ratio = torch.exp(inp.lp - inp.old)
    per_token = -ratio * inp.adv
    return _finish(name, inp, per_token, kl_coef, {"ratio_mean": _mean(ratio, inp.real)})


def gpg(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
        mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
        kl_coef: float = 0.0, norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """GPG (verl ``compute_policy_loss_gpg``): plain REINFORCE surrogate ``-logp * A`` per token."""
    name = "gpg"
    inp = _prepare(name, locals())
    per_token = -inp.lp * inp.adv
    return _finish(name, inp, per_token, kl_coef, {})


def sapo(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
         mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
         tau_pos: float = 1.0, tau_neg: float = 1.05, kl_coef: float = 0.0,
         norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """SAPO soft gate: ``-(4/tau) * sigmoid(tau * (r - 1)) * A``, tau = tau_pos if A > 0 else tau_neg.

    Bit-equal to TRL's sapo (``sapo_temperature_pos/neg``; TRL aggregates it as grpo, i.e.
    ``seq_mean_token_mean``); verl: ``compute_policy_loss_sapo``. Gradient at r = 1 is -A.
    """
    name = "sapo"
    inp = _prepare(name, locals())
    _opt(name, "tau_pos", tau_pos, strict=True)
    _opt(name, "tau_neg", tau_neg, strict=True)
    coef_1 = torch.exp(inp.lp - inp.old)
    temperatures = torch.where(inp.adv > 0, tau_pos, tau_neg)
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    per_token = -soft_coef_1 * inp.adv
    return _finish(name, inp, per_token, kl_coef, {"gate_mean": _mean(soft_coef_1, inp.real)})


def geo_mean(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
             mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
             clip_low: float = 0.4, clip_high: float = 0.4, kl_coef: float = 0.0,
             norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """GMPO (verl ``compute_policy_loss_geo_mean``): ``-A_b * exp(mean_t clip_A(logp - old))`` per row.

    The token log-ratio is clipped to [-clip_low, clip_high] in log space only in the direction
    that would increase the objective (sign of A, as PPO), averaged over the row's real tokens;
    A_b is the row's mean advantage. The row loss is broadcast over its real tokens before
    ``agg``: ``seq_mean_token_mean`` reproduces verl/GMPO (mean over rows). Paper clips: 0.4.
    """
    name = "geo_mean"
    inp = _prepare(name, locals())
    _opt(name, "clip_low", clip_low)
    _opt(name, "clip_high", clip_high)
    log_ratio = inp.lp - inp.old
    sign = torch.sign(inp.adv)
    clamped = torch.clamp(log_ratio, -clip_low, clip_high)
    log_ratio_min = sign * torch.min(sign * log_ratio, sign * clamped)
    lengths = inp.real.sum(-1).to(_count_dtype(inp.lp.dtype)).clamp(min=1.0)
    seq_ratio = torch.exp(log_ratio_min.sum(-1) / lengths)
    seq_adv = inp.adv.sum(-1) / lengths
    per_token = (-seq_adv * seq_ratio).unsqueeze(-1).expand_as(inp.lp)
    clipped = log_ratio != clamped
    metrics = {"clip_frac_high": _mean(clipped & (inp.adv > 0), inp.real),
               "clip_frac_low": _mean(clipped & (inp.adv < 0), inp.real)}
    return _finish(name, inp, per_token, kl_coef, metrics)


def _covariance(inp: _Inputs) -> torch.Tensor:
    """Per-token ``(A - mean A) * (logp - mean logp)`` over real tokens (detached; verl's cov)."""
    count = inp.real.sum().clamp(min=1)
    adv, lp = inp.adv.detach(), inp.lp.detach()
    return (adv - adv.sum() / count) * (lp - lp.sum() / count)


def kl_cov(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
           mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
           kl_cov_ratio: float = 2e-4, kl_cov_coef: float = 1.0, kl_coef: float = 0.0,
           norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """KL-Cov (verl ``compute_policy_loss_kl_cov``): ``-r*A``, plus ``kl_cov_coef*|logp - old|``
    on the ``max(1, int(N * kl_cov_ratio))`` real tokens of largest cov(A, logp)."""
    name = "kl_cov"
    inp = _prepare(name, locals())
    _opt(name, "kl_cov_ratio", kl_cov_ratio, strict=True, maximum=1.0)
    _opt(name, "kl_cov_coef", kl_cov_coef)
    log_ratio = inp.lp - inp.old
    per_token = -inp.adv * torch.exp(log_ratio)
    with torch.no_grad():
        real_idx = torch.nonzero(inp.real.reshape(-1)).squeeze(-1)
        selected = torch.zeros(inp.real.numel(), dtype=torch.bool, device=inp.lp.device)
        if real_idx.numel():
            cov = _covariance(inp).reshape(-1)[real_idx]
            k = max(1, int(real_idx.numel() * kl_cov_ratio))
            selected[real_idx[torch.topk(cov, k).indices]] = True
        selected = selected.view_as(inp.real)
    per_token = torch.where(selected, per_token + kl_cov_coef * log_ratio.abs(), per_token)
    metrics = {"kl_cov_frac": _mean(selected, inp.real), "approx_kl_abs": _mean(log_ratio.abs(), inp.real)}
    return _finish(name, inp, per_token, kl_coef, metrics)


def clip_cov(log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, advantages: torch.Tensor,
             mask: torch.Tensor, *, agg: str = "token_mean", ref_log_probs: torch.Tensor | None = None,
             clip_low: float = 0.2, clip_high: float = 0.2, clip_cov_ratio: float = 2e-4,
             clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, generator: torch.Generator | None = None,
             kl_coef: float = 0.0, norm_constant: Any = None, **unknown: Any) -> PolicyLoss:
    """Clip-Cov (verl ``compute_policy_loss_clip_cov``): PPO-clip loss with the gradient cut on
    ``max(1, int(N * clip_cov_ratio))`` random unclipped real tokens whose cov(A, logp) lies in
    (clip_cov_lb, clip_cov_ub). Pass a CPU ``generator`` for a reproducible choice."""
    name = "clip_cov"
    inp = _prepare(name, locals())
    _clip_opts(name, clip_low, clip_high)
    _opt(name, "clip_cov_ratio", clip_cov_ratio, strict=True, maximum=1.0)
    _opt(name, "clip_cov_lb", clip_cov_lb, minimum=-math.inf)
    _opt(name, "clip_cov_ub", clip_cov_ub, minimum=clip_cov_lb, strict=True)
    ratio = torch.exp(inp.lp - inp.old)
    pg_losses1 = -inp.adv * ratio
    pg_losses2 = -inp.adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    with torch.no_grad():
        clipped = (pg_losses2 > pg_losses1) & inp.real
        cov = _covariance(inp)
        candidates = inp.real & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        idx = torch.nonzero(candidates.reshape(-1)).squeeze(-1)
        keep = torch.ones(inp.real.numel(), dtype=inp.lp.dtype, device=inp.lp.device)
        if idx.numel():
            n_cut = max(int(clip_cov_ratio * int(inp.real.sum())), 1)
            order = torch.randperm(idx.numel(), generator=generator, device="cpu").to(idx.device)
            keep[idx[order[:n_cut]]] = 0
        keep = keep.view_as(inp.lp)
    per_token = torch.maximum(pg_losses1, pg_losses2) * keep
    metrics = {"clip_cov_frac": _mean(keep == 0, inp.real), "clip_frac": _mean(clipped, inp.real)}
    return _finish(name, inp, per_token, kl_coef, metrics)


POLICY_LOSSES: dict[str, Callable[..., PolicyLoss]] = {
    "ppo_clip": ppo_clip, "gspo": gspo, "cispo": cispo, "policy_gradient": policy_gradient,
    "gpg": gpg, "sapo": sapo, "geo_mean": geo_mean, "kl_cov": kl_cov, "clip_cov": clip_cov,
}
"""Every objective by name (for the plugin wiring)."""
