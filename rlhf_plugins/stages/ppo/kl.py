"""KL-coefficient controllers for policy optimisation (fixed, and Ziegler et al.'s adaptive one).

The policy-optimisation trainer asks its controller for the current coefficient (``.value``)
and reports the KL measured on each rollout batch (``.update(kl, n_steps)``). The adaptive
controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", also
InstructGPT's and TRL's former PPOTrainer's) multiplies the coefficient by
``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``: a KL above target raises the
coefficient (a shorter leash), below target lowers it. The KL it is fed is the mean over
sequences of the summed per-token ``log pi - log pi_ref`` of the rollout (nats per sequence).

Pure Python: no torch import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ConfigError

__all__ = ["AdaptiveKLController", "FixedKLController", "make_kl_controller"]

#: Ziegler et al.'s bound on the proportional error per update
PROPORTIONAL_ERROR_CLIP = 0.2


def _check_number(label: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{label} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass
class FixedKLController:
    """A constant KL coefficient (``update`` records the KL but changes nothing)."""

    value: float
    last_kl: float | None = None

    def __post_init__(self) -> None:
        self.value = _check_number("kl coefficient (beta)", self.value)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Record the measured KL; return the (unchanged) coefficient."""
        self.last_kl = float(current_kl)
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller steering the KL towards ``target``.

    ``update(kl, n_steps)``: ``e = clip(kl / target - 1, -0.2, 0.2)``,
    ``value *= 1 + e * n_steps / horizon``. ``n_steps`` is how many samples (episodes) the
    measurement covers, ``horizon`` how many samples it takes to close the gap (10000 in the
    paper). A non-finite KL measurement leaves the coefficient unchanged.
    """

    value: float
    target: float
    horizon: float = 10000.0
    last_kl: float | None = None

    def __post_init__(self) -> None:
        self.value = _check_number("kl coefficient (beta)", self.value, positive=True)
        self.target = _check_number("kl_target", self.target, positive=True)
        self.horizon = _check_number("kl_horizon", self.horizon, positive=True)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the target given a KL measured over `n_steps` samples."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ConfigError(f"n_steps must be an int >= 0, got {n_steps!r}")
        current_kl = float(current_kl)
        self.last_kl = current_kl
        if not math.isfinite(current_kl):
            return self.value
        error = current_kl / self.target - 1.0
        error = max(-PROPORTIONAL_ERROR_CLIP, min(PROPORTIONAL_ERROR_CLIP, error))
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(beta: float, target: float | None = None,
                       horizon: float = 10000.0) -> FixedKLController | AdaptiveKLController:
    """A fixed controller (``target=None``) or an adaptive one starting at `beta`."""
    if target is None:
        return FixedKLController(beta)
    if not beta > 0:
        raise ConfigError("kl_target needs beta > 0 (the adaptive controller scales beta; it "
                          "cannot move away from 0)")
    return AdaptiveKLController(beta, target, horizon)
