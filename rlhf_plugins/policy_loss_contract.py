"""The contract between the `ppo` trainer and a policy loss, checked at every call.

A ``policy_losses`` component is called as ``loss(log_probs, old_log_probs, advantages, mask, *,
ref_log_probs=None, [norm_constant=...])`` on ``[B, T]`` tensors. Its result must have ``loss``:
one number as a tensor (0-dim or one element), differentiable in ``log_probs`` while they carry
a gradient, and ``metrics``: a mapping of names to numbers. Anything else, and any exception
raised inside the loss, is a ComponentError naming the loss, its plugin and what it returned,
instead of torch's "grad can be implicitly created only for scalar outputs" from TRL's backward
(a per-token ``[B, T]`` loss), a step that silently trains nothing (a detached loss), or a crash
in the trainer's logging (a metric that is not a number).

Light module: torch is imported inside the call.
"""
from __future__ import annotations

from typing import Any, Mapping

from .guard import check_loss, check_metrics, contract_error, guarded

__all__ = ["call_policy_loss"]

FAMILY = "policy_losses"


def call_policy_loss(loss: Any, log_probs: Any, old_log_probs: Any, advantages: Any, mask: Any,
                     **kwargs: Any) -> Any:
    """`loss(log_probs, old_log_probs, advantages, mask, **kwargs)` under the contract (module
    docstring); returns its result."""
    import torch

    with guarded(loss, FAMILY, "__call__()"):
        result = loss(log_probs, old_log_probs, advantages, mask, **kwargs)
    if not hasattr(result, "loss"):
        raise contract_error(loss, FAMILY, f"returned {type(result).__name__}, expected a "
                                           "PolicyLoss(loss, metrics)")
    check_loss(result.loss, loss, FAMILY,
               needs_grad=torch.is_grad_enabled() and bool(getattr(log_probs, "requires_grad", False)),
               given=f" for log-probs of shape {list(log_probs.shape)}")
    check_metrics(getattr(result, "metrics", None), loss, FAMILY)
    return result
