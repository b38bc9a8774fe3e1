"""Settings of the `kto` stage (light: no torch/TRL at import)."""
from __future__ import annotations

from dataclasses import dataclass

from ..dpo.settings import DirectSettings

__all__ = ["KTOSettings", "KTO_METRICS_FILE"]

KTO_METRICS_FILE = "kto_metrics.json"


@dataclass
class KTOSettings(DirectSettings):
    """Our part of a KTO config (the rest are TRL `KTOConfig` fields: beta, loss_type,
    desirable_weight, undesirable_weight, ...). Rows: `prompt`, `completion`, `label` (true:
    desirable); preference pairs are unpaired (chosen: desirable, rejected: undesirable)."""
