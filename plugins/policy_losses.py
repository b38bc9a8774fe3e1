"""Built-in policy losses (family ``policy_losses``).

Each component is called as ``loss(log_probs, old_log_probs, advantages, mask, *,
ref_log_probs=None)`` and returns :class:`rlhf_plugins.sdk.PolicyLoss` (``.loss`` a scalar
differentiable in ``log_probs``, ``.metrics`` a dict of floats). ``log_probs``,
``old_log_probs`` (None = on-policy) and ``mask`` are [B, T]; ``advantages`` is [B] or [B, T].
The math lives in :mod:`rlhf_plugins.policy_objectives`; these classes declare the options
(typed, validated, listed by ``rlhf-plugins components policy_losses --json``) and call it.

Every loss has ``agg`` (verl's ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum``,
``seq_mean_token_sum_norm``), ``kl_coef`` and ``norm_constant``; ``ppo_clip`` with its
defaults and ``norm_constant`` = TRL's normaliser is TRL 1.16's default (``dapo``) loss.

Importing this module does not import torch (the objectives load it when called).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import hookimpl
from rlhf_plugins.policy_loss_base import AggMode, PolicyObjective, check_number
from rlhf_plugins.sdk import option

__all__ = ["BUILTIN_POLICY_LOSSES", "CISPO", "ClipCov", "GPG", "GSPO", "GeoMean", "KLCov",
           "PPOClip", "PolicyGradient", "SAPO"]


def _check_clips(loss: PolicyObjective, low_none_ok: bool = False) -> None:
    """clip_low in [0, 1] (ratio floor 1 - clip_low >= 0), clip_high >= 0."""
    check_number("clip_low", getattr(loss, "clip_low"), maximum=1.0, none_ok=low_none_ok)
    check_number("clip_high", getattr(loss, "clip_high"))


@dataclass(frozen=True)
class PPOClip(PolicyObjective):
    """PPO/GRPO clipped surrogate; defaults reproduce TRL's GRPOTrainer loss exactly."""

    name: ClassVar[str] = "ppo_clip"
    description: ClassVar[str] = ("PPO/GRPO clipped surrogate -min(r*A, clip(r)*A) (clip-higher, "
                                  "dual-clip); TRL's GRPOTrainer loss with the defaults")

    clip_low: float = option(0.2, help="lower clip: ratio floor 1 - clip_low (TRL epsilon)")
    clip_high: float = option(0.2, help="upper clip: ratio cap 1 + clip_high (TRL epsilon_high; "
                                        "larger = clip-higher, DAPO uses 0.28)")
    dual_clip: float | None = option(None, help="dual-clip constant c > 1: caps the loss of "
                                                "negative-advantage tokens at -c*A (off = null)")
    delta: float | None = option(None, help="upper cap of the unclipped ratio (TRL delta, "
                                            "INTELLECT-2; off = null)")

    def validate_options(self) -> None:
        """Clip ranges; dual_clip > 1; delta > 0."""
        super().validate_options()
        _check_clips(self)
        check_number("dual_clip", self.dual_clip, minimum=1.0, strict=True, none_ok=True)
        check_number("delta", self.delta, strict=True, none_ok=True)


@dataclass(frozen=True)
class GSPO(PolicyObjective):
    """GSPO: the clipped sequence-level ratio exp(mean_t(log_probs - old_log_probs))."""

    name: ClassVar[str] = "gspo"
    description: ClassVar[str] = ("GSPO: PPO clipping of the sequence ratio "
                                  "exp(mean_t(logp - old_logp)) (TRL importance_sampling_level=sequence)")

    agg: AggMode = option("seq_mean_token_mean", help="aggregation (the paper: seq_mean_token_mean)")
    clip_low: float = option(3e-4, help="lower clip of the sequence ratio (paper: 3e-4)")
    clip_high: float = option(4e-4, help="upper clip of the sequence ratio (paper: 4e-4)")

    def validate_options(self) -> None:
        """Clip ranges."""
        super().validate_options()
        _check_clips(self)


@dataclass(frozen=True)
class CISPO(PolicyObjective):
    """CISPO: a clipped, stop-gradient importance weight times advantages * log_probs."""

    name: ClassVar[str] = "cispo"
    description: ClassVar[str] = ("CISPO (MiniMax-M1): -sg(clip(r)) * A * logp; every token keeps "
                                  "a gradient")

    clip_low: float | None = option(None, help="lower clip of the weight (null = none, the paper)")
    clip_high: float = option(4.0, help="weight cap 1 + clip_high (TRL epsilon_high - 1; 4.0 = "
                                        "TRL's recommended 5.0)")

    def validate_options(self) -> None:
        """Clip ranges (clip_low may be null)."""
        super().validate_options()
        _check_clips(self, low_none_ok=True)


@dataclass(frozen=True)
class PolicyGradient(PolicyObjective):
    """Importance-weighted policy gradient -r * A, without clipping."""

    name: ClassVar[str] = "policy_gradient"
    description: ClassVar[str] = "Importance-weighted policy gradient -r*A (no clipping)"


