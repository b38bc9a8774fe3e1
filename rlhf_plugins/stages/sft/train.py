"""Supervised fine-tuning: conversations -> template + masking components -> TRL's SFTTrainer.

The dataset is encoded by :mod:`.dataset`, not by TRL: the trainer receives pre-tokenized rows
`{"input_ids", "assistant_masks"}`. TRL 1.16 turns such rows into
`labels` (-100 where the mask is 0) during dataset preparation, whatever
`assistant_only_loss` says, so our mask is exactly the mask of the loss (tests check the
trainer's loss against a hand-computed masked cross-entropy). `assistant_only_loss` and
`chat_template_path` are therefore rejected: the template and masking plugins replace them.

The trained tokenizer is saved with `chat_template` = the template's Jinja, so any HF runtime
(vLLM, transformers) serves the model with the format it was trained on.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...cache import atomic_write_dir
from ...errors import ConfigError
from ..bad_rows import ROW
from ..resume import check_run_config, output_state
from ..skeleton import (build_trl_config, finish_stage, finished_stage, keep_float32_adapter_on_cpu,
                        load_trainable_model, resume_checkpoint, stage_config)
from .dataset import drop_truncated, encode_sft_rows, get_components, load_rows, split_eval
from .settings import SFTSettings

logger = logging.getLogger(__name__)

METRICS_FILE = "sft_metrics.json"
#: TRL fields that our template/masking components replace
_REJECTED_TRL_FIELDS = {
    "assistant_only_loss": "the `masking` plugin chooses the trained tokens",
    "completion_only_loss": "the `masking` plugin chooses the trained tokens",
    "chat_template_path": "use `template` (a chat template plugin name)",
    "dataset_text_field": "datasets are conversations encoded by the `template` plugin",
}


@dataclass
class SFTResult:
    """What `run_sft` produced: where the model is, and the metrics it wrote."""

    output_dir: Path
    metrics: dict[str, Any]
    adapter: bool
    merged_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the output already held a finished run of this config: nothing was trained
    up_to_date: bool = False


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

def build_sft_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike) -> Any:
    """TRL's `SFTConfig` from the YAML's TRL fields, with CPU-friendly defaults."""
    from trl import SFTConfig

    return build_trl_config(SFTConfig, trl_kwargs, output_dir, label="SFT",
                            rejected=_REJECTED_TRL_FIELDS)


@dataclass
class PreparedSFT:
    """Everything `run_sft` trains with (exposed for tests and custom loops around TRL)."""

    trainer: Any
    tokenizer: Any
    template: Any
    masking: Any
    model_path: str
    train_dataset: Any
    eval_dataset: Any
    source: str
    #: rows dropped (bad rows under `bad_rows: skip`, truncation): the training source's, and
    #: a separate evaluation source's (None: held out of the training source, or no evaluation)
    drops: Any = None
    eval_drops: Any = None

    @property
    def dropped_rows(self) -> int:
        """How many rows of the training source were dropped, all reasons."""
        return 0 if self.drops is None else self.drops.dropped

    def drop_metrics(self) -> dict[str, Any]:
        """The dropped-row counts for the metrics file (see :class:`~..bad_rows.DroppedRows`)."""
        out = {} if self.drops is None else self.drops.metrics()
        if self.eval_drops is not None:
            out.update(self.eval_drops.metrics("eval_"))
        return out


def prepare_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike) -> PreparedSFT:
    """Validate, encode the data and build TRL's SFTTrainer (config errors before any model loads)."""
    from ...models import load_tokenizer, resolve_model

    args = build_sft_config(trl_kwargs or {}, output_dir)
    template, masking = get_components(settings.template, settings.masking)
    rows, source = load_rows(settings)
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    encode = dict(messages_field=settings.messages_field, bad_rows=settings.bad_rows,
                  max_bad_fraction=settings.max_bad_fraction, num_proc=args.dataset_num_proc)
    dataset, drops = encode_sft_rows(rows, tokenizer, template, masking, where=source, **encode)
    eval_drops = None
    if settings.eval_split is not None or settings.eval_dataset is not None:
        eval_source = settings.eval_dataset or settings.dataset
        eval_split = settings.eval_split or settings.dataset_split
        if eval_source == settings.dataset and eval_split == settings.dataset_split:
            raise ConfigError(f"eval_split: {eval_split!r} is the training split; name another "
                              "split (or use eval_size / eval_fraction for a hold-out)")
        eval_rows, eval_label = load_rows(settings, eval_source, eval_split)
        train_ds = dataset
        eval_ds, eval_drops = encode_sft_rows(eval_rows, tokenizer, template, masking,
                                              where=eval_label, **encode)
    else:
        train_ds, eval_ds = split_eval(dataset, settings, args.seed)
    train_ds, _ = drop_truncated(train_ds, args, source, drops)  # counted, not silently lost
    if eval_ds is not None:  # a held-out row is a row of the training source
        eval_ds, _ = drop_truncated(eval_ds, args, f"{source} (eval)",
                                    drops if eval_drops is None else eval_drops)
    for counted in (drops, eval_drops):
        if counted is not None:
            counted.warn()
    train_ds = train_ds.remove_columns(ROW)
    eval_ds = None if eval_ds is None else eval_ds.remove_columns(ROW)
    logger.info("SFT data: %d train / %d eval conversations from %s", len(train_ds),
                0 if eval_ds is None else len(eval_ds), source)
    # The saved tokenizer (and every checkpoint) carries the template it was trained with.
    if template.jinja:  # the `tokenizer` template has none of its own: keep the tokenizer's
        tokenizer.chat_template = template.jinja

    model = load_trainable_model(model_path, settings.lora, settings.quantization,
                                 gradient_checkpointing=bool(args.gradient_checkpointing),
                                 seed=args.seed)
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    keep_float32_adapter_on_cpu(trainer.model, settings.quantization)
    return PreparedSFT(trainer, tokenizer, template, masking, model_path, train_ds, eval_ds, source,
                       drops, eval_drops)


