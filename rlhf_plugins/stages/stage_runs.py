"""Running one pipeline stage: skip it when its output is up to date, resume it when interrupted.

A finished stage leaves `stage_done.json` (its `StageRecord`: outputs, metrics, wall time, peak
memory, and the entries it left) under the hash of its config; a started one leaves
`stage_started.json`. A stage folder another config left is cleared only when everything in it
is ours (`resume.unclaimed_entries`); anything else is a ConfigError unless `overwrite`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cache import atomic_write_text
from .distributed import main_process_first
from .resume import (DONE_FILE, STARTED_FILE, clear_folder, folder_entries, unclaimed_entries,
                     unclaimed_error)

logger = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB); GPU peak when CUDA is in use."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        import sys
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return max(rss, torch.cuda.max_memory_allocated() / 2**20)
    except Exception:  # noqa: BLE001 - memory reporting never fails a run
        pass
    return rss


@dataclass
class StageRecord:
    """What a stage produced, as stored in its `stage_done.json`."""

    name: str
    hash: str
    outputs: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    skipped: bool = False


def _recorded_hash(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("hash")
    except (OSError, ValueError):
        return None


def run_stage(name: str, stage_dir: Path, stage_hash: str,
              body: Callable[[Path], StageRecord], *, overwrite: bool = False) -> StageRecord:
    """Run `body` unless `stage_dir` holds a finished run with the same hash (then reuse it).

    An interrupted run with the same hash resumes (the stage finds its last checkpoint in
    `stage_dir`); a directory left by a different config is cleared first, so a changed stage
    never resumes from checkpoints of the old one - when all of it is ours; entries no record
    of ours claims are a ConfigError. `overwrite` empties the folder and reruns the stage.
    """
    done = stage_dir / DONE_FILE
    if done.is_file() and not overwrite:
        data = json.loads(done.read_text())
        if data.get("hash") == stage_hash:
            logger.info("stage %s: up to date (hash %s), skipped", name, stage_hash)
            data.pop("entries", None)
            record = StageRecord(**data)
            record.skipped = True
            return record
    with main_process_first():  # under accelerate the other processes then see the new marker
        if stage_dir.is_dir() and (overwrite or _recorded_hash(stage_dir / STARTED_FILE) != stage_hash):
            foreign = [] if overwrite else unclaimed_entries(stage_dir)
            if foreign:
                raise unclaimed_error(stage_dir, foreign, f"stage {name}")
            if clear_folder(stage_dir):
                logger.info("stage %s: %s, starting afresh", name,
                            "overwrite is set" if overwrite else "config changed")
        elif stage_dir.is_dir():
            logger.info("stage %s: resuming the interrupted run in %s", name, stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage_dir / STARTED_FILE, json.dumps({"hash": stage_hash}))
    start = time.perf_counter()
    record = body(stage_dir)
    record.hash = stage_hash
    record.wall_time_s = round(time.perf_counter() - start, 1)
    record.peak_memory_mb = round(peak_memory_mb(), 1)
    data = dataclasses.asdict(record)
    data["entries"] = sorted({*folder_entries(stage_dir), DONE_FILE})
    atomic_write_text(done, json.dumps(data, indent=2, default=str))
    return record
