"""Crash-safe files: atomic writes, the cache folder, a keyed JSON cache, model fingerprints.

The one place that writes files atomically (the rest of the package calls it): everything is
written through a temp file or folder beside the destination and `os.replace`, so a reader (or
a resumed run) sees either the old file or the complete new one, never half of one. Light
module: no torch import.
"""
from __future__ import annotations

import glob
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


def cache_dir() -> Path:
    """The rlhf-plugins cache folder (`$RLHF_PLUGINS_CACHE` or `~/.cache/rlhf-plugins`)."""
    env = os.environ.get("RLHF_PLUGINS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf-plugins"


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str | bytes]) -> int:
    """Stream `lines` into a temp file next to `path`, fsync, `os.replace`; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for line in lines:
                handle.write(line.encode("utf-8") if isinstance(line, str) else line)
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # disk full, killed, ...: the previous `path` is untouched
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # "no space left" names the file it could not write
        raise
    return count


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder + fsync + `os.replace`."""
    atomic_write_lines(path, [data])
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_figure(path: str | os.PathLike, figure: Any, **savefig: Any) -> Path:
    """Save a matplotlib figure (PNG unless `format` says otherwise) atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, **{"format": "png", **savefig})
    finally:
        plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


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
    _remove_stale_temp_dirs(path)
    tmp = _temp_dir_next_to(path)
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


def atomic_update_dir(path: str | os.PathLike, fill: Callable[[Path], Path | None]) -> Path:
    """Build entries with `fill(tmp_dir)` next to `path`, then move each into `path`.

    `fill` writes into `tmp_dir`, or into a folder inside it that it returns. Entries of `path`
    with the same names are replaced (each by one rename, so every file is old or new, never
    half-written); its other entries (checkpoints, metrics) are kept.
    """
    path = Path(path)
    tmp = _temp_dir_next_to(path)
    try:
        built = fill(tmp) or tmp
        path.mkdir(parents=True, exist_ok=True)
        for item in Path(built).iterdir():
            dest = path / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_stale_temp_files(path: Path) -> None:
    """Delete the temp files that a writer of `path` killed before its rename left beside it.

    Temp file names carry the writer's pid (`.NAME.PID-XXXX.tmp`); only those of processes that
    no longer exist are removed, so a concurrent writer's file is never touched.
    """
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*-*.tmp"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or not stale.is_file():
            continue
        logger.info("removing %s, left by an interrupted write", stale)
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temp_dirs(path: Path) -> None:
    """Delete the temp/old folders a writer of `path` killed mid-write left beside it (a merged
    model is large: a rerun must not leave a copy of it behind)."""
    if not path.parent.is_dir():
        return
    for pattern in (f".{path.name}.*.tmp", f".{path.name}.*.old"):
        for stale in path.parent.glob(pattern):
            if stale.is_dir():
                logger.info("removing %s, left by an interrupted write", stale)
                shutil.rmtree(stale, ignore_errors=True)


def _temp_dir_next_to(path: Path) -> Path:
    """An empty folder beside `path` (same filesystem: renames are atomic), world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; what it becomes may be shared (a cache)
    return tmp


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