def run_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/sft") -> SFTResult:
    """Train with TRL's SFTTrainer; save the model/adapter + tokenizer (with chat_template) + metrics."""
    out = Path(output_dir)
    started = time.time()
    if output_state(out, "sft", settings, trl_kwargs).finished:  # before any model loads
        return finished_sft(out)
    prepared = prepare_sft(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_rows": len(prepared.train_dataset),
                               **prepared.drop_metrics(),
                               "eval_rows": 0 if prepared.eval_dataset is None else len(prepared.eval_dataset),
                               "trained_tokens": int(sum(sum(m) for m in prepared.train_dataset["assistant_masks"]))}
    check_run_config(out, "sft", settings, trl_kwargs)  # another config's files: cleared
    resume = resume_checkpoint(out, settings.resume, "SFT")
    if prepared.eval_dataset is not None and settings.eval_before and resume is None:
        before = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_loss_before"] = before.get("eval_loss")
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics.update({k: v for k, v in train_output.metrics.items()})
    metrics["global_step"] = train_output.global_step
    if prepared.eval_dataset is not None:
        after = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_loss"] = after.get("eval_loss")
    return save_and_finish(prepared, settings, out, metrics, stage="sft", metrics_file=METRICS_FILE,
                           started=started)


def save_and_finish(prepared: PreparedSFT, settings: Any, output_dir: str | os.PathLike,
                    metrics: dict[str, Any], *, stage: str, metrics_file: str, started: float,
                    **record: Any) -> SFTResult:
    """After training an SFT-shaped stage (sft, dpo, kto): save the model/adapter and the
    tokenizer (its chat_template), merge the adapter when asked, write metrics and the record."""
    from ...models import base_model_of, is_adapter_dir

    out, trainer = Path(output_dir), prepared.trainer
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        prepared.tokenizer.save_pretrained(str(out))
    adapter = settings.lora is not None or is_adapter_dir(prepared.model_path)
    base_model = base_model_of(prepared.model_path)
    merged_dir = None
    if settings.merge and adapter:
        merged_dir = out / "merged"
        if trainer.is_world_process_zero():
            merge_adapter(base_model, out, merged_dir, quantization=settings.quantization)
        trainer.accelerator.wait_for_everyone()  # every process goes on with the merged model
    finish_stage(trainer, out, metrics, metrics_file=metrics_file, started=started, stage=stage,
                 settings=settings, base_model=base_model, adapter=adapter,
                 merged=str(merged_dir) if merged_dir else None, template=settings.template,
                 masking=settings.masking, dataset=prepared.source, **record)
    return SFTResult(out, metrics, adapter, merged_dir)


def finished_sft(output_dir: str | os.PathLike, stage: str = "sft",
                 metrics_file: str = METRICS_FILE) -> SFTResult:
    """The result recorded by the finished run of an SFT-shaped stage (sft, dpo, kto) in
    `output_dir`, which a rerun of the same config returns (nothing is trained)."""
    out = Path(output_dir)
    metrics, record = finished_stage(out, stage, metrics_file)
    return SFTResult(out, metrics, bool(record.get("adapter")),
                     Path(record["merged"]) if record.get("merged") else None, up_to_date=True)


def merge_adapter(base_path: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str | None = None, quantization: Any = None) -> Path:
    """Merge the LoRA adapter into the base as it was trained on (full precision; the dequantized
    4-bit weights when `quantization` is the QLoRA one) and save model + tokenizer to out_dir."""
    from peft import PeftModel

    from ...models import load_base_as_trained, load_tokenizer

    base = load_base_as_trained(base_path, quantization, dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        load_tokenizer(adapter_dir).save_pretrained(tmp)

    return atomic_write_dir(out_dir, fill)


def sft_from_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None) -> SFTResult:
    """Run SFT from a YAML path or mapping (the Python twin of `rlhf-plugins sft --config`).

    `overrides` are `key=value` strings (dotted keys reach nested sections, e.g.
    `lora.r=8`) or a mapping of top-level keys.
    """
    from trl import SFTConfig

    return run_sft(*stage_config(source, overrides, output_dir, SFTSettings, SFTConfig))
