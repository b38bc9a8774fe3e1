"""What every stage shares: config, TRL config, dataset sources, model, checkpoints, finishing.

A training stage (SFT, reward model, PPO) reads like this::

    settings, trl_kwargs, out = stage_config(source, overrides, output_dir, SFTSettings, SFTConfig)
    if output_state(out, "sft", settings, trl_kwargs).finished:  # before any model loads
        metrics, record = finished_stage(out, "sft", METRICS_FILE)   # nothing to do: return them
    args = build_trl_config(SFTConfig, trl_kwargs, out, label="SFT", rejected=...)
    rows, label = load_dataset_source(settings.dataset, split=..., num_examples=...)
    model = load_trainable_model(model_path, settings.lora, settings.quantization, ...)
    trainer = ...; keep_float32_adapter_on_cpu(trainer.model, settings.quantization)
    check_run_config(out, "sft", settings, trl_kwargs)  # clear what is ours to clear, record
    trainer.train(resume_from_checkpoint=resume_checkpoint(out, settings.resume, "SFT"))
    finish_stage(trainer, out, metrics, metrics_file=..., started=..., stage="sft", ...)

`output_state` (which also refuses an output folder holding entries no record of ours claims,
unless `settings.overwrite`) and `check_run_config` live in stages/resume.py; `finish_stage`
marks the run finished, so a rerun of the same config has nothing to do.

Nothing here imports torch, transformers or datasets at module level.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..cache import atomic_write_json
from ..data.files import FILE_BUILDERS, first_line, load_data_file
from ..errors import ConfigError, DataError
from ..models import STAGE_FILE

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)

#: the `dataset` value naming a stage's built-in synthetic task
SYNTHETIC = "synthetic"
#: files that mark a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


# --------------------------------------------------------------------------------------------
# Config source
# --------------------------------------------------------------------------------------------

def read_stage_source(source: str | os.PathLike | Mapping[str, Any],
                      overrides: Sequence[str] | Mapping[str, Any] | None,
                      output_dir: str | os.PathLike | None) -> tuple[dict[str, Any], str, str]:
    """A stage config from a YAML path or mapping, with overrides -> (data, where, output dir).

    `overrides` are `key=value` strings (dotted keys reach nested sections) or a mapping of
    top-level keys; `output_dir` wins over the config's own `output_dir`, one of them is required.
    """
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
    from ..guard import check_output_dir

    check_output_dir(out, f"{where}: output_dir")  # a file in the way fails before any model loads
    return data, where, out


def stage_config(source: str | os.PathLike | Mapping[str, Any],
                 overrides: Sequence[str] | Mapping[str, Any] | None,
                 output_dir: str | os.PathLike | None, settings_class: type, config_class: type,
                 ) -> tuple[Any, dict[str, Any], str | os.PathLike]:
    """A training stage's config -> (our settings, TRL `config_class` kwargs, output dir)."""
    from ..config import load_stage_config

    data, where, out = read_stage_source(source, overrides, output_dir)
    settings, trl_kwargs = load_stage_config(data, settings_class, config_class, where=where)
    return settings, trl_kwargs, out


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


def build_trl_config(config_class: type, trl_kwargs: Mapping[str, Any],
                     output_dir: str | os.PathLike, *, label: str,
                     rejected: Mapping[str, str] | None = None,
                     reject: Callable[[Any], bool] = bool, **extra: Any) -> Any:
    """A TRL config (`SFTConfig`, `RewardConfig`, `GRPOConfig`, ...) with CPU-friendly defaults.

    A field of `rejected` (name -> why) that is given with a value `reject` accepts is a
    ConfigError, as is anything the config class refuses. `extra` fields are set last.
    """
    from .trainer_args import device_defaults

    kwargs = dict(trl_kwargs)
    for name, why in (rejected or {}).items():
        if name in kwargs and reject(kwargs[name]):
            raise ConfigError(f"{name}: not supported here: {why}")
    kwargs.pop("output_dir", None)
    device_defaults(kwargs)
    kwargs.update(extra)
    try:
        return config_class(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label} config: {exc}") from None


