"""The `dpo` stage: build TRL's DPOConfig, encode the pairs, train, evaluate, save.

`train_and_save` is what the `dpo` and `kto` stages share once their trainer is built: resume,
held-out evaluation before and after training, the model/adapter + tokenizer (its
`chat_template` = the training template's Jinja), the optional merged model, metrics and the
stage record.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...errors import ConfigError
from ..resume import check_run_config, output_state
from ..sft.train import PreparedSFT, SFTResult, finished_sft, save_and_finish
from ..skeleton import (build_trl_config, keep_float32_adapter_on_cpu,
                        load_trainable_model, resume_checkpoint, stage_config)
from .settings import DPO_METRICS_FILE, DPO_REJECTED_TRL_FIELDS, DPOSettings, resolve_losses

logger = logging.getLogger(__name__)

__all__ = ["build_dpo_config", "dpo_from_config", "prepare_dpo",
           "prepare_direct", "run_dpo", "train_and_save"]

#: TRL field values that mean "not used" (a rejected field given with one of them is accepted)
_UNUSED = (None, False, 0, 0.0, "reverse_kl")


def _given(value: Any) -> bool:
    return not any(value is u or (type(value) is type(u) and value == u) for u in _UNUSED)


def build_dpo_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike,
                     settings: DPOSettings | None = None) -> Any:
    """TRL's `DPOConfig` from the YAML's TRL fields, with CPU-friendly defaults; with `settings`,
    also checks the loss (names, options) and what it needs of the config."""
    from trl import DPOConfig

    args = build_trl_config(DPOConfig, trl_kwargs, output_dir, label="DPO",
                            rejected=DPO_REJECTED_TRL_FIELDS, reject=_given)
    if settings is not None:
        losses = resolve_losses(settings, trl_kwargs.get("beta"))
        if args.precompute_ref_log_probs and all(getattr(c, "reference_free", False) for c, _ in losses):
            raise ConfigError("precompute_ref_log_probs: the loss is reference_free; there are no "
                              "reference log-probs to precompute")
    return args


def load_eval_rows(settings: Any, load: Callable[..., tuple[Any, str]]) -> tuple[Any, str] | None:
    """The evaluation rows of `eval_dataset` / `eval_split` (None: hold out, or no evaluation)."""
    if settings.eval_split is None and settings.eval_dataset is None:
        return None
    source = settings.eval_dataset or settings.dataset
    split = settings.eval_split or settings.dataset_split
    if source == settings.dataset and split == settings.dataset_split:
        raise ConfigError(f"eval_split: {split!r} is the training split; name another split (or "
                          "use eval_size / eval_fraction for a hold-out)")
    return load(settings, source, split)


def encoded_splits(settings: Any, tokenizer: Any, template: Any, masking: Any, args: Any,
                   load: Callable[..., tuple[Any, str]], encode: Callable[..., tuple[Any, Any]],
                   ) -> tuple[Any, Any, str, tuple[Any, Any]]:
    """(train, eval or None, source label, (dropped rows, those of a separate evaluation source
    or None)): the rows of `settings` loaded by `load`
    and encoded by `encode`, evaluation rows from `eval_dataset`/`eval_split` or held out."""
    from ..sft.dataset import split_eval

    rows, source = load(settings)
    options = dict(max_length=args.max_length, bad_rows=settings.bad_rows,
                   max_bad_fraction=settings.max_bad_fraction, num_proc=args.dataset_num_proc)
    train, drops = encode(rows, tokenizer, template, masking, where=source, **options)
    eval_rows = load_eval_rows(settings, load)
    eval_drops = None
    if eval_rows is not None:
        evaluation, eval_drops = encode(eval_rows[0], tokenizer, template, masking,
                                        where=eval_rows[1], **options)
    else:
        train, evaluation = split_eval(train, settings, args.seed)
    return train, evaluation, source, (drops, eval_drops)


def prepare_direct(settings: Any, args: Any, load: Callable[..., tuple[Any, str]],
                   encode: Callable[..., tuple[Any, Any]], trainer_class: Callable[..., Any],
                   label: str, **trainer_kwargs: Any) -> PreparedSFT:
    """Encode the rows (`load`, `encode`) and build `trainer_class` on the model to train; a fresh
    LoRA adapter's reference is the base (the trainer gets `fresh_adapter=True`)."""
    from ...models import is_adapter_dir, load_tokenizer, resolve_model
    from ..sft.dataset import get_components

    template, masking = get_components(settings.template, settings.masking)
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    train, evaluation, source, dropped = encoded_splits(settings, tokenizer, template, masking, args,
                                                        load, encode)
    logger.info("%s data: %d train / %d eval rows from %s", label, len(train),
                0 if evaluation is None else len(evaluation), source)
    if template.jinja:  # the saved tokenizer carries the template it was trained with
        tokenizer.chat_template = template.jinja
    model = load_trainable_model(model_path, settings.lora, settings.quantization,
                                 gradient_checkpointing=bool(args.gradient_checkpointing),
                                 seed=args.seed)
    fresh = settings.lora is not None and not is_adapter_dir(model_path)
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer, fresh_adapter=fresh, **trainer_kwargs)
    keep_float32_adapter_on_cpu(trainer.model, settings.quantization)
    return PreparedSFT(trainer, tokenizer, template, masking, model_path, train, evaluation,
                          source, *dropped)


