"""The contract between the `dpo` stage's trainer and a preference loss, checked at every call.

A `preference_losses` component is called as ``loss(chosen_logps, rejected_logps,
ref_chosen_logps, ref_rejected_logps, **lengths)`` on ``[B]`` tensors. Its result must have
``losses``, ``chosen_rewards`` and ``rejected_rewards`` of shape ``[B]`` (numbers, finite or not:
a NaN is the loss's own business) and ``metrics`` a mapping of names to numbers. Anything else,
and any exception raised inside the loss, is a ComponentError naming the plugin, the field and
the shapes, instead of a broadcast that silently trains on the wrong per-pair losses (a ``[B, 1]``
against ``[B]`` weights) or a crash deep in TRL's logging.

Light module: torch is imported inside the call.
"""
from __future__ import annotations

from typing import Any, Mapping

from .guard import check_metrics, contract_error, guarded

__all__ = ["call_preference_loss"]

FAMILY = "preference_losses"
FIELDS = ("losses", "chosen_rewards", "rejected_rewards")


def call_preference_loss(loss: Any, chosen_logps: Any, rejected_logps: Any, *ref: Any,
                         **lengths: Any) -> Any:
    """`loss(chosen_logps, rejected_logps, *ref, **lengths)` under the contract (module docstring)."""
    import torch

    with guarded(loss, FAMILY, "__call__()"):
        result = loss(chosen_logps, rejected_logps, *ref, **lengths)
    batch = chosen_logps.shape[0]
    for field in FIELDS:
        value = getattr(result, field, None)
        if not isinstance(value, torch.Tensor):
            raise contract_error(loss, FAMILY, f"returned {type(result).__name__} whose .{field} "
                                               f"is {type(value).__name__}, expected a tensor of "
                                               f"shape [B] = [{batch}] (a PreferenceLoss)")
        if tuple(value.shape) != (batch,):
            raise contract_error(loss, FAMILY, f"returned .{field} of shape {list(value.shape)} for "
                                               f"log-probs of shape [{batch}]; expected [B] = "
                                               f"[{batch}] (one value per pair)")
    check_metrics(getattr(result, "metrics", None), loss, FAMILY)
    return result
