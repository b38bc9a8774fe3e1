"""The shape contract between a trainer and an advantage estimator, enforced at every call.

- An estimator that does not declare ``uses_token_rewards`` gets ``[B]`` sequence rewards: when
  the rollout's rewards are per token (``[B, T]``: KL in the reward, dense step rewards), each
  row is summed over its real tokens (``mask == 1``) first. One declaring it gets them as they are.
- The result's ``advantages`` must be ``[B]`` or ``[B, T]`` (T: the mask's width) and its
  ``returns`` None or ``[B, T]``; anything else is a ComponentError naming the plugin and the
  shapes. A ``[B]`` result for ``[B, T]`` rewards is spread over each row's real tokens (0 on
  padding), which is what the built-in sequence-level estimators return for ``[B, T]`` rewards.

Light module: torch is imported inside the call.
"""
from __future__ import annotations

from typing import Any

from .advantage_types import Advantages
from .errors import ComponentError
from .guard import contract_error, guarded
from .protocols import member

__all__ = ["call_estimator", "sequence_rewards"]

FAMILY = "advantage_estimators"


def sequence_rewards(rewards: Any, mask: Any) -> Any:
    """[B] rewards: each row of [B, T] `rewards` summed over its real tokens (NaN there stays NaN)."""
    import torch

    real = mask.to(rewards.device) != 0
    return torch.where(real, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)).sum(dim=1)


def call_estimator(estimator: Any, rewards: Any, *, mask: Any, **kwargs: Any) -> Advantages:
    """`estimator(rewards, mask=mask, **kwargs)` under the shape contract (see the module docstring).

    `rewards` is [B] or [B, T], `mask` [B, T]. Errors raised inside the estimator, and results of
    the wrong shape, are ComponentErrors naming it.
    """
    token_level = rewards.dim() == 2
    given = rewards
    if token_level and not member(estimator, FAMILY, "uses_token_rewards"):
        given = sequence_rewards(rewards, mask)
    with guarded(estimator, FAMILY, "__call__()"):
        result = estimator(given, mask=mask, **kwargs)
    batch, length = mask.shape[0], mask.shape[1]
    advantages = _tensor(estimator, result, "advantages")
    returns = None if getattr(result, "returns", None) is None else _tensor(estimator, result, "returns")
    got = list(given.shape)
    if tuple(advantages.shape) not in ((batch,), (batch, length)):
        raise _shape_error(estimator, "advantages", advantages, f"[B] = {[batch]} or [B, T] = "
                           f"{[batch, length]}", got)
    if returns is not None and tuple(returns.shape) != (batch, length):
        raise _shape_error(estimator, "returns", returns, f"None or [B, T] = {[batch, length]}", got)
    if token_level and advantages.dim() == 1:
        advantages = advantages[:, None] * mask.to(device=advantages.device, dtype=advantages.dtype)
    return Advantages(advantages, returns)


def _tensor(estimator: Any, result: Any, field: str) -> Any:
    """`result.<field>` as a tensor; ComponentError when the result has none or it is not numeric."""
    import torch

    if not hasattr(result, field):
        raise contract_error(estimator, FAMILY, f"returned {type(result).__name__}, expected "
                                                "Advantages(advantages, returns)")
    value = getattr(result, field)
    if isinstance(value, torch.Tensor):
        return value
    with guarded(estimator, FAMILY, f"__call__() result .{field}"):
        return torch.as_tensor(value)


def _shape_error(estimator: Any, field: str, value: Any, expected: str, given: list[int]) -> ComponentError:
    return contract_error(estimator, FAMILY, f"returned {field} of shape {list(value.shape)} for "
                                             f"rewards of shape {given}; expected {expected}")