# --------------------------------------------------------------------------------------------
# Dataset sources
# --------------------------------------------------------------------------------------------

def load_dataset_source(source: str | os.PathLike, *, split: str = "train",
                        config: str | None = None,
                        num_examples: int | None = None) -> tuple["Dataset", str]:
    """Rows named by a stage's `dataset` field, as an HF Dataset, and a label naming them.

    `source` is a data file (.json array or JSON lines, .jsonl, .csv, .parquet; any other
    suffix is read as JSON lines), a directory saved with `save_to_disk`, a dataset folder or
    script for `load_dataset`, or a hub id. `split` picks a split of a dataset dict; `config`
    is the `load_dataset` configuration name; at most `num_examples` rows are kept. A broken
    JSON file is a DataError naming the file and the 1-based line.
    """
    import datasets

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        ds, label = load_data_file(path), str(path)
    elif path.is_dir():
        try:
            if any((path / name).is_file() for name in _SAVED_DATASET_FILES):
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path), config)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"dataset: {path}: cannot load: {first_line(exc)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"dataset: {path}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        label = f"{path}[{split}]"
    elif text.startswith((".", "/", "~")) or path.suffix in FILE_BUILDERS:
        raise ConfigError(f"dataset: {text}: no such file or directory")
    else:
        try:
            ds = datasets.load_dataset(text, config, split=split)
        except Exception as exc:  # noqa: BLE001 - load_dataset raises many types (offline, 404)
            raise ConfigError(f"dataset: cannot load {text!r} (split {split!r}): "
                              f"{first_line(exc)}") from None
        label = f"{text}[{split}]"
    if len(ds) == 0:
        raise DataError(f"{label}: no rows")
    if num_examples is not None and len(ds) > num_examples:
        ds = ds.select(range(num_examples))
    return ds, label


# --------------------------------------------------------------------------------------------
# The trained model
# --------------------------------------------------------------------------------------------

def load_trainable_model(model_path: str, lora: Any = None, quantization: Any = None, *,
                         gradient_checkpointing: bool = False, seed: int | None = None) -> Any:
    """The model a stage trains: a saved LoRA adapter on its base, trained on; else the base
    (4-bit with `quantization`) with a fresh LoRA adapter when `lora` is set, or all of it.

    `seed` seeds the fresh adapter's initialisation (TRL's trainers seed only when they are
    built, after the model), so a stage is the same whatever ran before it in the process.
    """
    from ..models import apply_lora, is_adapter_dir, load_causal_lm, load_peft_model

    if is_adapter_dir(model_path):  # e.g. an earlier stage's adapter: keep training it
        if lora is not None:
            raise ConfigError(f"model: {model_path} is a LoRA adapter; drop `lora` to keep "
                              "training it, or give its merged model")
        return load_peft_model(model_path, quantization=quantization, trainable=True,
                               gradient_checkpointing=gradient_checkpointing)
    model = load_causal_lm(model_path, quantization=quantization)
    if lora is not None:
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    return model


def keep_float32_adapter_on_cpu(model: Any, quantization: Any) -> None:
    """Undo TRL's bf16 cast of QLoRA adapters when the compute dtype is float32 (CPU).

    TRL follows the QLoRA paper (adapters in bf16) for every quantized model; with float32
    compute that only loses precision (small Adam updates vanish in bf16) and mixes dtypes.
    """
    import torch

    if quantization is None or not quantization.load_in_4bit:
        return
    if quantization.resolved_compute_dtype() != torch.float32:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Checkpoints and finishing
# --------------------------------------------------------------------------------------------

def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
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
            why = _unusable_checkpoint(child)
            if why:
                logger.warning("skipping checkpoint %s: %s", child, why)
                continue
            steps.append((int(step), child))
    return str(max(steps)[1]) if steps else None


