"""Built-in preference losses (family ``preference_losses``): DPO and its variants.

Each component is called as ``loss(chosen_logps, rejected_logps, ref_chosen_logps=None,
ref_rejected_logps=None, *, chosen_lengths=None, rejected_lengths=None)`` on summed completion
log-probs ``[B]`` and returns :class:`rlhf_plugins.sdk.PreferenceLoss` (per-pair ``.losses``,
``.chosen_rewards``, ``.rejected_rewards``, ``.metrics``). The base class forms the log-ratios
``chosen = chosen_logps - ref_chosen_logps`` and ``rejected = rejected_logps -
ref_rejected_logps``; each class below only writes its per-pair loss on them.

Every loss that TRL 1.16's ``DPOTrainer`` also has (``loss_type``) computes it with the same
tensor operations in the same order, so losses and gradients are bit-equal to TRL's
(tests/test_preference_losses.py runs TRL's own code). ``simpo`` is SimPO (reference-free),
written as in the paper.

Importing this module does not import torch (the losses load it when called).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import hookimpl
from rlhf_plugins.sdk import PreferenceObjective, option

__all__ = ["APOZero", "BCOPair", "BUILTIN_PREFERENCE_LOSSES", "Hinge", "IPO", "NCAPair", "Robust",
           "SPPOHard", "Sigmoid", "SimPO"]


def _check_smoothing(value: Any) -> None:
    """label_smoothing is a finite number in [0, 0.5)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and 0.0 <= value < 0.5):
        raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {value!r}")


def _per_token(logratios: Any, lengths: Any) -> Any:
    """Log-ratios divided by the completion lengths (at least 1), as TRL's ipo does."""
    return logratios / lengths.clamp(min=1.0)


@dataclass(frozen=True)
class Sigmoid(PreferenceObjective):
    """DPO: -log sigmoid(beta * (chosen - rejected log-ratio))."""

    name: ClassVar[str] = "sigmoid"
    description: ClassVar[str] = ("DPO (Rafailov et al.): -logsigmoid(beta * (chosen - rejected "
                                  "log-ratio)); TRL loss_type=sigmoid")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """-logsigmoid(beta * delta)."""
        import torch.nn.functional as F

        return -F.logsigmoid(self.beta * (chosen - rejected))


@dataclass(frozen=True)
class Hinge(PreferenceObjective):
    """SLiC hinge loss: relu(1 - beta * (chosen - rejected log-ratio))."""

    name: ClassVar[str] = "hinge"
    description: ClassVar[str] = ("SLiC hinge: relu(1 - beta * delta), beta = 1/margin; TRL "
                                  "loss_type=hinge")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """relu(1 - beta * delta)."""
        import torch

        return torch.relu(1 - self.beta * (chosen - rejected))


@dataclass(frozen=True)
class IPO(PreferenceObjective):
    """IPO on per-token log-ratios: (chosen/len_c - rejected/len_r - 1/(2 beta))^2."""

    name: ClassVar[str] = "ipo"
    description: ClassVar[str] = ("IPO (Azar et al.): (delta of per-token log-ratios - 1/(2 beta))^2, "
                                  "length-normalised as TRL loss_type=ipo")
    needs_lengths: ClassVar[bool] = True

    def pair_losses(self, chosen: Any, rejected: Any, *, chosen_lengths: Any = None,
                    rejected_lengths: Any = None) -> Any:
        """(mean-per-token delta - 1/(2 beta))^2; beta is the paper's tau."""
        delta = _per_token(chosen, chosen_lengths) - _per_token(rejected, rejected_lengths)
        return (delta - 1 / (2 * self.beta)) ** 2


@dataclass(frozen=True)
class Robust(PreferenceObjective):
    """Robust DPO (rDPO): the DPO loss unbiased for labels flipped with probability label_smoothing."""

    name: ClassVar[str] = "robust"
    description: ClassVar[str] = ("Robust DPO (Chowdhury et al.): DPO unbiased for preference noise "
                                  "label_smoothing; TRL loss_type=robust")

    label_smoothing: float = option(0.0, help="probability that a pair's labels are flipped, "
                                              "in [0, 0.5)")

    def validate_options(self) -> None:
        """beta > 0; label_smoothing in [0, 0.5)."""
        super().validate_options()
        _check_smoothing(self.label_smoothing)

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """((1-e) * -logsigmoid(beta*delta) - e * -logsigmoid(-beta*delta)) / (1 - 2e)."""
        import torch.nn.functional as F

        delta = chosen - rejected
        clean = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta)
        flipped = -self.label_smoothing * F.logsigmoid(-self.beta * delta)
        return (clean - flipped) / (1 - 2 * self.label_smoothing)


