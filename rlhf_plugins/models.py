"""Models: settings, loading (full precision or 4-bit NF4), LoRA adapters, model structure.

Which model a reference names (the embedded default model, a .gguf file, a directory, a hub
id) is decided in :mod:`rlhf_plugins.default_model`; its names are re-exported here.

Tokens of SmolLM2: bos = `<|im_start|>`, eos = pad = `<|im_end|>`. Pad == eos is safe for
training with TRL because padding positions are excluded by the attention mask / -100 labels,
not by token id; pad must never equal bos (`<|im_start|>` opens every turn, so masking "pad"
ids would hide turn starts) - `load_tokenizer` checks this.

Heavy libraries (torch, transformers, peft) are imported inside functions only.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .artifact_recipe import PEFT_UNKNOWN_KEY_WARNING, peft_from_pretrained, resolve_base
from .cache import cache_dir
from .default_model import (DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME, INSTALL_COMMAND,
                            convert_gguf, default_model_path, find_default_gguf, resolve_model)
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: dtypes bitsandbytes can pack 4-bit weights into (`quantization.quant_storage`)
QUANT_STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
#: what a finished stage writes next to its artifact: stage name, base model, settings (the
#: quantization an adapter was trained with is read back from it)
STAGE_FILE = "rlhf_plugins_stage.json"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

@dataclass
class LoraSettings:
    """LoRA adapter settings (peft.LoraConfig fields under the names TRL users know)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        tm = self.target_modules
        if not (isinstance(tm, str) and tm) and not (
                isinstance(tm, (list, tuple)) and tm and all(isinstance(m, str) and m for m in tm)):
            raise ConfigError("lora.target_modules must be 'all-linear' or a non-empty list of module "
                              f"names, got {tm!r}")
        if isinstance(tm, tuple):
            self.target_modules = list(tm)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora.bias must be one of 'none', 'all', 'lora_only', got {self.bias!r}")

    def to_peft(self, task_type: str = "CAUSAL_LM") -> Any:
        """The equivalent `peft.LoraConfig`."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=float(self.dropout),
                          target_modules=self.target_modules, bias=self.bias,
                          modules_to_save=self.modules_to_save, task_type=task_type)


@dataclass
class QuantSettings:
    """bitsandbytes quantization of the frozen base weights (QLoRA: 4-bit NF4 + double quant)."""

    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    #: dtype the 4-bit matmuls compute in; "auto" = bfloat16 on a bf16-capable GPU, float16 on
    #: other GPUs, float32 on CPU
    compute_dtype: str = "auto"
    #: dtype the packed 4-bit weights are stored in (bitsandbytes' `bnb_4bit_quant_storage`);
    #: None = bitsandbytes' uint8. FSDP needs every shard in one dtype: set it to the dtype of
    #: the unquantized modules (the compute dtype, e.g. bfloat16) - docs/scaling.md
    quant_storage: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.load_in_4bit, bool):
            raise ConfigError(f"quantization.load_in_4bit must be true/false, got {self.load_in_4bit!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quantization.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"quantization.double_quant must be true/false, got {self.double_quant!r}")
        check_dtype(self.compute_dtype, "quantization.compute_dtype", nullable=False)
        if self.quant_storage is not None and self.quant_storage not in QUANT_STORAGE_DTYPES:
            raise ConfigError(f"quantization.quant_storage: expected one of "
                              f"{', '.join(QUANT_STORAGE_DTYPES)} or null, got {self.quant_storage!r}")

    def resolved_compute_dtype(self) -> "torch.dtype":
        """The torch dtype for `compute_dtype` on this machine."""
        return resolve_dtype(self.compute_dtype)

    def bnb_kwargs(self) -> dict[str, Any] | None:
        """The `BitsAndBytesConfig(**...)` keywords, JSON-ready (dtypes by name, the compute
        dtype resolved on this machine: never "auto"), or None when nothing is quantized. What
        `to_bnb` builds and what a saved adapter records as its `quantization_config`."""
        if not self.load_in_4bit:
            return None
        kwargs: dict[str, Any] = {
            "load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.resolved_compute_dtype()).removeprefix("torch.")}
        if self.quant_storage is not None:
            kwargs["bnb_4bit_quant_storage"] = self.quant_storage
        return kwargs

    def to_bnb(self) -> Any:
        """The equivalent `transformers.BitsAndBytesConfig`, or None when nothing is quantized."""
        kwargs = self.bnb_kwargs()
        if kwargs is None:
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**kwargs)


def quant_settings(value: Any) -> QuantSettings | None:
    """A `QuantSettings` from a mapping (as saved in reward_model.json), true/false, or itself."""
    from .config import build_dataclass

    if value is None or value is False:
        return None
    if value is True:
        return QuantSettings()
    if isinstance(value, QuantSettings):
        return value
    if isinstance(value, Mapping):
        return build_dataclass(QuantSettings, value, "quantization")
    raise ConfigError(f"quantization: expected a mapping or true/false, got {value!r}")


def trained_quantization(artifact_dir: str | os.PathLike) -> QuantSettings | None:
    """The base quantization a stage's saved adapter was trained with (from its STAGE_FILE):
    a QuantSettings, or None (full precision, or not written by one of our stages)."""
    path = Path(artifact_dir) / STAGE_FILE
    try:
        settings = json.loads(path.read_text()).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return quant_settings(settings.get("quantization") if isinstance(settings, dict) else None)


def resolve_adapter_settings(lora: Any, peft: Any, quantization: Any
                             ) -> "tuple[LoraSettings | None, QuantSettings | None]":
    """Normalise a stage's `lora`/`peft` (aliases) and `quantization` fields.

    Each may be a mapping, true/false or already a settings object; a 4-bit base needs LoRA.
    """
    from .config import build_dataclass

    if peft is not None and peft is not False:
        if lora is not None and lora is not False:
            raise ConfigError("peft: give either `lora` or `peft` (the same settings), not both")
        lora = peft
    if isinstance(lora, Mapping):
        lora = build_dataclass(LoraSettings, lora, "lora")
    if isinstance(quantization, Mapping):
        quantization = build_dataclass(QuantSettings, quantization, "quantization")
    lora = LoraSettings() if lora is True else (None if lora is False else lora)
    quantization = QuantSettings() if quantization is True else (
        None if quantization is False else quantization)
    if lora is not None and not isinstance(lora, LoraSettings):
        raise ConfigError(f"lora: expected a mapping or true/false, got {lora!r}")
    if quantization is not None and not isinstance(quantization, QuantSettings):
        raise ConfigError(f"quantization: expected a mapping or true/false, got {quantization!r}")
    if quantization is not None and quantization.load_in_4bit and lora is None:
        raise ConfigError("quantization: a 4-bit base cannot be fully fine-tuned; add `lora` (QLoRA)")
    return lora, quantization


def check_dtype(name: Any, field: str = "dtype", *, nullable: bool = True) -> None:
    """ConfigError (naming `field`) unless `name` is a dtype name a config may give (or None,
    when `nullable`)."""
    if (name is None and nullable) or (isinstance(name, str) and name in _DTYPES):
        return
    allowed = ", ".join(_DTYPES) + (" or null" if nullable else "")
    raise ConfigError(f"{field}: expected one of {allowed}, got {name!r}")


def resolve_dtype(name: "str | torch.dtype | None") -> "torch.dtype":
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    check_dtype(name)
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerBase":
    """Load a tokenizer and make sure it has a pad token distinct from bos (pad = eos is fine)."""
    from transformers import AutoTokenizer

    ref = os.fspath(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer: cannot load {ref}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer: {ref} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is not None and tokenizer.pad_token_id == tokenizer.bos_token_id:
        # Padding with bos would make every padded position look like a turn start; use eos.
        if tokenizer.eos_token is None or tokenizer.eos_token_id == tokenizer.bos_token_id:
            raise ConfigError(f"tokenizer: {ref}: pad token equals bos and there is no distinct eos")
        logger.warning("tokenizer %s: pad token equals bos (%s); padding with eos instead",
                       ref, tokenizer.bos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device_map_for_quantized() -> dict[str, Any] | None:
    """Each process's own GPU under accelerate/DDP; None (CPU) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_causal_lm(path: str | os.PathLike, *, quantization: QuantSettings | None = None,
                   dtype: "str | torch.dtype | None" = None) -> "PreTrainedModel":
    """Load a causal LM, optionally with 4-bit (NF4) frozen weights; CPU works too."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, quantization=quantization, dtype=dtype)


def load_base_as_trained(path: str | os.PathLike, quantization: QuantSettings | None = None,
                         dtype: "str | torch.dtype | None" = None) -> "PreTrainedModel":
    """A base model in full precision as an adapter trained on it saw it.

    With 4-bit `quantization` (QLoRA) these are the *dequantized* 4-bit weights, not the
    original ones: a QLoRA adapter learns against the quantization error too, so merging it
    into (or running it on) the original weights gives a different model from the one trained
    (measured: bench/README.md, issue 16). Without quantization, the weights as saved.
    """
    if quantization is None or not quantization.load_in_4bit:
        return load_causal_lm(path, dtype=dtype)
    return load_causal_lm(path, quantization=quantization, dtype=dtype).dequantize()


def load_pretrained(auto_class: Any, path: str | os.PathLike, *,
                    quantization: QuantSettings | None = None,
                    dtype: "str | torch.dtype | None" = None, what: str = "model",
                    **kwargs: Any) -> "PreTrainedModel":
    """`auto_class.from_pretrained(path)` with our dtype and 4-bit rules (device map, CPU training).

    `what` names the model in the ConfigError of a failed load; `kwargs` go to `from_pretrained`.
    """
    ref = os.fspath(path)
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = quantization.to_bnb()
        # Non-quantized modules (norms, embeddings) in the compute dtype unless told otherwise.
        kwargs["dtype"] = resolve_dtype(dtype if dtype is not None else quantization.compute_dtype)
        device_map = _device_map_for_quantized()
        if device_map is not None:
            kwargs["device_map"] = device_map
    else:
        kwargs["dtype"] = resolve_dtype(dtype)
    try:
        model = auto_class.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot load {ref}: {str(exc).splitlines()[0]}") from None
    if "quantization_config" in kwargs:
        keep_4bit_trainable_on_cpu(model)
    return model


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference layout; returns the count.

    bitsandbytes 0.50 converts a Linear4bit's weight to an AVX512-BF16 inference layout on the
    first CPU forward in eval mode without grad (e.g. an evaluation pass). From then on it runs a
    kernel without autograd support, so gradients flowing *through* the frozen 4-bit layers
    are silently wrong and LoRA adapters in earlier layers get wrong updates (tested in
    tests/test_models.py). Disabling the conversion keeps the dequantise + matmul path, which is
    differentiable. Call it on any 4-bit model that will be trained after an eval forward.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError("4-bit weights were already repacked for CPU inference; call "
                                   "keep_4bit_trainable_on_cpu right after loading")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_quantized(model: Any) -> bool:
    """True when the model's base weights are 4- or 8-bit (bitsandbytes)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _prepare_quantized(model: "PreTrainedModel", gradient_checkpointing: bool) -> "PreTrainedModel":
    """peft's `prepare_model_for_kbit_training`, minus its float32 upcast of half-precision weights.

    The upcast doubles the memory of every non-quantized parameter (embeddings dominate in small
    models); with a float32 model (CPU) there is nothing to upcast and peft's function runs as is.
    """
    import torch
    from peft import prepare_model_for_kbit_training

    half = any(p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit"
               for p in model.parameters())
    if not half:
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers 5 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def apply_lora(model: "PreTrainedModel", lora: LoraSettings, adapter_name: str = "default", *,
               gradient_checkpointing: bool = False) -> Any:
    """Wrap `model` with a trainable LoRA adapter (peft); quantized bases are prepared first."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, lora.to_peft())
        model.set_adapter(adapter_name)
        return model
    if is_quantized(model):
        model = _prepare_quantized(model, gradient_checkpointing)
    elif gradient_checkpointing:
        _enable_checkpointing(model)
    return get_peft_model(model, lora.to_peft(), adapter_name=adapter_name)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a saved PEFT adapter directory (adapter_config.json, no full model config)."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def load_peft_model(adapter_dir: str | os.PathLike, *, quantization: QuantSettings | None = None,
                    dtype: "str | torch.dtype | None" = None, trainable: bool = False,
                    gradient_checkpointing: bool = False) -> Any:
    """Load a saved LoRA adapter on its base model (optionally 4-bit, optionally trainable)."""
    from peft import PeftConfig

    ref = os.fspath(adapter_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_UNKNOWN_KEY_WARNING)
            PeftConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: {ref}: not a PEFT adapter: {str(exc).splitlines()[0]}") from None
    base_ref = adapter_base_model(ref)
    base = load_causal_lm(resolve_model(base_ref), quantization=quantization, dtype=dtype)
    if trainable and is_quantized(base):
        base = _prepare_quantized(base, gradient_checkpointing)
    elif trainable and gradient_checkpointing:
        _enable_checkpointing(base)
    model = peft_from_pretrained(base, ref, is_trainable=trainable)
    for config in model.peft_config.values():  # a base relative to the adapter folder, resolved:
        config.base_model_name_or_path = base_ref  # peft reads it against the cwd when saving
    return model


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model a saved PEFT adapter was trained on (its `base_model_name_or_path`; a
    relative path is relative to the adapter folder)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return resolve_base(adapter_dir, str(json.loads(path.read_text())["base_model_name_or_path"]))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model: {adapter_dir}: not a PEFT adapter ({exc})") from None


def base_model_of(path: str | os.PathLike) -> str:
    """The base model of `path`: its adapter's base for a saved adapter, else `path` itself."""
    return adapter_base_model(path) if is_adapter_dir(path) else os.fspath(path)


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------

