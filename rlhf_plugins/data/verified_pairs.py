"""Preference pairs from the policy's own samples, graded by a verifier (on-policy RM data).

A reward model trained on synthetic pairs learns what the synthetic rejections look like, not
what the policy gets wrong. Rejection sampling already draws several completions per prompt
from the policy and grades each one (``all.jsonl`` of ``rlhf-plugins sample``, rows with
``prompt_index``, ``prompt``, ``completion`` and ``reward``). For every prompt with at least one
completion at or above ``min_reward`` and one below it, this pairs a passing completion
(``chosen``) with a failing one (``rejected``), up to ``max_per_prompt`` pairs. Prompts are split,
not pairs: every ``holdout_every``-th prompt goes to the held-out pairs, so no held-out prompt
is seen in training.
"""
from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError, DataError
from ..guard import row_place

__all__ = ["verified_pairs", "write_pair_files", "write_verified_pairs", "ON_POLICY_KIND"]

#: ``rejected_kind`` of every pair (the RM's per-kind held-out accuracy is keyed by it)
ON_POLICY_KIND = "on_policy"


def missing_sample_fields(row: Mapping[str, Any], where: str, index: int) -> str | None:
    """What row `index` of `where` lacks to be a graded sample, the row named by its 1-based
    number (the file's line for JSON lines); None when nothing. A null counts as missing (a
    `datasets` row holds every key any row has), except a null reward: ungraded."""
    missing = [k for k in ("prompt_index", "prompt", "completion", "reward") if k not in row
               or (row[k] is None and k != "reward")]
    if not missing:
        return None
    return (f"{row_place(where, index)}: missing field(s) {', '.join(missing)} "
            "(expected an `rlhf-plugins sample` all.jsonl)")


def verified_pairs(rows: Iterable[Mapping[str, Any]], *, min_reward: float = 0.5,
                   max_per_prompt: int = 2, holdout_every: int = 3, seed: int = 0,
                   where: str = "sample") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train pairs, held-out pairs) from graded samples (rows of `where`: a file names a bad
    row by its line); ungraded samples (reward null) are left out; deterministic for a seed."""
    if max_per_prompt < 1:
        raise ConfigError(f"max_per_prompt must be at least 1, got {max_per_prompt!r}")
    if holdout_every < 2:
        raise ConfigError(f"holdout_every must be at least 2, got {holdout_every!r}")
    by_prompt: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for i, row in enumerate(rows):
        problem = missing_sample_fields(row, where, i)
        if problem:
            raise ConfigError(problem)
        if row["reward"] is not None:
            by_prompt[int(row["prompt_index"])].append(row)
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    held_out: list[dict[str, Any]] = []
    for index in sorted(by_prompt):
        samples = sorted(by_prompt[index], key=lambda r: r.get("completion_index", 0))
        good = [r for r in samples if float(r["reward"]) >= min_reward]
        bad = [r for r in samples if float(r["reward"]) < min_reward]
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for chosen, rejected in combos[:max_per_prompt]:
            pair = {"prompt": chosen["prompt"], "chosen": chosen["completion"],
                    "rejected": rejected["completion"], "rejected_kind": ON_POLICY_KIND,
                    "prompt_index": index, "chosen_reward": float(chosen["reward"]),
                    "rejected_reward": float(rejected["reward"])}
            for key in ("uid", "kind", "answer"):
                if chosen.get(key) is not None:
                    pair[key] = chosen[key]
            (held_out if index % holdout_every == 0 else train).append(pair)
    return train, held_out


def split_graded_samples(samples_jsonl: str | os.PathLike,
                         build: Callable[..., tuple[list[dict[str, Any]], list[dict[str, Any]]]],
                         **options: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) rows that `build(rows, where=..., **options)` makes of the graded
    samples in `samples_jsonl` (one JSON object per line, as rejection sampling writes them),
    read as a memory-mapped Dataset; a bad row is named by the file and its line."""
    from .files import load_data_file

    path = Path(samples_jsonl)
    rows = load_data_file(path) if path.stat().st_size else []  # no samples: no pairs, no error
    try:
        return build(rows, where=str(path), **options)
    except (ConfigError, DataError) as exc:
        if str(exc).startswith(str(path)):  # a bad row: named by the file and its line
            raise
        raise type(exc)(f"{path}: {exc}") from None


def write_pair_files(train: list[dict[str, Any]], held_out: list[dict[str, Any]],
                     out_dir: str | os.PathLike, stem: str) -> dict[str, str] | None:
    """Write ``<stem>_train.jsonl`` / ``<stem>_heldout.jsonl`` under `out_dir`.

    Returns ``{"pairs_train": path, "pairs_eval": path}``, or None when either side has no pair:
    the caller keeps its other data.
    """
    from ..cache import atomic_write_jsonl

    if not train or not held_out:
        return None
    out = Path(out_dir)
    paths = {"pairs_train": out / f"{stem}_train.jsonl", "pairs_eval": out / f"{stem}_heldout.jsonl"}
    atomic_write_jsonl(paths["pairs_train"], train)
    atomic_write_jsonl(paths["pairs_eval"], held_out)
    return {key: str(p) for key, p in paths.items()}


def write_verified_pairs(samples_jsonl: str | os.PathLike, out_dir: str | os.PathLike,
                         **options: Any) -> dict[str, str] | None:
    """Write ``preference_on_policy_train.jsonl`` / ``..._heldout.jsonl`` under `out_dir`
    (:func:`write_pair_files`; None when every prompt is all-pass or all-fail)."""
    train, held_out = split_graded_samples(samples_jsonl, verified_pairs, **options)
    return write_pair_files(train, held_out, out_dir, "preference_on_policy")
