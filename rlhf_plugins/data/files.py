"""Data files as `datasets` Datasets: parsed once to Arrow, memory-mapped, never a list of rows.

Every reader of a user's data file (a stage's `dataset`, the pipeline's held-out problems,
``rm mc-labels --problems``, rejection sampling's graded samples) goes through
:func:`load_data_file`, so a file larger than memory streams: `datasets` parses it in chunks
into Arrow files in a scratch folder of this process (removed when it exits) and maps them;
a `Dataset.map` over it writes its output next to them. A broken JSON file is a DataError
naming the file and the 1-based line, as an editor shows it.

Nothing here imports `datasets` at module level.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

__all__ = ["FILE_BUILDERS", "load_data_file", "first_line"]

#: `datasets` builders by file suffix; any other file is read as JSON lines
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

_SCRATCH: list[str] = []


def _scratch_dir() -> str:
    """This process's folder for the Arrow files of parsed data files, removed at exit."""
    if not _SCRATCH:
        path = tempfile.mkdtemp(prefix="rlhf-plugins-data-")
        atexit.register(shutil.rmtree, path, True)
        _SCRATCH.append(path)
    return _SCRATCH[0]


def load_data_file(path: str | Path) -> "Dataset":
    """One data file (.json array or JSON lines, .jsonl, .csv, .parquet; any other suffix is read
    as JSON lines) as a memory-mapped Dataset; DataError when it cannot be read."""
    import datasets

    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower(), "json")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" for every small file is noise
    try:
        # Not the HF cache (a copy of every file a user trains on would pile up there): a scratch
        # folder of this process. A file read twice (same path, size, mtime) is parsed once.
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=_scratch_dir())
    except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many types
        problem = _json_problem(path) if builder == "json" else None
        if problem is not None:
            raise problem from None
        raise DataError(f"{path}: cannot read: {first_line(exc)}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def _json_problem(path: Path) -> DataError | None:
    """What makes a JSON / JSON-lines file unreadable, naming its 1-based line (None: unknown)."""
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            return DataError(f"{path}: no rows")
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # not one JSON document: JSON lines, checked below
        if isinstance(data, list):
            bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
            return None if bad is None else DataError(
                f"{path}: row {bad + 1}: expected a JSON object, got {type(data[bad]).__name__}")
    rows = 0
    with path.open(encoding="utf-8", errors="replace") as handle:  # line by line: files may be large
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return DataError(f"{path}:{number}: invalid JSON: {exc.msg}")
            if not isinstance(row, dict):
                return DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return None if rows else DataError(f"{path}: no rows")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
