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

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..conversation import validate_messages
from ..cache import atomic_write_json
from ..errors import ConfigError, DataError, RlhfPluginsError
from ..models import LoraSettings, QuantSettings, resolve_adapter_settings

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
METRICS_FILE = "sft_metrics.json"
STAGE_FILE = "rlhf_plugins_stage.json"
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
    #: JSONL file, saved HF dataset directory, `load_dataset` name, or "synthetic"
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    #: `load_dataset` configuration name (hub/script datasets only)
    dataset_config: str | None = None
    #: column holding the conversation (list of {"role", "content"}); rows with
    #: `prompt` + `completion` message lists (TRL's format) work too
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
    #: evaluate the held-out rows before training too (metrics `eval_loss_before`)
    eval_before: bool = True
    #: also save the base model with the adapter merged in, under `<output_dir>/merged`
    merge: bool = False
    #: resume from the last checkpoint in the output directory when there is one
    resume: bool = True

    def __post_init__(self) -> None:

        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        for name in ("dataset", "template", "masking", "dataset_split", "messages_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_rows(settings: SFTSettings) -> tuple[Any, str]:
    """The raw conversation rows named by `settings.dataset` and a label naming the source."""
    source, split = settings.dataset, settings.dataset_split
    if source == SYNTHETIC:
        from ..data import synth

        n = settings.num_examples or 256
        return synth.sft_rows(n, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    path = Path(source).expanduser()
    if path.is_file():
        rows = None
        if path.suffix == ".json":  # a JSON array of rows, else JSON lines
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = None
            if isinstance(data, list):
                rows = data
        if rows is None:
            rows = _read_jsonl(path)
        return _cap(rows, settings.num_examples), str(path)
    if path.is_dir():
        import datasets

        try:
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                    or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path), settings.dataset_config)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"dataset: {path}: cannot load: {str(exc).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"dataset: {path}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        return _cap(ds, settings.num_examples), f"{path}[{split}]"
    if source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        raise ConfigError(f"dataset: {source}: no such file or directory")
    import datasets

    try:
        ds = datasets.load_dataset(source, settings.dataset_config, split=split)
    except Exception as exc:  # noqa: BLE001 - load_dataset raises many types (offline, 404, ...)
        raise ConfigError(f"dataset: cannot load {source!r} (split {split!r}): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return _cap(ds, settings.num_examples), f"{source}[{split}]"


def _cap(rows: Any, n: int | None) -> Any:
    if n is None or len(rows) <= n:
        return rows
    return rows.select(range(n)) if hasattr(rows, "select") else rows[:n]


def row_messages(row: Mapping[str, Any], messages_field: str = "messages") -> list[dict]:
    """The conversation of one row: `row[messages_field]`, or `prompt` + `completion` lists."""
    if messages_field in row and row[messages_field] is not None:
        messages = row[messages_field]
    elif isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        messages = list(row["prompt"]) + list(row["completion"])
    else:
        raise DataError(f"missing field {messages_field!r} (or prompt/completion message lists)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"field {messages_field!r} must be a non-empty list of messages")
    return list(messages)


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
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"expected a mapping, got {type(row).__name__}")
            messages = row_messages(row, messages_field)
            # Full validation (roles the template supports, system first, tool results after
            # calls, ends with an assistant turn); third-party templates may lack `validate`.
            validate = getattr(tpl, "validate", None)
            if callable(validate):
                messages = validate(messages, for_training=True)
            else:
                messages = validate_messages(messages, for_training=True)
            encoded = tpl.encode(messages, tokenizer=tokenizer, add_generation_prompt=False)
            mask = [int(m) for m in msk.mask(encoded)]
        except RlhfPluginsError as exc:
            raise DataError(f"{where} row {index}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{where} row {index}: {type(exc).__name__}: {exc}") from None
        if len(mask) != len(encoded.input_ids):
            raise DataError(f"{where} row {index}: masking {getattr(msk, 'name', msk)!r} returned "
                            f"{len(mask)} values for {len(encoded.input_ids)} tokens")
        if not any(mask):
            raise DataError(f"{where} row {index}: no token is trained (masking "
                            f"{getattr(msk, 'name', msk)!r} masks the whole conversation)")
        input_ids.append(list(encoded.input_ids))
        masks.append(mask)
    if not input_ids:
        raise DataError(f"{where}: no rows")
    return Dataset.from_dict({"input_ids": input_ids, "assistant_masks": masks})


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

    from .trainer_args import device_defaults

    kwargs = dict(trl_kwargs)
    for name, why in _REJECTED_TRL_FIELDS.items():
        if kwargs.get(name):
            raise ConfigError(f"{name}: not supported here: {why}")
    kwargs.pop("output_dir", None)
    device_defaults(kwargs)
    try:
        return SFTConfig(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"SFT config: {exc}") from None


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


def prepare_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike) -> PreparedSFT:
    """Validate, encode the data and build TRL's SFTTrainer (config errors before any model loads)."""
    from ..models import (apply_lora, is_adapter_dir, load_causal_lm, load_peft_model,
                          load_tokenizer, resolve_model)

    args = build_sft_config(trl_kwargs or {}, output_dir)
    template, masking = get_components(settings.template, settings.masking)
    rows, source = load_rows(settings)
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    dataset = build_sft_dataset(rows, tokenizer, template, masking,
                                messages_field=settings.messages_field, where=source)
    train_ds, eval_ds = split_eval(dataset, settings, args.seed)
    logger.info("SFT data: %d train / %d eval conversations from %s", len(train_ds),
                0 if eval_ds is None else len(eval_ds), source)
    # The saved tokenizer (and every checkpoint) carries the template it was trained with.
    if template.jinja:  # the `tokenizer` template has none of its own: keep the tokenizer's
        tokenizer.chat_template = template.jinja

    checkpointing = bool(args.gradient_checkpointing)
    if is_adapter_dir(model_path):
        # a saved adapter (e.g. an earlier SFT stage): keep training it on its base
        if settings.lora is not None:
            raise ConfigError(f"model: {model_path} is a LoRA adapter; drop `lora` to keep "
                              "training it, or give its merged model")
        model = load_peft_model(model_path, quantization=settings.quantization, trainable=True,
                                gradient_checkpointing=checkpointing)
    else:
        model = load_causal_lm(model_path, quantization=settings.quantization)
        if settings.lora is not None:
            model = apply_lora(model, settings.lora, gradient_checkpointing=checkpointing)
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    _keep_float32_adapter_on_cpu(trainer.model, settings)
    return PreparedSFT(trainer, tokenizer, template, masking, model_path, train_ds, eval_ds, source)


