"""More advantage estimators (family ``advantage_estimators``) as SDK components, no hook yet.

``reinforce_plus_plus``, ``reinforce_plus_plus_baseline``, ``opo``, ``grpo_passk``, ``gpg``,
``gdpo`` and ``remax``, each called as ``est(rewards, *, num_generations=1, mask=None,
values=None, gamma=1.0, lam=0.95)`` (plus ``reward_components``/``reward_weights`` for gdpo and
``baseline_rewards`` for remax) and delegating to :mod:`rlhf_plugins.advantage_math`.

Conventions (those of ``plugins/advantages.py``):

- ``rewards`` is [B] or [B, T]; groups are consecutive blocks of ``num_generations`` rows.
- Sequence-level estimators given [B, T] rewards use each row's sum over its real tokens and
  return [B, T] advantages (broadcast over real tokens, 0 on padding); given [B] rewards they
  return [B] - except ``opo``, ``reinforce_plus_plus_baseline`` and ``gdpo``, whose statistics
  weigh tokens and which return [B, T] whenever a ``mask`` is given (verl's shape).
- ``mask=None`` means every token is real ([B] rewards: one token per completion).
- NaN rewards are unscorable: left out of the statistics, advantage 0.

Torch is imported inside the calls: importing this module stays torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import ConfigError, DataError
from rlhf_plugins.sdk import AdvantageEstimator, Advantages, option

__all__ = ["GDPO", "GPG", "GRPOPassK", "MORE_ESTIMATORS", "OPO", "ReMax", "ReinforcePlusPlus",
           "ReinforcePlusPlusBaseline"]


def _tensor(rewards: Any) -> Any:
    import torch

    t = rewards if isinstance(rewards, torch.Tensor) else torch.as_tensor(rewards)
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _real(name: str, mask: Any, batch: int, length: int) -> Any:
    """`mask` as bool [B, T] (all True when None); DataError for a wrong shape or values."""
    import torch

    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    mask = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise DataError(f"advantage {name!r}: mask must be [B, T] with B={batch}, "
                        f"got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise DataError(f"advantage {name!r}: mask must hold only 0/1")
        mask = mask != 0
    return mask


def _sequence_rewards(name: str, rewards: Any, mask: Any) -> tuple[Any, Any, bool]:
    """([B] rewards, mask or None, token_level): [B, T] rewards are summed over real tokens."""
    import torch

    r = _tensor(rewards)
    if r.dim() == 1:
        return r, mask, False
    if r.dim() != 2:
        raise DataError(f"advantage {name!r}: rewards must be [B] or [B, T], got {list(r.shape)}")
    real = _real(name, mask, r.shape[0], r.shape[1]).to(r.device)
    if tuple(real.shape) != tuple(r.shape):
        raise DataError(f"advantage {name!r}: rewards {list(r.shape)} and mask {list(real.shape)} "
                        "must have the same shape")
    # a NaN at a real token makes the whole completion unscorable (NaN sum)
    summed = torch.where(real, r, torch.zeros((), dtype=r.dtype, device=r.device)).sum(-1)
    return summed, real, True


def _squeeze(adv: Advantages, squeeze: bool) -> Advantages:
    """Drop the dummy token dim added for [B] rewards without a mask."""
    return Advantages(adv.advantages[:, 0], adv.returns) if squeeze else adv


@dataclass(frozen=True)
class ReinforcePlusPlus(AdvantageEstimator):
    """REINFORCE++: discounted returns-to-go of token rewards, whitened over the batch's tokens."""

    name: ClassVar[str] = "reinforce_plus_plus"
    description: ClassVar[str] = ("REINFORCE++: discounted returns-to-go of (token) rewards, "
                                  "whitened over all real tokens of the batch")
    #: [B, T] rewards (dense step rewards, KL shaping) are credited at their own tokens
    uses_token_rewards: ClassVar[bool] = True

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """[B, T] advantages ([B] for [B] rewards and no mask); [B] rewards sit on the last real token."""
        import torch

        from rlhf_plugins.advantage_math import reinforce_plus_plus

        r = _tensor(rewards)
        squeeze = r.dim() == 1 and mask is None
        if r.dim() == 1:
            real = _real(self.name, mask, r.shape[0], 1).to(r.device)
            last = real.shape[1] - 1 - real.flip(1).to(torch.int8).argmax(dim=1)
            token = torch.zeros(real.shape, dtype=r.dtype, device=r.device)
            token.scatter_(1, last[:, None], r[:, None])
            unscorable = torch.isnan(r) | ~real.any(dim=1)
        elif r.dim() == 2:
            real = _real(self.name, mask, r.shape[0], r.shape[1]).to(r.device)
            if tuple(real.shape) != tuple(r.shape):
                raise DataError(f"advantage {self.name!r}: rewards {list(r.shape)} and mask "
                                f"{list(real.shape)} must have the same shape")
            token = r
            unscorable = (torch.isnan(r) & real).any(dim=1)
        else:
            raise DataError(f"advantage {self.name!r}: rewards must be [B] or [B, T], "
                            f"got {list(r.shape)}")
        keep = real & ~unscorable[:, None]  # unscorable rows: out of the whitening, advantage 0
        token = torch.where(keep, token, torch.zeros((), dtype=r.dtype, device=r.device))
        return _squeeze(reinforce_plus_plus(token, keep, gamma=gamma), squeeze)


