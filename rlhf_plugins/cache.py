"""Crash-safe files: atomic writes, a keyed JSON cache, and fingerprints of model directories.

Everything here is written through a temp file in the destination folder and `os.replace`, so
a reader (or a resumed run) sees either the old file or the complete new one, never half of
one. Light module: no torch import.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)

#: model-directory files whose size/mtime identify the weights a cache entry was made with
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".gguf", ".jinja")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder + fsync + `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line to `path` atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return atomic_write_text(path, text)


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Build a directory with `fill(tmp_dir)` next to `path`, then swap it into place.

    The old directory (if any) is renamed aside before the new one is renamed in, so `path`
    is never a half-written directory (at worst, after a crash between the two renames, it is
    briefly absent and the complete new one sits next to it under a temp name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class JsonCache:
    """A folder of JSON entries addressed by (name, key); an entry is valid only if its key matches.

    ``get(name, key)`` returns the stored payload or None; ``put(name, key, payload)`` writes it
    atomically. Files are named ``<name>-<key>.json`` so a changed key never reads an old entry.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, name: str, key: str) -> Path:
        """Where the entry (name, key) lives."""
        return self.directory / f"{name}-{key}.json"

    def get(self, name: str, key: str) -> Any | None:
        """The payload stored for (name, key), or None."""
        data = read_json(self.path(name, key))
        if not isinstance(data, dict) or data.get("key") != key or "payload" not in data:
            return None
        return data["payload"]

    def put(self, name: str, key: str, payload: Any) -> Path:
        """Store `payload` for (name, key) atomically; returns the file."""
        return atomic_write_json(self.path(name, key), {"key": key, "name": name,
                                                        "payload": payload})

    def remove_temp_files(self) -> int:
        """Delete temp files left by a killed writer; returns how many."""
        count = 0
        if self.directory.is_dir():
            for item in self.directory.glob(".*.tmp"):
                item.unlink(missing_ok=True)
                count += 1
        return count


def model_fingerprint(ref: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model for caching: a hub id as is; a directory by its files' sizes/mtimes."""
    path = Path(os.fspath(ref)).expanduser()
    if not path.exists():
        return {"ref": os.fspath(ref)}
    files: dict[str, Any] = {}
    if path.is_file():
        stat = path.stat()
        files[path.name] = [stat.st_size, stat.st_mtime_ns]
    else:
        for item in sorted(path.iterdir()):
            if item.is_file() and item.suffix in _FINGERPRINT_SUFFIXES:
                stat = item.stat()
                files[item.name] = [stat.st_size, stat.st_mtime_ns]
    return {"ref": str(path.resolve()), "files": files}