def _keep_float32_adapter_on_cpu(model: Any, settings: SFTSettings) -> None:
    """Undo TRL's bf16 cast of QLoRA adapters when the compute dtype is float32 (CPU).

    TRL follows the QLoRA paper (adapters in bf16) for every quantized model; with float32
    compute that only loses precision (small Adam updates vanish in bf16) and mixes dtypes.
    """
    import torch

    if settings.quantization is None or not settings.quantization.load_in_4bit:
        return
    if settings.quantization.resolved_compute_dtype() != torch.float32:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def _last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (one with its trainer state), or None.

    A process killed while saving leaves a `checkpoint-N` folder without `trainer_state.json`
    (transformers writes it last); resuming from it would fail, so it is skipped.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for child in folder.iterdir():
        step = child.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if child.is_dir() and step.isdigit() and (child / "trainer_state.json").is_file():
            steps.append((int(step), child))
    return str(max(steps)[1]) if steps else None


def run_sft(settings: SFTSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/sft") -> SFTResult:
    """Train with TRL's SFTTrainer; save the model/adapter + tokenizer (with chat_template) + metrics."""
    import torch

    from ..models import is_adapter_dir

    out = Path(output_dir)
    started = time.time()
    prepared = prepare_sft(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_rows": len(prepared.train_dataset),
                               "eval_rows": 0 if prepared.eval_dataset is None else len(prepared.eval_dataset),
                               "trained_tokens": int(sum(sum(m) for m in prepared.train_dataset["assistant_masks"]))}
    resume = _last_checkpoint(out) if settings.resume else None
    if prepared.eval_dataset is not None and settings.eval_before and resume is None:
        before = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_loss_before"] = before.get("eval_loss")
    if resume:
        logger.info("resuming SFT from %s", resume)
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
    base_model = prepared.model_path
    if is_adapter_dir(prepared.model_path):
        base_model = json.loads((Path(prepared.model_path) / "adapter_config.json").read_text()
                                )["base_model_name_or_path"]
    merged_dir = None
    if settings.merge and adapter:
        merged_dir = out / "merged"
        if trainer.is_world_process_zero():
            merge_adapter(base_model, out, merged_dir)
        trainer.accelerator.wait_for_everyone()  # every process goes on with the merged model
    metrics["wall_time_s"] = round(time.time() - started, 3)
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    try:
        import resource

        metrics["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - not on Linux
        pass
    metrics["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        atomic_write_json(out / METRICS_FILE, metrics)
        atomic_write_json(out / STAGE_FILE, {
            "stage": "sft", "base_model": base_model, "adapter": adapter,
            "merged": str(merged_dir) if merged_dir else None,
            "template": settings.template, "masking": settings.masking,
            "dataset": prepared.source, "settings": dataclasses.asdict(settings),
        })
    return SFTResult(out, metrics, adapter, merged_dir)


def merge_adapter(base_path: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str | None = None) -> Path:
    """Load the base in full precision, merge the LoRA adapter, save model + tokenizer to out_dir."""
    import shutil

    from peft import PeftModel

    from ..models import load_causal_lm, load_tokenizer

    out = Path(out_dir)
    base = load_causal_lm(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        load_tokenizer(adapter_dir).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def sft_from_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None) -> SFTResult:
    """Run SFT from a YAML path or mapping (the Python twin of `rlhf-plugins sft --config`).

    `overrides` are `key=value` strings (dotted keys reach nested sections, e.g.
    `lora.r=8`) or a mapping of top-level keys.
    """
    from trl import SFTConfig

    from ..config import load_stage_config

    data, where, out = read_stage_source(source, overrides, output_dir)
    settings, trl_kwargs = load_stage_config(data, SFTSettings, SFTConfig, where=where)
    return run_sft(settings, trl_kwargs, out)


def read_stage_source(source: str | os.PathLike | Mapping[str, Any],
                      overrides: Sequence[str] | Mapping[str, Any] | None,
                      output_dir: str | os.PathLike | None) -> tuple[dict[str, Any], str, str]:
    """A stage config from a YAML path or mapping, with overrides -> (data, where, output dir).

    `overrides` are `key=value` strings (dotted keys reach nested sections) or a mapping of
    top-level keys; `output_dir` wins over the config's own `output_dir`, one of them is required.
    """
    import copy

    from ..config import load_yaml

    data = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else load_yaml(source)
    where = "config" if isinstance(source, Mapping) else str(source)
    if isinstance(overrides, Mapping):
        data.update(overrides)
    elif overrides:
        apply_overrides(data, list(overrides))
    out = output_dir if output_dir is not None else data.get("output_dir")
    data.pop("output_dir", None)
    if out is None:
        raise ConfigError(f"{where}: no output_dir (set it in the config or pass --output-dir)")
    return data, where, out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `key=value` override (value read as YAML: numbers, booleans, lists)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested config mapping (returns the same dict)."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            nxt = target.get(part)
            if nxt is None or nxt is True:
                nxt = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping")
            target[part] = nxt
            target = nxt
        target[parts[-1]] = value
    return data
