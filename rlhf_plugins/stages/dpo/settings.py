"""Settings of the direct-alignment stages (`dpo`, `kto`): light, no torch/TRL at import.

`DirectSettings` holds what both stages share (the SFT stage's model, data, template, masking,
LoRA/QLoRA, evaluation, merge and resume fields); :class:`DPOSettings` adds the loss, chosen from the
`preference_losses` family by name (a third-party loss plugs in like a built-in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...errors import ConfigError
from ..sft.settings import SFTSettings

__all__ = ["DPOSettings", "DirectSettings", "DPO_METRICS_FILE", "DPO_REJECTED_TRL_FIELDS",
           "LossSpec", "PAIR_SOURCES"]

DPO_METRICS_FILE = "dpo_metrics.json"

#: where the pairs of an earlier stage's samples come from (`pairs` field)
PAIR_SOURCES = ("verified", "reward_model")

#: TRL DPOConfig fields that the `loss` / `loss_options` / `rpo_alpha` fields replace
DPO_REJECTED_TRL_FIELDS = {
    "loss_type": "use `loss` (a preference_losses component name, or a list of them)",
    "label_smoothing": "use `loss_options` (e.g. `loss: robust` + `loss_options: {label_smoothing: 0.1}`)",
    "discopop_tau": "use `loss_options` of a preference_losses component",
    "ld_alpha": "not supported by the plugin loss (summed completion log-probs)",
    "use_weighting": "not supported by the plugin loss",
    "f_divergence_type": "not supported by the plugin loss (reverse KL log-ratios)",
}


@dataclass
class DirectSettings(SFTSettings):
    """What the `dpo` and `kto` stages share (the rest are TRL config fields): the SFT stage's
    model, data, template, masking, LoRA/QLoRA, evaluation, merge and resume fields, read the
    same way (`dataset: synthetic` is the task's preference pairs; `messages_field` does not
    apply: rows are TRL preference rows)."""

    #: graded samples of an earlier stage (pipeline): a sample passes at this reward or above
    min_reward: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.messages_field != "messages":
            raise ConfigError("messages_field: not used by this stage (rows are prompt/chosen/"
                              "rejected or prompt/completion/label)")
        _check_number(self.min_reward, "min_reward")


@dataclass(frozen=True)
class LossSpec:
    """One preference loss of the `dpo` stage: its name, weight and options."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class DPOSettings(DirectSettings):
    """Our part of a DPO config (the rest are TRL `DPOConfig` fields)."""

    #: a `preference_losses` component name, or a list of names (weighted by `loss_weights`,
    #: as TRL's `loss_type` list)
    loss: Any = "sigmoid"
    loss_weights: list[float] | None = None
    #: options of the loss (`beta`, `label_smoothing`, `gamma`, ...); with a list in `loss`,
    #: a mapping name -> options. TRL's `beta` field, when set, is every loss's default beta.
    loss_options: dict[str, Any] = field(default_factory=dict)
    #: weight of the NLL of the chosen completion added to the loss (RPO; TRL's `sft` loss)
    rpo_alpha: float = 0.0
    #: graded samples of an earlier stage (pipeline): at most this many (passing, failing)
    #: pairs per prompt
    max_pairs_per_prompt: int = 2
    #: pipeline only, the pairs made of an earlier stage's samples: `verified` (passing vs
    #: failing by the verifier) or `reward_model` (best vs worst by the reward model's score,
    #: one pair per prompt, at least `min_score_margin` apart)
    pairs: str = "verified"
    min_score_margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self.rpo_alpha, "rpo_alpha")
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha: expected a number >= 0, got {self.rpo_alpha!r}")
        if (not isinstance(self.max_pairs_per_prompt, int) or isinstance(self.max_pairs_per_prompt, bool)
                or self.max_pairs_per_prompt < 1):
            raise ConfigError(f"max_pairs_per_prompt: expected a positive integer, got "
                              f"{self.max_pairs_per_prompt!r}")
        if self.pairs not in PAIR_SOURCES:
            raise ConfigError(f"pairs: expected one of {', '.join(PAIR_SOURCES)}, got {self.pairs!r}")
        _check_number(self.min_score_margin, "min_score_margin")
        if self.min_score_margin < 0:
            raise ConfigError(f"min_score_margin: expected a number >= 0, got {self.min_score_margin!r}")
        self.loss_specs()  # shape errors now, names and option values in `quick_check`

    def loss_specs(self) -> list[LossSpec]:
        """The losses as (name, weight, options); ConfigError naming `loss` for a bad shape."""
        names = [self.loss] if isinstance(self.loss, str) else self.loss
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise ConfigError(f"loss: expected a preference_losses name or a non-empty list of "
                              f"names, got {self.loss!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"loss: {names!r} names a loss twice")
        weights = self.loss_weights if self.loss_weights is not None else [1.0] * len(names)
        if not isinstance(weights, list) or len(weights) != len(names):
            raise ConfigError(f"loss_weights: expected {len(names)} number(s), one per loss, got "
                              f"{self.loss_weights!r}")
        for w in weights:
            _check_number(w, "loss_weights")
        if not isinstance(self.loss_options, Mapping):
            raise ConfigError(f"loss_options: expected a mapping, got {self.loss_options!r}")
        if isinstance(self.loss, str):
            per_loss = {self.loss: dict(self.loss_options)}
        else:
            unknown = sorted(set(self.loss_options) - set(names))
            bad = [k for k, v in self.loss_options.items() if not isinstance(v, Mapping)]
            if unknown or bad:
                raise ConfigError("loss_options: with a list in `loss`, expected a mapping "
                                  f"loss name -> options (one of {names}), got {self.loss_options!r}")
            per_loss = {n: dict(self.loss_options.get(n, {})) for n in names}
        return [LossSpec(n, float(w), per_loss[n]) for n, w in zip(names, weights)]


def _check_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")


def resolve_losses(settings: DPOSettings, beta: float | None = None) -> list[tuple[Any, float]]:
    """(configured component, weight) per loss of `settings`; `beta` (TRL's field) is the default
    beta of every loss whose options do not set one. ConfigError naming `loss` (an unknown name)
    or `loss_options` (an option the component refuses)."""
    from ... import registry
    from ...errors import RlhfPluginsError, UnknownComponentError

    family = registry().preference_losses
    out = []
    for spec in settings.loss_specs():
        try:
            family.get(spec.name)
        except UnknownComponentError as exc:
            raise ConfigError(f"loss: {exc}") from None
        options = dict(spec.options)
        if beta is not None:
            options.setdefault("beta", beta)
        try:
            component = family.get(spec.name, **options)
        except (RlhfPluginsError, ValueError, TypeError) as exc:
            where = "loss_options" if isinstance(settings.loss, str) else f"loss_options.{spec.name}"
            raise ConfigError(f"{where}: {exc}") from None
        out.append((component, spec.weight))
    return out