@dataclass(frozen=True)
class BCOPair(PreferenceObjective):
    """BCO on pairs: -logsigmoid(beta * chosen) - logsigmoid(-beta * rejected)."""

    name: ClassVar[str] = "bco_pair"
    description: ClassVar[str] = ("BCO on pairs (Jung et al.): each completion classified on its "
                                  "own reward; TRL loss_type=bco_pair")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """-logsigmoid(beta*chosen) - logsigmoid(-beta*rejected)."""
        import torch.nn.functional as F

        chosen_rewards = self.beta * chosen
        rejected_rewards = self.beta * rejected
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


@dataclass(frozen=True)
class NCAPair(PreferenceObjective):
    """NCA on pairs: the chosen reward up in absolute terms, both pushed below zero."""

    name: ClassVar[str] = "nca_pair"
    description: ClassVar[str] = ("NCA (Chen et al.): -logsigmoid(r_c) - 0.5 logsigmoid(-r_c) - "
                                  "0.5 logsigmoid(-r_r); TRL loss_type=nca_pair")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """-logsigmoid(r_c) - logsigmoid(-r_c)/2 - logsigmoid(-r_r)/2 with r = beta * log-ratio."""
        import torch.nn.functional as F

        chosen_rewards = self.beta * chosen
        rejected_rewards = self.beta * rejected
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))


@dataclass(frozen=True)
class SPPOHard(PreferenceObjective):
    """SPPO with hard labels: chosen log-ratio to 1/(2 beta), rejected to -1/(2 beta), squared."""

    name: ClassVar[str] = "sppo_hard"
    description: ClassVar[str] = ("SPPO, hard win probabilities (Wu et al.): (chosen - 0.5/beta)^2 + "
                                  "(rejected + 0.5/beta)^2; TRL loss_type=sppo_hard")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """(chosen - 0.5/beta)^2 + (rejected + 0.5/beta)^2."""
        return (chosen - 0.5 / self.beta) ** 2 + (rejected + 0.5 / self.beta) ** 2


@dataclass(frozen=True)
class APOZero(PreferenceObjective):
    """APO-zero: raise the chosen likelihood and lower the rejected one, each on its own."""

    name: ClassVar[str] = "apo_zero"
    description: ClassVar[str] = ("APO-zero (D'Oosterlinck et al.): 1 - sigmoid(beta*chosen) + "
                                  "sigmoid(beta*rejected); TRL loss_type=apo_zero")

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        """(1 - sigmoid(beta*chosen)) + sigmoid(beta*rejected)."""
        import torch

        losses_chosen = 1 - torch.sigmoid(self.beta * chosen)
        losses_rejected = torch.sigmoid(self.beta * rejected)
        return losses_chosen + losses_rejected


@dataclass(frozen=True)
class SimPO(PreferenceObjective):
    """SimPO: reference-free, on average per-token log-probs, with a target margin gamma."""

    name: ClassVar[str] = "simpo"
    description: ClassVar[str] = ("SimPO (Meng et al.): -logsigmoid(beta * (logp_c/len_c - "
                                  "logp_r/len_r) - gamma), no reference model")
    reference_free: ClassVar[bool] = True
    needs_lengths: ClassVar[bool] = True

    gamma: float = option(0.5, help="target reward margin (TRL's CPOConfig.simpo_gamma; the paper "
                                    "tunes gamma/beta in 0.3-1.6)")
    label_smoothing: float = option(0.0, help="conservative loss for noisy labels, in [0, 0.5) "
                                              "(as TRL's CPOTrainer)")

    def validate_options(self) -> None:
        """beta > 0; gamma finite; label_smoothing in [0, 0.5)."""
        super().validate_options()
        if isinstance(self.gamma, bool) or not (isinstance(self.gamma, (int, float))
                                                and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number, got {self.gamma!r}")
        _check_smoothing(self.label_smoothing)

    def pair_losses(self, chosen: Any, rejected: Any, *, chosen_lengths: Any = None,
                    rejected_lengths: Any = None) -> Any:
        """-(1-e) logsigmoid(z) - e logsigmoid(-z), z = beta*(per-token delta) - gamma."""
        import torch.nn.functional as F

        logits = self.beta * (_per_token(chosen, chosen_lengths)
                              - _per_token(rejected, rejected_lengths)) - self.gamma
        return (-(1 - self.label_smoothing) * F.logsigmoid(logits)
                - self.label_smoothing * F.logsigmoid(-logits))

    def rewards(self, chosen: Any, rejected: Any, *, chosen_lengths: Any = None,
                rejected_lengths: Any = None) -> tuple[Any, Any]:
        """beta times the average per-token log-prob (SimPO's implicit reward)."""
        return (self.beta * _per_token(chosen, chosen_lengths).detach(),
                self.beta * _per_token(rejected, rejected_lengths).detach())


BUILTIN_PREFERENCE_LOSSES: tuple[type[PreferenceObjective], ...] = (
    Sigmoid, IPO, Hinge, Robust, BCOPair, NCAPair, SPPOHard, APOZero, SimPO)


@hookimpl
def register_preference_losses(register):
    """Register the built-in preference losses."""
    for cls in BUILTIN_PREFERENCE_LOSSES:
        register(cls())
