"""The run-time contract of the policy_losses family (rlhf_plugins/policy_loss_contract.py):
every built-in passes it unchanged; a loss returning a per-token loss, a detached loss, no
tensor, non-numeric metrics, or raising is one ComponentError naming the loss, checked at the
call (before: torch's "grad can be implicitly created only for scalar outputs" from TRL's
backward, or a step that trained nothing)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from rlhf_plugins import registry
from rlhf_plugins.errors import ComponentError
from rlhf_plugins.policy_loss_base import PolicyObjective
from rlhf_plugins.policy_loss_contract import call_policy_loss
from rlhf_plugins.sdk import PolicyLoss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(3, 5, generator=g)).requires_grad_(True)
    old = logps.detach() + 0.05 * torch.randn(3, 5, generator=g)
    ref = logps.detach() + 0.05 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    return logps, old, adv, mask, ref


@pytest.mark.parametrize("name", sorted(registry().policy_losses.names()))
def test_every_built_in_policy_loss_passes_the_contract_unchanged(name):
    loss = registry().policy_losses.get(name)
    logps, old, adv, mask, ref = _batch()
    direct = loss(logps, old, adv, mask, ref_log_probs=ref)
    checked = call_policy_loss(loss, logps, old, adv, mask, ref_log_probs=ref)
    assert checked.loss.numel() == 1 and checked.loss.requires_grad
    torch.testing.assert_close(checked.loss, direct.loss, rtol=0, atol=0)
    checked.loss.backward()
    assert logps.grad is not None and torch.isfinite(logps.grad).all()


@dataclass(frozen=True)
class _Broken(PolicyObjective):
    """A policy loss returning whatever `mode` says."""

    name: ClassVar[str] = "test_broken_pg"
    description: ClassVar[str] = "test: a policy loss breaking the contract"
    mode: str = "per_token"

    def __call__(self, log_probs, old_log_probs, advantages, mask, *, ref_log_probs=None, **kw):
        per_token = -advantages[:, None] * log_probs * mask
        if self.mode == "per_token":
            return PolicyLoss(per_token)
        if self.mode == "detached":
            return PolicyLoss(per_token.sum().detach())
        if self.mode == "float":
            return PolicyLoss(float(per_token.sum()))
        if self.mode == "metrics":
            return PolicyLoss(per_token.sum(), {"clip": [0.1, 0.2]})
        if self.mode == "tuple":
            return per_token.sum(), {}
        raise KeyError("ratio")


@pytest.mark.parametrize("mode, needle", [
    ("per_token", "returned a loss of shape [3, 5] for log-probs of shape [3, 5]; expected one number"),
    ("detached", "returned a loss that does not depend on the model's outputs (detached)"),
    ("float", "returned a loss of type float, expected a tensor holding one number"),
    ("metrics", "returned .metrics {'clip': [0.1, 0.2]}; expected a mapping of names to numbers"),
    ("tuple", "returned tuple, expected a PolicyLoss(loss, metrics)"),
    ("raise", "raised KeyError in __call__(): 'ratio'"),
])
def test_a_loss_breaking_the_contract_is_one_error_naming_it(mode, needle):
    logps, old, adv, mask, ref = _batch()
    with pytest.raises(ComponentError, match=r"policy loss 'test_broken_pg' " + re.escape(needle)):
        call_policy_loss(_Broken(mode=mode), logps, old, adv, mask, ref_log_probs=ref)


def test_a_detached_loss_is_fine_without_gradients():
    """Evaluation runs under no_grad: a loss there carries no gradient and that is no error."""
    logps, old, adv, mask, ref = _batch()
    with torch.no_grad():
        result = call_policy_loss(registry().policy_losses.get("ppo_clip"), logps, old, adv, mask,
                                  ref_log_probs=ref)
    assert not result.loss.requires_grad