#: files any of which holds a checkpoint's weights (what transformers' resume looks for)
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def _unusable_checkpoint(path: Path) -> str | None:
    """Why transformers could not resume from `path` (None: it can): a trainer state that is not
    a state (`{}`, torn JSON) or no weights."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json holds no global_step"
    names = {p.name for p in path.iterdir()}
    nested = any(p.is_dir() and ({"adapter_model.safetensors", "adapter_model.bin"}
                                 & {q.name for q in p.iterdir()}) for p in path.iterdir())
    if not (names & set(_CHECKPOINT_WEIGHTS) or nested
            or any(n.startswith("pytorch_model_fsdp") for n in names)):
        return "no model or adapter weights"
    return None


def resume_checkpoint(output_dir: str | os.PathLike, resume: bool, stage: str) -> str | None:
    """The checkpoint to resume from (`last_checkpoint` when `resume`), logged when there is one."""
    checkpoint = last_checkpoint(output_dir) if resume else None
    if checkpoint:
        logger.info("resuming %s from %s", stage, checkpoint)
    return checkpoint


def resource_metrics() -> dict[str, int]:
    """Peak GPU memory (when CUDA is up) and peak resident memory of this process, in bytes."""
    import torch

    out: dict[str, int] = {}
    if torch.cuda.is_available():
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    try:
        import resource

        out["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - not on Linux
        pass
    return out


def finish_stage(trainer: Any, output_dir: str | os.PathLike, metrics: dict[str, Any], *,
                 metrics_file: str, started: float, stage: str, settings: Any,
                 **record: Any) -> dict[str, Any]:
    """Add wall time, peak memory and the log history to `metrics`; on the main process write
    them to `metrics_file` and the stage record (`stage`, `record`, `settings`) to STAGE_FILE.
    """
    out = Path(output_dir)
    metrics["wall_time_s"] = round(time.time() - started, 3)
    metrics.update(resource_metrics())
    metrics["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        from .resume import finish_run

        atomic_write_json(out / metrics_file, metrics)
        atomic_write_json(out / STAGE_FILE, {"stage": stage, **record,
                                             "settings": dataclasses.asdict(settings)})
        write_artifacts(trainer, out, metrics, stage=stage, settings=settings, record=record)
        finish_run(out)  # last: a rerun of this config now has nothing to do
    return metrics


def write_artifacts(trainer: Any, output_dir: Path, metrics: Mapping[str, Any], *, stage: str,
                    settings: Any, record: Mapping[str, Any]) -> None:
    """Each artifact folder's load recipe and model card (:mod:`rlhf_plugins.artifact_card`)."""
    from ..artifact_card import write_artifact_files
    from .resume import plugin_versions, settings_components

    write_artifact_files(trainer.model, output_dir, stage=stage, record=record,
                         quantization=getattr(settings, "quantization", None), metrics=metrics,
                         plugins=plugin_versions(settings_components(settings)))


def finished_stage(output_dir: str | os.PathLike, stage: str,
                   metrics_file: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, stage record) of the finished run in `output_dir` that a rerun of the same
    config returns without a training step (`output_state(...).finished`)."""
    from ..cache import read_json

    out = Path(output_dir)
    logger.info("%s: %s already holds a finished run of this config; nothing to do "
                "(overwrite: true retrains)", stage, out)
    metrics, record = read_json(out / metrics_file), read_json(out / STAGE_FILE)
    return (metrics if isinstance(metrics, dict) else {}), (record if isinstance(record, dict) else {})


__all__ = [
    "FILE_BUILDERS", "SYNTHETIC", "apply_overrides", "build_trl_config",
    "finish_stage", "finished_stage", "keep_float32_adapter_on_cpu", "last_checkpoint", "load_dataset_source",
    "load_trainable_model", "parse_override", "read_stage_source", "resource_metrics",
    "resume_checkpoint", "stage_config",
]