@dataclass(frozen=True)
class GPG(PolicyObjective):
    """GPG: the plain REINFORCE surrogate -log_probs * A."""

    name: ClassVar[str] = "gpg"
    description: ClassVar[str] = "GPG (verl): plain REINFORCE surrogate -logp*A, no ratio"


@dataclass(frozen=True)
class SAPO(PolicyObjective):
    """SAPO: a soft sigmoid gate on the ratio instead of a hard clip."""

    name: ClassVar[str] = "sapo"
    description: ClassVar[str] = ("SAPO: soft gate -(4/tau)*sigmoid(tau*(r-1))*A, temperature by "
                                  "advantage sign (TRL loss_type=sapo)")

    agg: AggMode = option("seq_mean_token_mean", help="aggregation (TRL aggregates sapo as grpo: "
                                                  "seq_mean_token_mean)")
    tau_pos: float = option(1.0, help="gate temperature for positive advantages (> 0)")
    tau_neg: float = option(1.05, help="gate temperature for non-positive advantages (> 0)")

    def validate_options(self) -> None:
        """Temperatures > 0."""
        super().validate_options()
        check_number("tau_pos", self.tau_pos, strict=True)
        check_number("tau_neg", self.tau_neg, strict=True)


@dataclass(frozen=True)
class GeoMean(PolicyObjective):
    """GMPO: the geometric mean of the clipped token ratios of each sequence."""

    name: ClassVar[str] = "geo_mean"
    description: ClassVar[str] = ("GMPO (verl geo_mean): -A * exp(mean_t of the clipped token "
                                  "log-ratios) per sequence")

    agg: AggMode = option("seq_mean_token_mean", help="aggregation (verl/GMPO: seq_mean_token_mean)")
    clip_low: float = option(0.4, help="log-ratio clip below (paper: 0.4)")
    clip_high: float = option(0.4, help="log-ratio clip above (paper: 0.4)")

    def validate_options(self) -> None:
        """Log-space clips >= 0."""
        super().validate_options()
        check_number("clip_low", self.clip_low)
        check_number("clip_high", self.clip_high)


@dataclass(frozen=True)
class KLCov(PolicyObjective):
    """KL-Cov: -r * A plus a |log-ratio| penalty on the tokens of largest cov(A, log_probs)."""

    name: ClassVar[str] = "kl_cov"
    description: ClassVar[str] = ("KL-Cov (verl): -r*A plus kl_cov_coef*|logp - old| on the "
                                  "top-covariance tokens")

    kl_cov_ratio: float = option(2e-4, help="fraction of real tokens penalised (0, 1]")
    kl_cov_coef: float = option(1.0, help="penalty coefficient (>= 0)")

    def validate_options(self) -> None:
        """kl_cov_ratio in (0, 1]; kl_cov_coef >= 0."""
        super().validate_options()
        check_number("kl_cov_ratio", self.kl_cov_ratio, strict=True, maximum=1.0)
        check_number("kl_cov_coef", self.kl_cov_coef)


@dataclass(frozen=True)
class ClipCov(PolicyObjective):
    """Clip-Cov: PPO-clip with the gradient cut on random high-covariance tokens."""

    name: ClassVar[str] = "clip_cov"
    description: ClassVar[str] = ("Clip-Cov (verl): PPO clip, gradient cut on random tokens whose "
                                  "cov(A, logp) lies in (clip_cov_lb, clip_cov_ub)")

    clip_low: float = option(0.2, help="lower PPO clip")
    clip_high: float = option(0.2, help="upper PPO clip")
    clip_cov_ratio: float = option(2e-4, help="fraction of real tokens whose gradient is cut (0, 1]")
    clip_cov_lb: float = option(1.0, help="covariance lower bound of the candidates")
    clip_cov_ub: float = option(5.0, help="covariance upper bound of the candidates (> lb)")
    seed: int | None = option(None, help="seed of the token choice (null: torch's global RNG)")
    _generator: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def validate_options(self) -> None:
        """Clip ranges; clip_cov_ratio in (0, 1]; clip_cov_ub > clip_cov_lb."""
        super().validate_options()
        _check_clips(self)
        check_number("clip_cov_ratio", self.clip_cov_ratio, strict=True, maximum=1.0)
        check_number("clip_cov_lb", self.clip_cov_lb, minimum=-float("inf"))
        check_number("clip_cov_ub", self.clip_cov_ub, minimum=self.clip_cov_lb, strict=True)

    def loss_options(self) -> dict[str, Any]:
        """Every option but `seed`, plus a CPU generator seeded once per configured component."""
        kwargs = dict(self.options)
        seed = kwargs.pop("seed")
        if seed is not None:
            if self._generator is None:  # lazily: creating a generator imports torch
                import torch

                object.__setattr__(self, "_generator", torch.Generator().manual_seed(seed))
            kwargs["generator"] = self._generator
        return kwargs


BUILTIN_POLICY_LOSSES: tuple[type[PolicyObjective], ...] = (
    PPOClip, GSPO, CISPO, PolicyGradient, GPG, SAPO, GeoMean, KLCov, ClipCov)


@hookimpl
def register_policy_losses(register):
    """Register the built-in policy losses."""
    for cls in BUILTIN_POLICY_LOSSES:
        register(cls())
