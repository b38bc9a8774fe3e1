"""Supervised fine-tuning: conversations -> template + masking components -> TRL's SFTTrainer.

The dataset is encoded here, not by TRL: each conversation is rendered by the chat template
component named in the config (`registry().chat_templates`), the masking strategy
(`registry().masking_strategies`) picks the trained tokens, and the trainer receives
pre-tokenized rows `{"input_ids", "assistant_masks"}`. TRL 1.16 turns such rows into
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
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..cache import atomic_write_dir
from ..protocols import member
from ..config import check_strings
from ..errors import ComponentError, ConfigError, DataError, RlhfPluginsError
from ..guard import check_mask, guarded, located, row_place
from ..models import LoraSettings, QuantSettings, resolve_adapter_settings
from .resume import check_run_config, output_state
from ..models import STAGE_FILE  # noqa: F401 - re-exported: where a finished stage is recorded
from .skeleton import (SYNTHETIC, build_trl_config, finish_stage, finished_stage,
                       keep_float32_adapter_on_cpu,
                       load_dataset_source, load_trainable_model, resume_checkpoint,
                       stage_config)

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

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
class SFTSettings:
    """Our part of an SFT config (the rest are TRL `SFTConfig` fields)."""

    #: HF model directory, hub id, .gguf file, or None / "default" for the embedded SmolLM2
    model: str | None = None
    #: JSON/JSONL/CSV/Parquet file, saved HF dataset directory, `load_dataset` name, or "synthetic"
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    #: `load_dataset` configuration name (hub/script datasets only)
    dataset_config: str | None = None
    #: column holding the conversation (list of {"role", "content"}); TRL's other formats work
    #: too: `prompt` + `completion` (message lists or plain strings: a user and an assistant
    #: turn) and language modelling `text` (tokenized as is + eos, every token trained)
    messages_field: str = "messages"
    #: keep at most this many rows (synthetic: how many problems to generate; default 256)
    num_examples: int | None = None
    #: seed of the synthetic task
    dataset_seed: int = 0
    template: str = "chatml"
    masking: str = "all_assistant_turns"
    #: LoRA adapter (None: full fine-tuning); `lora: {}` in YAML means the defaults
    lora: LoraSettings | None = None
    #: the same as `lora` (the issue's name for it); give one of the two
    peft: LoraSettings | None = None
    #: 4-bit base weights (QLoRA; needs `lora`); `quantization: {}` means NF4 + double quant
    quantization: QuantSettings | None = None
    #: hold out this fraction (0-1) or this many rows of the encoded data for evaluation
    eval_fraction: float = 0.0
    eval_size: int | None = None
    #: evaluate on this split (of `eval_dataset`, default `dataset`) instead of a hold-out
    eval_split: str | None = None
    #: evaluation rows from another source (same forms as `dataset`); default split: `dataset_split`
    eval_dataset: str | None = None
    #: evaluate the held-out rows before training too (metrics `eval_loss_before`)
    eval_before: bool = True
    #: also save the base model with the adapter merged in, under `<output_dir>/merged`
    merge: bool = False
    #: resume from the last checkpoint in the output directory when there is one
    resume: bool = True
    #: replace what the output directory holds (files of another program, a finished run)
    overwrite: bool = False

    def __post_init__(self) -> None:

        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        check_strings(self, ("dataset", "template", "masking", "dataset_split", "messages_field"))
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError(f"model: expected a string, got {self.model!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        for name in ("eval_size", "num_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


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
# Components and data
# --------------------------------------------------------------------------------------------

def get_components(template: Any, masking: Any) -> tuple[Any, Any]:
    """The chat template and masking components, given names (looked up) or components."""
    from .. import registry

    reg = registry()
    tpl = reg.chat_templates.get(template) if isinstance(template, str) else template
    msk = reg.masking_strategies.get(masking) if isinstance(masking, str) else masking
    return tpl, msk


def load_rows(settings: SFTSettings, dataset: str | None = None,
              split: str | None = None) -> tuple[Any, str]:
    """The raw rows named by `settings.dataset` (or `dataset`) and a label naming the source."""
    split = split or settings.dataset_split
    dataset = dataset or settings.dataset
    if dataset == SYNTHETIC:
        from ..data import synth

        n = settings.num_examples or 256
        return synth.sft_rows(n, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    return load_dataset_source(dataset, split=split, config=settings.dataset_config,
                               num_examples=settings.num_examples)


def row_messages(row: Mapping[str, Any], messages_field: str = "messages") -> list[dict]:
    """The conversation of one row: `row[messages_field]`, or TRL's `prompt` + `completion`
    (message lists, or plain strings: one user turn and one assistant turn)."""
    from ..head_data import as_messages

    if messages_field in row and row[messages_field] is not None:
        messages = row[messages_field]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        messages = (as_messages(row["prompt"], "user", "prompt")
                    + as_messages(row["completion"], "assistant", "completion"))
    else:
        raise DataError(f"missing field {messages_field!r} (or prompt + completion, or text)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"field {messages_field!r} must be a non-empty list of messages")
    return list(messages)


def row_text(row: Mapping[str, Any], messages_field: str = "messages") -> str | None:
    """A language-modelling row's `text` (TRL's standard format), or None for a conversation."""
    if messages_field in row and row[messages_field] is not None:
        return None
    if row.get("prompt") is not None or "text" not in row:
        return None
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError("text: expected a non-empty string")
    return text


def _text_features(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """TRL's language modelling: the text tokenized (special tokens added) + eos, all trained."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids, [1] * len(ids)


