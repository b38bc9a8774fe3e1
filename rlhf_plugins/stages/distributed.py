"""Process coordination for runs under `accelerate launch` (no-ops in a single process).

The TRL trainers coordinate their own training; these helpers cover the work around them that
every process would otherwise repeat on the same files: writing data, evaluating, generating
and scoring samples (the main process goes first and fills the caches, the others then read
them), clearing a stage folder, and merging an adapter (main process only).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def is_distributed() -> bool:
    """True when this process is one of several (torchrun/accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    """True in the main process, and always in a single-process run."""
    return not is_distributed() or _state().is_main_process


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first; the others run it after the main one finished."""
    if not is_distributed():
        yield
        return
    with _state().main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier across processes (nothing in a single process)."""
    if is_distributed():
        _state().wait_for_everyone()