def unwrap(model: "nn.Module") -> "nn.Module":
    """Strip DDP / compile-style wrappers (``.module``) and return the wrapped model."""
    from torch import nn

    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def backbone_of(model: "nn.Module") -> "nn.Module":
    """The transformer body (``last_hidden_state`` producer) of a causal LM, PEFT-wrapped or not."""
    from torch import nn

    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, "base_model", None)  # transformers: the `base_model_prefix` module
    return body if isinstance(body, nn.Module) and body is not model else model


def hidden_size_of(model: "nn.Module") -> int:
    """The hidden size of a causal LM's last hidden state (wrapped, PEFT or not)."""
    model = unwrap(model)
    config = model.config if hasattr(model, "config") else backbone_of(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


__all__ = [
    "DEFAULT_MODEL_ALIASES", "DEFAULT_MODEL_NAME", "INSTALL_COMMAND", "LoraSettings",
    "QuantSettings", "adapter_base_model", "apply_lora", "backbone_of", "base_model_of",
    "cache_dir", "convert_gguf", "default_model_path", "find_default_gguf", "hidden_size_of",
    "is_adapter_dir", "is_quantized", "keep_4bit_trainable_on_cpu", "load_base_as_trained",
    "load_causal_lm",
    "load_peft_model", "load_pretrained", "load_tokenizer", "resolve_adapter_settings", "resolve_model", "unwrap",
]