def prepare_dpo(settings: DPOSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike) -> PreparedSFT:
    """Check the config and loss, encode the pairs and build the trainer (errors before any
    model loads)."""
    from .data import encode_pairs, load_preference_rows
    from .trainer import PluginDPOTrainer

    trl_kwargs = dict(trl_kwargs or {})
    args = build_dpo_config(trl_kwargs, output_dir, settings)
    return prepare_direct(settings, args, load_preference_rows, encode_pairs, PluginDPOTrainer,
                          "DPO", losses=resolve_losses(settings, trl_kwargs.get("beta")),
                          rpo_alpha=settings.rpo_alpha)


def _eval_metrics(out: Mapping[str, Any], suffix: str, keys: Mapping[str, str]) -> dict[str, Any]:
    """`keys` (TRL's eval metric -> our name) of an evaluate() result, named with `suffix`."""
    return {f"{ours}{suffix}": out[theirs] for theirs, ours in keys.items() if theirs in out}


def _last_logged(history: Sequence[Mapping[str, Any]], keys: Mapping[str, str]) -> dict[str, Any]:
    """The last training log entry's value of each of `keys` (TRL's name -> ours)."""
    out: dict[str, Any] = {}
    for entry in history:
        if "loss" in entry:
            out.update({ours: entry[theirs] for theirs, ours in keys.items() if theirs in entry})
    return out


def train_and_save(prepared: PreparedSFT, settings: Any, trl_kwargs: Mapping[str, Any] | None,
                   output_dir: str | os.PathLike, *, stage: str, metrics_file: str,
                   metrics: dict[str, Any], eval_keys: Mapping[str, str],
                   train_keys: Mapping[str, str], started: float, **record: Any) -> SFTResult:
    """Resume, evaluate before, train, evaluate after, save (+ merge), write metrics and record."""
    out = Path(output_dir)
    trainer = prepared.trainer
    check_run_config(out, stage, settings, trl_kwargs)  # another config's checkpoints: start clean
    resume = resume_checkpoint(out, settings.resume, stage.upper())
    if prepared.eval_dataset is not None and settings.eval_before and resume is None:
        metrics.update(_eval_metrics(trainer.evaluate(), "_before", eval_keys))
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics.update(train_output.metrics)
    metrics["global_step"] = train_output.global_step
    metrics.update(_last_logged(trainer.state.log_history, train_keys))
    if prepared.eval_dataset is not None:
        metrics.update(_eval_metrics(trainer.evaluate(), "", eval_keys))
    return save_and_finish(prepared, settings, out, metrics, stage=stage, metrics_file=metrics_file,
                           started=started, **record)


#: TRL's DPO evaluation metrics -> the names in dpo_metrics.json (`_before` for the first pass)
DPO_EVAL_KEYS = {"eval_loss": "eval_loss", "eval_rewards/accuracies": "eval_preference_accuracy",
                 "eval_rewards/margins": "eval_reward_margin",
                 "eval_logps/accuracies": "eval_logp_accuracy"}
#: the last logged training values kept in dpo_metrics.json
DPO_TRAIN_KEYS = {"rewards/accuracies": "train_reward_accuracy",
                  "rewards/margins": "train_reward_margin", "rewards/chosen": "train_reward_chosen",
                  "rewards/rejected": "train_reward_rejected"}


def run_dpo(settings: DPOSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/dpo") -> SFTResult:
    """Train with the plugin-loss DPOTrainer; save the model/adapter + tokenizer + metrics."""
    started = time.time()
    if output_state(output_dir, "dpo", settings, trl_kwargs).finished:  # before any model loads
        return finished_sft(output_dir, "dpo", DPO_METRICS_FILE)
    prepared = prepare_dpo(settings, trl_kwargs, output_dir)
    metrics: dict[str, Any] = {
        "train_pairs": len(prepared.train_dataset), "dropped_pairs": prepared.dropped_rows,
        **prepared.drop_metrics(),
        "eval_pairs": 0 if prepared.eval_dataset is None else len(prepared.eval_dataset),
        "loss": [s.name for s in settings.loss_specs()],
        "reference_free": prepared.trainer.reference_free}
    return train_and_save(prepared, settings, trl_kwargs, output_dir, stage="dpo",
                          metrics_file=DPO_METRICS_FILE, metrics=metrics, eval_keys=DPO_EVAL_KEYS,
                          train_keys=DPO_TRAIN_KEYS, started=started,
                          loss=[s.name for s in settings.loss_specs()])


def dpo_from_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None) -> SFTResult:
    """Run DPO from a YAML path or mapping (the Python twin of `rlhf-plugins dpo --config`)."""
    from trl import DPOConfig

    return run_dpo(*stage_config(source, overrides, output_dir, DPOSettings, DPOConfig))