def build_sft_dataset(rows: Iterable[Mapping[str, Any]], tokenizer: Any, template: Any = "chatml",
                      masking: Any = "all_assistant_turns", *, messages_field: str = "messages",
                      where: str = "dataset") -> "Dataset":
    """Encode conversations into an HF Dataset of `input_ids` + `assistant_masks` (0/1)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    tpl, msk = get_components(template, masking)
    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    total = len(rows) if hasattr(rows, "__len__") else None
    for index, row in enumerate(tqdm(rows, total=total, desc="Encoding conversations",
                                     leave=False, disable=total is not None and total < 2000)):
        place = row_place(where, index)  # 1-based: the file's line for JSON lines
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"expected a mapping, got {type(row).__name__}")
            text = row_text(row, messages_field)
            if text is not None:
                ids, mask = _text_features(text, tokenizer)
                input_ids.append(ids)
                masks.append(mask)
                continue
            messages = row_messages(row, messages_field)
            # Full validation (roles the template supports, system first, tool results after
            # calls, ends with an assistant turn); the Protocol's default when it declares none.
            with guarded(tpl, "chat_templates", "validate()"):
                messages = member(tpl, "chat_templates", "validate")(messages, for_training=True)
            check_assistant_content(messages)
            with guarded(tpl, "chat_templates", "encode()"):
                encoded = tpl.encode(messages, tokenizer=tokenizer, add_generation_prompt=False)
            with guarded(msk, "masking_strategies", "mask()"):
                raw_mask = msk.mask(encoded)
            mask = check_mask(raw_mask, len(encoded.input_ids), msk)  # one 0/1 value per token
        except ComponentError as exc:  # a plugin's failure, not a bad row: keep its class
            raise located(exc, place) from exc.__cause__
        except RlhfPluginsError as exc:
            raise DataError(f"{place}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{place}: {type(exc).__name__}: {exc}") from None
        if not any(mask):
            raise DataError(f"{place}: no token is trained (masking "
                            f"{getattr(msk, 'name', msk)!r} masks the whole conversation)")
        input_ids.append(list(encoded.input_ids))
        masks.append(mask)
    if not input_ids:
        raise DataError(f"{where}: no rows")
    return Dataset.from_dict({"input_ids": input_ids, "assistant_masks": masks})


def check_assistant_content(messages: Sequence[Mapping[str, Any]]) -> None:
    """DataError for an assistant turn with nothing in it (no text, tool call or reasoning):
    training on it teaches the model to answer with an empty turn."""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or m.get("tool_calls"):
            continue
        if not any(isinstance(m.get(k), str) and m[k].strip()
                   for k in ("content", "thinking", "reasoning_content")):
            raise DataError(f"message {i}: empty assistant content (nothing to train on); "
                            "drop the row or give the assistant turn some text")


def drop_truncated(dataset: "Dataset", args: Any, where: str) -> tuple["Dataset", int]:
    """Remove (and count) the rows TRL would drop after truncating to `max_length`: those whose
    trained tokens all lie in the cut-off part. DataError when no row is left."""
    if args.max_length is None or getattr(args, "packing", False) or dataset is None:
        return dataset, 0
    if args.truncation_mode not in ("keep_start", "keep_end"):
        raise ConfigError(f"truncation_mode: expected 'keep_start' or 'keep_end', got "
                          f"{args.truncation_mode!r}")
    cut = slice(None, args.max_length) if args.truncation_mode == "keep_start" \
        else slice(-args.max_length, None)
    keep = [i for i, m in enumerate(dataset["assistant_masks"]) if any(m[cut])]
    dropped = len(dataset) - len(keep)
    if not keep:
        raise DataError(f"{where}: no row has a trained token within max_length={args.max_length} "
                        f"(truncation_mode {args.truncation_mode}); raise max_length")
    if dropped:
        logger.warning("%s: %d of %d rows have no trained token within max_length=%d and are "
                       "dropped", where, dropped, len(dataset), args.max_length)
        dataset = dataset.select(keep)
    return dataset, dropped


def split_eval(dataset: "Dataset", settings: SFTSettings, seed: int) -> tuple["Dataset", "Dataset | None"]:
    """Hold out `eval_size` rows or `eval_fraction` of them (deterministic by seed)."""
    n = len(dataset)
    k = settings.eval_size if settings.eval_size is not None else int(round(n * settings.eval_fraction))
    if k <= 0:
        return dataset, None
    if k >= n:
        raise ConfigError(f"eval_size/eval_fraction: would hold out {k} of {n} rows, leaving none "
                          "to train on")
    parts = dataset.train_test_split(test_size=k, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


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
    #: rows removed because truncation to `max_length` left them nothing to train on
    dropped_rows: int = 0


def prepare_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike) -> PreparedSFT:
    """Validate, encode the data and build TRL's SFTTrainer (config errors before any model loads)."""
    from ..models import load_tokenizer, resolve_model

    args = build_sft_config(trl_kwargs or {}, output_dir)
    template, masking = get_components(settings.template, settings.masking)
    rows, source = load_rows(settings)
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    dataset = build_sft_dataset(rows, tokenizer, template, masking,
                                messages_field=settings.messages_field, where=source)
    if settings.eval_split is not None or settings.eval_dataset is not None:
        eval_source = settings.eval_dataset or settings.dataset
        eval_split = settings.eval_split or settings.dataset_split
        if eval_source == settings.dataset and eval_split == settings.dataset_split:
            raise ConfigError(f"eval_split: {eval_split!r} is the training split; name another "
                              "split (or use eval_size / eval_fraction for a hold-out)")
        eval_rows, eval_label = load_rows(settings, eval_source, eval_split)
        train_ds = dataset
        eval_ds = build_sft_dataset(eval_rows, tokenizer, template, masking,
                                    messages_field=settings.messages_field, where=eval_label)
    else:
        train_ds, eval_ds = split_eval(dataset, settings, args.seed)
    train_ds, dropped = drop_truncated(train_ds, args, source)  # counted, not silently lost
    if eval_ds is not None:
        eval_ds, _ = drop_truncated(eval_ds, args, f"{source} (eval)")
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
                       dropped)


def run_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/sft") -> SFTResult:
    """Train with TRL's SFTTrainer; save the model/adapter + tokenizer (with chat_template) + metrics."""
    from ..models import base_model_of, is_adapter_dir

    out = Path(output_dir)
    started = time.time()
    if output_state(out, "sft", settings, trl_kwargs).finished:  # before any model loads
        return finished_sft(out)
    prepared = prepare_sft(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_rows": len(prepared.train_dataset),
                               "dropped_rows": prepared.dropped_rows,
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
    finish_stage(trainer, out, metrics, metrics_file=METRICS_FILE, started=started, stage="sft",
                 settings=settings, base_model=base_model, adapter=adapter,
                 merged=str(merged_dir) if merged_dir else None, template=settings.template,
                 masking=settings.masking, dataset=prepared.source)
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

    from ..models import load_base_as_trained, load_tokenizer

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
