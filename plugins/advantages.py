"""Built-in advantage estimators (family ``advantage_estimators``).

Every estimator is an :class:`rlhf_plugins.sdk.AdvantageEstimator` (options are dataclass fields,
range checks in ``validate_options``), called as ``est(rewards, *, num_generations=1, mask=None,
values=None, gamma=1.0, lam=0.95)`` and returning :class:`rlhf_plugins.sdk.Advantages`.

Shared conventions (all estimators):

- ``rewards`` is [B] (one scalar per completion) or [B, T] (per-token, e.g. KL-shaped);
  ``mask`` [B, T] marks real completion tokens (1) vs padding (0); None means "all real".
- Groups are consecutive blocks of ``num_generations`` rows (TRL's layout): rows
  ``[g*K, (g+1)*K)`` are the K completions of prompt g. ``B % K != 0`` is a DataError.
- Sequence-level estimators (grpo, dr_grpo, rloo, reinforce, reinforce_baseline) given [B]
  rewards return [B] advantages. Given [B, T] rewards they first sum the masked per-token
  rewards into one reward per sequence, compute the [B] advantages, and return them broadcast
  over the real tokens as [B, T] (0 on padding). ``values``, ``gamma`` and ``lam`` are ignored;
  ``returns`` is None.
- NaN rewards mean "unscorable" (TRL's convention when every reward function returned None):
  they are left out of group/batch baselines and get advantage 0. +/-inf is a DataError.
- Outputs are detached, float32 (float64 if the rewards are float64), on the rewards' device.

Torch is imported inside the calls: importing this module stays torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import ConfigError, DataError, hookimpl
from rlhf_plugins.sdk import AdvantageEstimator, Advantages, option

__all__ = ["GAE", "GRPO", "DrGRPO", "RLOO", "Reinforce", "ReinforceBaseline", "Advantages"]


# --- shared input handling -----------------------------------------------------------------

def _float_dtype(torch: Any, t: Any) -> Any:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prepare(name: str, rewards: Any, num_generations: int, mask: Any) -> tuple[Any, Any]:
    """Validate common inputs; return (rewards as float tensor, mask as bool tensor or None)."""
    import torch

    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ConfigError(f"advantage estimator {name!r}: num_generations must be an int >= 1, "
                          f"got {num_generations!r}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    rewards = rewards.detach()
    rewards = rewards.to(_float_dtype(torch, rewards))
    if rewards.dim() not in (1, 2):
        raise DataError(f"advantage estimator {name!r}: rewards must be [B] or [B, T], got shape "
                        f"{list(rewards.shape)}")
    batch = rewards.shape[0]
    if batch == 0:
        raise DataError(f"advantage estimator {name!r}: empty batch")
    if batch % num_generations != 0:
        raise DataError(f"advantage estimator {name!r}: batch size {batch} is not divisible by "
                        f"num_generations={num_generations} (groups are consecutive blocks)")
    if bool(torch.isinf(rewards).any()):
        raise DataError(f"advantage estimator {name!r}: rewards contain +/-inf")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        mask = mask.detach().to(rewards.device)
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise DataError(f"advantage estimator {name!r}: mask must be [B, T] with B={batch}, "
                            f"got shape {list(mask.shape)}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise DataError(f"advantage estimator {name!r}: mask must hold only 0/1")
            mask = mask != 0
        if rewards.dim() == 2 and rewards.shape != mask.shape:
            raise DataError(f"advantage estimator {name!r}: rewards {list(rewards.shape)} and mask "
                            f"{list(mask.shape)} must have the same shape")
    return rewards, mask


def _nan_group_stats(torch: Any, grouped: Any) -> tuple[Any, Any, Any]:
    """Per-row (count, mean, unbiased std) of `grouped` [G, K] ignoring NaNs (std 0 if count < 2)."""
    scorable = ~torch.isnan(grouped)
    count = scorable.sum(dim=1, keepdim=True)
    zero = torch.zeros((), dtype=grouped.dtype, device=grouped.device)
    filled = torch.where(scorable, grouped, zero)
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    sq = torch.where(scorable, (grouped - mean) ** 2, zero).sum(dim=1, keepdim=True)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), zero)
    return count, mean, std


def _nan_group_constant(torch: Any, grouped: Any) -> Any:
    """[G, 1] True where every scorable reward of the group is equal (zero spread)."""
    inf = torch.tensor(float("inf"), dtype=grouped.dtype, device=grouped.device)
    nan = torch.isnan(grouped)
    hi = torch.where(nan, -inf, grouped).amax(dim=1, keepdim=True)
    lo = torch.where(nan, inf, grouped).amin(dim=1, keepdim=True)
    return (hi == lo) | (hi < lo)  # hi < lo: no scorable entry at all


# --- sequence-level machinery ----------------------------------------------------------------

@dataclass(frozen=True)
class _SequenceEstimator(AdvantageEstimator):
    """A sequence-level estimator: one advantage per completion (see the module docstring)."""

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """Advantages [B] for [B] rewards, or [B, T] (broadcast over real tokens) for [B, T] rewards."""
        import torch

        rewards, mask = _prepare(self.name, rewards, num_generations, mask)
        token_level = rewards.dim() == 2
        if token_level:
            real = mask if mask is not None else torch.ones_like(rewards, dtype=torch.bool)
            # Sum over real tokens; a NaN on a real token makes the sequence unscorable.
            seq = torch.where(real, rewards, torch.zeros((), dtype=rewards.dtype,
                                                         device=rewards.device)).sum(dim=1)
        else:
            seq = rewards
        with torch.no_grad():
            adv = self._sequence_advantages(torch, seq, num_generations)
            adv = torch.nan_to_num(adv, nan=0.0)  # unscorable rows carry no signal
        if token_level:
            adv = adv[:, None] * real.to(adv.dtype)
        return Advantages(advantages=adv, returns=None)

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        raise NotImplementedError


# --- the built-ins ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GRPO(_SequenceEstimator):
    """Group-normalised reward (GRPO): ``(r - mean_group) / (std_group + eps)``.

    Matches TRL's GRPOTrainer: unbiased (Bessel-corrected) standard deviation, ``eps = 1e-4``,
    ``scale="group"`` (TRL ``scale_rewards="group"``) or ``"batch"`` (std over the whole batch,
    mean still per group). A group whose rewards are all equal gets exactly 0 (never NaN), as
    does a group of one (num_generations=1).
    """

    name: ClassVar[str] = "grpo"
    description: ClassVar[str] = "GRPO: reward minus group mean, divided by group std (+eps)"
    eps: float = option(1e-4, help="added to the std before dividing (TRL: 1e-4)")
    scale: str = option("group", help="std over each group ('group') or the whole batch ('batch')")

    def validate_options(self) -> None:
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.scale not in ("group", "batch"):
            raise ValueError(f"scale must be 'group' or 'batch', got {self.scale!r}")

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        grouped = rewards.view(-1, k)
        _, mean, std = _nan_group_stats(torch, grouped)
        if self.scale == "batch":
            _, _, std = _nan_group_stats(torch, rewards.view(1, -1))
        # Equal rewards in a group: exactly 0 (r - mean may be a rounding error, not 0).
        constant = _nan_group_constant(torch, grouped)
        adv = (grouped - mean) / (std + self.eps)
        adv = torch.where(constant, torch.zeros_like(adv), adv)
        return adv.view(-1)


@dataclass(frozen=True)
class DrGRPO(_SequenceEstimator):
    """Dr. GRPO: ``r - mean_group`` (no std scaling; TRL ``scale_rewards="none"``)."""

    name: ClassVar[str] = "dr_grpo"
    description: ClassVar[str] = "Dr. GRPO: reward minus group mean (no std scaling)"

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        grouped = rewards.view(-1, k)
        _, mean, _ = _nan_group_stats(torch, grouped)
        return (grouped - mean).view(-1)


@dataclass(frozen=True)
class RLOO(_SequenceEstimator):
    """REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j`` = ``K/(K-1) * (r_i - mean_group)``.

    With unscorable (NaN) siblings the baseline averages over scorable siblings only (TRL's
    RLOOTrainer); a completion with no scorable sibling gets 0. Needs num_generations >= 2.
    """

    name: ClassVar[str] = "rloo"
    description: ClassVar[str] = "RLOO: reward minus the mean of the other completions of its prompt"

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """RLOO advantages (see the class docstring); num_generations must be >= 2."""
        if isinstance(num_generations, int) and not isinstance(num_generations, bool) \
                and num_generations < 2:
            raise ConfigError(f"advantage estimator 'rloo' needs num_generations >= 2 (a "
                              f"leave-one-out baseline), got {num_generations}")
        return super().__call__(rewards, num_generations=num_generations, mask=mask,
                                values=values, gamma=gamma, lam=lam)

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        grouped = rewards.view(-1, k)
        scorable = ~torch.isnan(grouped)
        count = scorable.sum(dim=1, keepdim=True)
        total = torch.where(scorable, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True)
        others = (count - 1).to(grouped.dtype)
        baseline = (total - grouped) / others  # NaN (0/0) when no scorable sibling -> 0 later
        adv = torch.where(others > 0, grouped - baseline, torch.full_like(grouped, float("nan")))
        return adv.view(-1)


@dataclass(frozen=True)
class Reinforce(_SequenceEstimator):
    """Vanilla REINFORCE: the advantage is the raw reward."""

    name: ClassVar[str] = "reinforce"
    description: ClassVar[str] = "REINFORCE: the raw reward as advantage"

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        return rewards.clone()


@dataclass(frozen=True)
class ReinforceBaseline(_SequenceEstimator):
    """REINFORCE with a batch-mean baseline: ``r - mean_batch(r)`` (NaN rewards excluded)."""

    name: ClassVar[str] = "reinforce_baseline"
    description: ClassVar[str] = "REINFORCE with baseline: reward minus the batch mean reward"

    def _sequence_advantages(self, torch: Any, rewards: Any, k: int) -> Any:
        _, mean, _ = _nan_group_stats(torch, rewards.view(1, -1))
        return rewards - mean.view(())


@dataclass(frozen=True)
class GAE(AdvantageEstimator):
    """Generalised advantage estimation with a critic (PPO).

    Per row, over its real tokens t_1 < ... < t_n (mask == 1, in order; padding anywhere -
    right, left or holes - is skipped, never leaks):
    ``delta_i = r_i + gamma * V_{i+1} - V_i`` (``V_{n+1} = 0``: the episode ends at the last real
    token), ``A_i = delta_i + gamma * lam * A_{i+1}``. [B] rewards are placed on each row's last
    real token (a row without real tokens gets nothing); [B, T] rewards are read at real tokens.
    ``returns = advantages + values`` on real tokens (0 on padding; the critic's targets).
    Rows whose reward is NaN (unscorable) get advantage 0 and returns = values.

    The backward recursion runs in chunks of ``chunk`` tokens (a triangular matmul inside a
    chunk, a loop over chunks); ``chunk=1`` is the plain backward loop over T.
    """

    name: ClassVar[str] = "gae"
    description: ClassVar[str] = "GAE: generalised advantage estimation with a value function (PPO)"
    needs_values: ClassVar[bool] = True
    #: [B, T] rewards (dense step rewards, KL shaping) are credited at their own tokens
    uses_token_rewards: ClassVar[bool] = True
    chunk: int = option(64, help="tokens per block of the backward recursion (1: plain loop; "
                                 "the result is the same)")

    def validate_options(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {self.chunk!r}")

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        """Token-level advantages [B, T] and returns [B, T] from rewards and critic values."""
        import torch

        if values is None:
            raise ConfigError("advantage estimator 'gae' needs values (a critic / value head); "
                              "use a critic-free estimator such as 'grpo' or 'rloo' otherwise")
        for label, x in (("gamma", gamma), ("lam", lam)):
            if not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0):
                raise ConfigError(f"advantage estimator 'gae': {label} must be in [0, 1], got {x!r}")
        rewards, mask = _prepare(self.name, rewards, num_generations, mask)
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(values)
        dtype = rewards.dtype
        values = values.detach().to(device=rewards.device, dtype=dtype)
        batch = rewards.shape[0]
        if values.dim() != 2 or values.shape[0] != batch:
            raise DataError(f"advantage estimator 'gae': values must be [B, T] with B={batch}, got "
                            f"shape {list(values.shape)}")
        if rewards.dim() == 2 and rewards.shape != values.shape:
            raise DataError(f"advantage estimator 'gae': rewards {list(rewards.shape)} and values "
                            f"{list(values.shape)} must have the same shape")
        if mask is None:
            mask = torch.ones_like(values, dtype=torch.bool)
        elif mask.shape != values.shape:
            raise DataError(f"advantage estimator 'gae': mask {list(mask.shape)} and values "
                            f"{list(values.shape)} must have the same shape")
        zero = torch.zeros((), dtype=dtype, device=rewards.device)
        if bool((~torch.isfinite(values) & mask).any()):
            raise DataError("advantage estimator 'gae': values are NaN/inf at real tokens")
        values = torch.where(mask, values, zero)

        with torch.no_grad():
            length = mask.sum(dim=1)
            if rewards.dim() == 1:
                unscorable = torch.isnan(rewards)
                last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)
                token_rewards = torch.zeros_like(values)
                placed = torch.where(unscorable | (length == 0), zero, rewards)
                token_rewards.scatter_(1, last[:, None], placed[:, None])
            else:
                unscorable = (torch.isnan(rewards) & mask).any(dim=1)
                token_rewards = torch.where(mask & ~unscorable[:, None], rewards, zero)

            # Move each row's real tokens to the front (stable order), so padding anywhere is
            # skipped; right-padded batches (the usual case) need no reordering.
            positions = torch.arange(mask.shape[1], device=mask.device)
            prefix = bool((mask == (positions[None, :] < length[:, None])).all())
            if prefix:
                order, r_c, v_c, m_c = None, token_rewards, values, mask
            else:
                order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
                r_c, v_c = token_rewards.gather(1, order), values.gather(1, order)
                m_c = positions[None, :] < length[:, None]
            next_v = torch.cat([v_c[:, 1:] * m_c[:, 1:], torch.zeros_like(v_c[:, :1])], dim=1)
            delta = torch.where(m_c, r_c + gamma * next_v - v_c, zero)
            adv_c = _discounted_reverse_cumsum(torch, delta, gamma * lam, self.chunk)
            if order is None:
                adv = adv_c
            else:
                adv = torch.empty_like(adv_c).scatter_(1, order, adv_c)
            adv = torch.where(mask & ~unscorable[:, None], adv, zero)
            returns = torch.where(mask, adv + values, zero)
        return Advantages(advantages=adv, returns=returns)


def _discounted_reverse_cumsum(torch: Any, x: Any, factor: float, chunk: int) -> Any:
    """``y_t = x_t + factor * y_{t+1}`` along the last dim (y past the end = 0), chunked."""
    batch, length = x.shape
    if length == 0:
        return x.clone()
    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    padded = torch.nn.functional.pad(x, (0, n_chunks * chunk - length))
    blocks = padded.view(batch, n_chunks, chunk)
    idx = torch.arange(chunk, device=x.device)
    gap = idx[:, None] - idx[None, :]  # [k, t] = k - t
    base = torch.tensor(factor, dtype=x.dtype, device=x.device)
    # M[k, t] = factor^(k - t) for k >= t, else 0 (0^0 = 1 keeps factor = 0 exact).
    tri = torch.where(gap >= 0, base ** gap.clamp(min=0).to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    local = blocks @ tri  # within-chunk discounted suffix sums
    carry_scale = base ** (chunk - idx).to(x.dtype)  # factor^(chunk - t): reach the next chunk
    out = torch.empty_like(local)
    carry = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for c in range(n_chunks - 1, -1, -1):
        out[:, c] = local[:, c] + carry[:, None] * carry_scale[None, :]
        carry = out[:, c, 0]
    return out.reshape(batch, -1)[:, :length]


@hookimpl
def register_advantage_estimators(register):
    """Register the built-in advantage estimators."""
    for component in (GAE(), GRPO(), DrGRPO(), RLOO(), Reinforce(), ReinforceBaseline()):
        register(component)
    from .advantage_estimators_more import MORE_ESTIMATORS

    for cls in MORE_ESTIMATORS:
        register(cls())
