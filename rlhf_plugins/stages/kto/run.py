"""The `kto` stage: build TRL's KTOConfig, encode the unpaired rows, train, evaluate, save."""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from ...errors import ConfigError
from ..dpo.data import load_preference_rows
from ..dpo.run import prepare_direct, train_and_save
from ..resume import output_state
from ..sft.train import PreparedSFT, SFTResult, finished_sft
from ..skeleton import build_trl_config, stage_config
from .settings import KTO_METRICS_FILE, KTOSettings

__all__ = ["build_kto_config", "kto_from_config", "prepare_kto", "run_kto"]

#: TRL's KTO evaluation metrics -> the names in kto_metrics.json (`_before` for the first pass)
KTO_EVAL_KEYS = {"eval_loss": "eval_loss", "eval_rewards/margins": "eval_reward_margin",
                 "eval_rewards/chosen": "eval_reward_desirable",
                 "eval_rewards/rejected": "eval_reward_undesirable", "eval_kl": "eval_kl"}
KTO_TRAIN_KEYS = {"rewards/margins": "train_reward_margin", "rewards/chosen": "train_reward_desirable",
                  "rewards/rejected": "train_reward_undesirable", "kl": "train_kl"}


def build_kto_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike) -> Any:
    """TRL's `KTOConfig` from the YAML's TRL fields, with CPU-friendly defaults."""
    from trl import KTOConfig

    args = build_trl_config(KTOConfig, trl_kwargs, output_dir, label="KTO")
    if args.loss_type != "apo_zero_unpaired":  # TRL's KL estimate pairs neighbours in a batch
        if args.per_device_train_batch_size < 2:
            raise ConfigError(f"per_device_train_batch_size: loss_type {args.loss_type!r} estimates "
                              "the KL term from the other rows of a batch; use 2 or more")
        if args.train_sampling_strategy != "sequential":
            raise ConfigError(f"train_sampling_strategy: loss_type {args.loss_type!r} needs "
                              "'sequential' (its KL rows are paired with their batch neighbours)")
    return args


def _load_rows(settings: KTOSettings, dataset: str | None = None,
               split: str | None = None) -> tuple[Any, str]:
    from .data import synthetic_unpaired_rows

    return load_preference_rows(settings, dataset, split, synthetic=synthetic_unpaired_rows)


def prepare_kto(settings: KTOSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike) -> PreparedSFT:
    """Check the config, encode the rows and build the trainer (errors before any model loads)."""
    from .data import encode_unpaired
    from .trainer import PluginKTOTrainer

    args = build_kto_config(dict(trl_kwargs or {}), output_dir)
    return prepare_direct(settings, args, _load_rows, encode_unpaired, PluginKTOTrainer, "KTO")


def run_kto(settings: KTOSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/kto") -> SFTResult:
    """Train with TRL's KTOTrainer; save the model/adapter + tokenizer + metrics."""
    started = time.time()
    if output_state(output_dir, "kto", settings, trl_kwargs).finished:  # before any model loads
        return finished_sft(output_dir, "kto", KTO_METRICS_FILE)
    prepared = prepare_kto(settings, trl_kwargs, output_dir)
    labels = prepared.train_dataset["label"]
    metrics: dict[str, Any] = {
        "train_rows": len(labels), "desirable_rows": int(sum(labels)),
        **prepared.drop_metrics(),
        "eval_rows": 0 if prepared.eval_dataset is None else len(prepared.eval_dataset)}
    return train_and_save(prepared, settings, trl_kwargs, output_dir, stage="kto",
                          metrics_file=KTO_METRICS_FILE, metrics=metrics, eval_keys=KTO_EVAL_KEYS,
                          train_keys=KTO_TRAIN_KEYS, started=started)


def kto_from_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None) -> SFTResult:
    """Run KTO from a YAML path or mapping (the Python twin of `rlhf-plugins kto --config`)."""
    from trl import KTOConfig

    return run_kto(*stage_config(source, overrides, output_dir, KTOSettings, KTOConfig))
