"""Base class for policy-loss components (family ``policy_losses``), torch-free at import.

Subclass :class:`PolicyObjective`, decorate it with ``@dataclass(frozen=True)``, declare the
loss's options as fields and either name a function of
:data:`rlhf_plugins.policy_objectives.POLICY_LOSSES` in ``objective`` or override
:meth:`PolicyObjective.objective_function` with your own ``fn(log_probs, old_log_probs,
advantages, mask, *, agg, ref_log_probs, kl_coef, norm_constant, **options) -> PolicyLoss``
(:func:`rlhf_plugins.policy_objectives.aggregate` does the reduction). The base supplies the
options every loss shares (``agg``, ``kl_coef``, ``norm_constant``), their validation, and
``__call__`` with the family's contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from .sdk import Component, PolicyLoss, option

__all__ = ["AGG_MODES", "AggMode", "PolicyObjective", "check_number", "PolicyLoss"]

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
"""verl's aggregation modes (the same tuple as :data:`rlhf_plugins.policy_objectives.AGG_MODES`)."""

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
"""The type of the ``agg`` option."""

_NORM_MODES = ("token_mean", "seq_mean_token_sum_norm")


def check_number(label: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
                 maximum: float = math.inf, none_ok: bool = False) -> None:
    """ValueError unless `value` is a finite real in [minimum, maximum] ((minimum, ...] if strict)."""
    if value is None and none_ok:
        return
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and minimum <= value <= maximum and not (strict and value == minimum))
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum}"
        bound += f" and <= {maximum}" if maximum < math.inf else ""
        raise ValueError(f"{label} must be a finite number {bound}"
                         f"{' (or null)' if none_ok else ''}, got {value!r}")


_UNSET: Any = object()


@dataclass(frozen=True)
class PolicyObjective(Component):
    """A policy loss: ``loss(log_probs, old_log_probs, advantages, mask, *, ref_log_probs=None)``."""

    family: ClassVar[str] = "policy_losses"
    #: the name of the function in rlhf_plugins.policy_objectives.POLICY_LOSSES ("" = `name`)
    objective: ClassVar[str] = ""

    agg: AggMode = option("token_mean", help="aggregation over tokens: token_mean, seq_mean_token_mean, "
                                         "seq_mean_token_sum or seq_mean_token_sum_norm (verl)")
    kl_coef: float = option(0.0, help="TRL's per-token reference KL (beta) added before aggregation; "
                                      "keep 0 when the trainer adds the KL term itself")
    norm_constant: float | None = option(None, help="divisor of token_mean (default: the real-token "
                                                    "count) or seq_mean_token_sum_norm (default: T)")

    def validate_options(self) -> None:
        """`agg` is a known mode; `kl_coef` >= 0; `norm_constant` > 0 and only where it applies."""
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {self.agg!r}")
        check_number("kl_coef", self.kl_coef)
        check_number("norm_constant", self.norm_constant, strict=True, none_ok=True)
        if self.norm_constant is not None and self.agg not in _NORM_MODES:
            raise ValueError(f"norm_constant only applies to agg {' or '.join(_NORM_MODES)}, "
                             f"not {self.agg!r}")

    def objective_function(self) -> Callable[..., PolicyLoss]:
        """The pure loss function this component configures (imports torch)."""
        from .policy_objectives import POLICY_LOSSES

        key = self.objective or self.name
        if key not in POLICY_LOSSES:
            raise NotImplementedError(
                f"policy loss {self.name!r}: set `objective` to one of {', '.join(sorted(POLICY_LOSSES))} "
                "or override objective_function() / __call__")
        return POLICY_LOSSES[key]

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments for the objective function (default: every option)."""
        return dict(self.options)

    def __call__(self, log_probs: Any, old_log_probs: Any, advantages: Any, mask: Any, *,
                 ref_log_probs: Any = None, norm_constant: Any = _UNSET) -> PolicyLoss:
        """The loss and metrics; `norm_constant` (a number or 0-dim tensor) overrides the option."""
        kwargs = self.loss_options()
        if norm_constant is not _UNSET:
            kwargs["norm_constant"] = norm_constant
        return self.objective_function()(log_probs, old_log_probs, advantages, mask,
                                         ref_log_probs=ref_log_probs, **kwargs)