@dataclass(frozen=True)
class ReinforcePlusPlusBaseline(AdvantageEstimator):
    """REINFORCE++-baseline: reward minus the group mean, whitened over the batch's tokens."""

    name: ClassVar[str] = "reinforce_plus_plus_baseline"
    description: ClassVar[str] = ("REINFORCE++-baseline: reward minus group mean, whitened over all "
                                  "real tokens of the batch")

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """[B, T] advantages ([B] without a mask)."""
        from rlhf_plugins.advantage_math import reinforce_plus_plus_baseline

        seq, real, _ = _sequence_rewards(self.name, rewards, mask)
        squeeze = real is None
        real = _real(self.name, real, seq.shape[0], 1)
        return _squeeze(reinforce_plus_plus_baseline(seq, real, num_generations), squeeze)


@dataclass(frozen=True)
class OPO(AdvantageEstimator):
    """OPO: reward minus the length-weighted group mean sum_i L_i r_i / sum_i L_i."""

    name: ClassVar[str] = "opo"
    description: ClassVar[str] = "OPO: reward minus the length-weighted group mean reward"

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """[B, T] advantages ([B] without a mask: equal lengths, the plain group mean)."""
        from rlhf_plugins.advantage_math import opo

        seq, real, _ = _sequence_rewards(self.name, rewards, mask)
        squeeze = real is None
        real = _real(self.name, real, seq.shape[0], 1)
        return _squeeze(opo(seq, real, num_generations), squeeze)


@dataclass(frozen=True)
class GRPOPassK(AdvantageEstimator):
    """Pass@k: only each group's best completion gets an advantage, r_max - r_second."""

    name: ClassVar[str] = "grpo_passk"
    description: ClassVar[str] = ("Pass@k GRPO: the best completion of each group gets "
                                  "(r_max - r_second) / std; the others 0")

    norm_adv_by_std: bool = option(True, help="divide by the group std + epsilon (verl's default)")
    epsilon: float = option(1e-6, help="added to the group std (>= 0)")

    def validate_options(self) -> None:
        """epsilon is a finite number >= 0."""
        _non_negative("epsilon", self.epsilon)

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """[B] advantages ([B, T] for [B, T] rewards); num_generations must be >= 2."""
        from rlhf_plugins.advantage_math import grpo_passk

        seq, real, token_level = _sequence_rewards(self.name, rewards, mask)
        return grpo_passk(seq, num_generations, mask=real if token_level else None,
                          norm_adv_by_std=self.norm_adv_by_std, epsilon=self.epsilon)


@dataclass(frozen=True)
class GPG(AdvantageEstimator):
    """GPG: (r - group mean) rescaled by B / (number of non-zero rewards) / f_norm."""

    name: ClassVar[str] = "gpg"
    description: ClassVar[str] = ("GPG: reward minus group mean, times B / #non-zero rewards "
                                  "(divided by f_norm)")

    f_norm: float = option(1.0, help="normalising divisor (> 0)")

    def validate_options(self) -> None:
        """f_norm is a finite number > 0."""
        _non_negative("f_norm", self.f_norm, strict=True)

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """[B] advantages ([B, T] for [B, T] rewards)."""
        from rlhf_plugins.advantage_math import gpg

        seq, real, token_level = _sequence_rewards(self.name, rewards, mask)
        return gpg(seq, num_generations, real if token_level else None, f_norm=self.f_norm)


@dataclass(frozen=True)
class GDPO(AdvantageEstimator):
    """GDPO: each reward function normalised within its group, weighted sum, batch-whitened."""

    name: ClassVar[str] = "gdpo"
    description: ClassVar[str] = ("GDPO: per-reward-function group normalisation, weighted sum, "
                                  "batch whitening (needs reward_components)")
    needs_reward_components: ClassVar[bool] = True

    epsilon: float = option(1e-6, help="added to each group std (>= 0; TRL uses 1e-4)")

    def validate_options(self) -> None:
        """epsilon is a finite number >= 0."""
        _non_negative("epsilon", self.epsilon)

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95,
                 reward_components: Any = None, reward_weights: Any = None) -> Advantages:
        """[B] advantages ([B, T] when `mask` is given) from `reward_components` [B, F]."""
        from rlhf_plugins.advantage_math import gdpo

        if reward_components is None:
            raise ConfigError(f"advantage {self.name!r} needs reward_components ([B, F], one column "
                              "per reward function); the trainer passes them to estimators that "
                              "declare needs_reward_components")
        return gdpo(reward_components, reward_weights, num_generations, mask=mask, epsilon=self.epsilon)


@dataclass(frozen=True)
class ReMax(AdvantageEstimator):
    """ReMax: reward minus the reward of the prompt's greedy completion."""

    name: ClassVar[str] = "remax"
    description: ClassVar[str] = ("ReMax: reward minus the reward of a greedy completion of the "
                                  "same prompt (one extra greedy generation per prompt)")
    needs_greedy_baseline: ClassVar[bool] = True

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95,
                 baseline_rewards: Any = None) -> Advantages:
        """[B] advantages ([B, T] for [B, T] rewards); `baseline_rewards` [B]: each row's greedy reward."""
        from rlhf_plugins.advantage_math import remax

        if baseline_rewards is None:
            raise ConfigError(f"advantage {self.name!r} needs baseline_rewards ([B], the reward of a "
                              "greedy completion of each row's prompt); the trainer passes them to "
                              "estimators that declare needs_greedy_baseline")
        seq, real, token_level = _sequence_rewards(self.name, rewards, mask)
        return remax(seq, baseline_rewards, real if token_level else None)


def _non_negative(label: str, value: Any, strict: bool = False) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (strict and value == 0):
        raise ValueError(f"{label} must be a finite number {'>' if strict else '>='} 0, got {value!r}")


MORE_ESTIMATORS: tuple[type[AdvantageEstimator], ...] = (
    ReinforcePlusPlus, ReinforcePlusPlusBaseline, OPO, GRPOPassK, GPG, GDPO, ReMax)
"""The classes to register (``register(cls())`` for each)."""
