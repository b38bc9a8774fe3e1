"""Preference pairs from the policy's own samples, scored by a reward model (best vs worst).

The third pair source of the direct-alignment stages (docs/direct_alignment.md): when the
samples of rejection sampling were scored by a reward model (``rewards["reward_model"]`` of each
``all.jsonl`` row), each prompt gives at most one pair: its highest-scored completion
(``chosen``) against its lowest-scored one (``rejected``), kept only when the two scores differ
by at least ``min_margin`` (a near-tie is the reward model's noise, not a preference). As for
verified pairs, prompts are split, not pairs: every ``holdout_every``-th prompt is held out.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, DataError

__all__ = ["scored_pairs", "write_scored_pairs", "SCORED_KIND"]

#: ``rejected_kind`` of every pair
SCORED_KIND = "reward_model_scored"


def _score(row: Mapping[str, Any], key: str) -> float | None:
    value = (row.get("rewards") or {}).get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def scored_pairs(rows: Iterable[Mapping[str, Any]], *, key: str = "reward_model",
                 min_margin: float = 0.0, holdout_every: int = 3, where: str = "sample",
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train pairs, held-out pairs): per prompt, best vs worst by the `key` score, when they
    differ by at least `min_margin`; rows of `where` (a file names a bad row by its line).
    DataError when no row carries a `key` score."""
    from .verified_pairs import missing_sample_fields

    if isinstance(min_margin, bool) or not isinstance(min_margin, (int, float)) or min_margin < 0:
        raise ConfigError(f"min_score_margin: expected a number >= 0, got {min_margin!r}")
    if holdout_every < 2:
        raise ConfigError(f"holdout_every must be at least 2, got {holdout_every!r}")
    by_prompt: dict[int, list[tuple[float, int, Mapping[str, Any]]]] = defaultdict(list)
    seen = 0
    for index, row in enumerate(rows):
        problem = missing_sample_fields(row, where, index)
        if problem:
            raise DataError(problem)
        seen += 1
        score = _score(row, key)
        if score is not None:
            by_prompt[int(row["prompt_index"])].append((score, int(row.get("completion_index", 0)), row))
    if seen and not by_prompt:
        raise DataError(f"no sample carries a {key!r} score (pairs: reward_model needs samples "
                        "scored by a reward model: give rejection_sampling a `reward_model`)")
    train: list[dict[str, Any]] = []
    held_out: list[dict[str, Any]] = []
    for index in sorted(by_prompt):
        # best = highest score (first completion on ties), worst = lowest (last on ties)
        ordered = sorted(by_prompt[index], key=lambda t: (-t[0], t[1]))
        (best, _, chosen), (worst, _, rejected) = ordered[0], ordered[-1]
        if best == worst or best - worst < min_margin:  # one sample, a tie, or too close
            continue
        pair = {"prompt": chosen["prompt"], "chosen": chosen["completion"],
                "rejected": rejected["completion"], "rejected_kind": SCORED_KIND,
                "prompt_index": index, "chosen_score": best, "rejected_score": worst}
        (held_out if index % holdout_every == 0 else train).append(pair)
    return train, held_out


def write_scored_pairs(samples_jsonl: str | os.PathLike, out_dir: str | os.PathLike,
                       **options: Any) -> dict[str, str] | None:
    """Write ``preference_scored_train.jsonl`` / ``..._heldout.jsonl`` under `out_dir`
    (None when either side has no pair)."""
    from .verified_pairs import split_graded_samples, write_pair_files

    train, held_out = split_graded_samples(samples_jsonl, scored_pairs, **options)
    return write_pair_files(train, held_out, out_dir, "preference_scored")
