"""Unpaired rows (prompt, completion, label) -> our template + masking -> KTOTrainer rows.

The encoding is the DPO stage's (:func:`rlhf_plugins.stages.dpo.data.completion_features`):
the prompt is never trained, the masking plugin picks the completion's trained tokens. Paired
rows (TRL's preference formats) are unpaired as TRL's KTOTrainer does: chosen is desirable,
rejected is not. Graded samples of an earlier stage become rows labelled by the verifier.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ...errors import DataError
from ..bad_rows import DroppedRows
from ..dpo.data import completion_features, encode_rows, id_features, pair_messages, split_prompt
from ..sft.dataset import get_components

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

__all__ = ["encode_unpaired", "labelled_samples", "synthetic_unpaired_rows", "unpaired_messages",
           "write_labelled_samples"]


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"label: expected true/false, got {value!r}")


def unpaired_messages(row: Mapping[str, Any]) -> list[tuple[list[dict], list[dict], bool]]:
    """(prompt, completion, label) of an unpaired row, or the two of a preference pair."""
    from ...head_data import as_messages

    if row.get("completion") is None and row.get("chosen") is not None:
        prompt, chosen, rejected = pair_messages(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    missing = [k for k in ("prompt", "completion", "label") if row.get(k) is None]
    if missing:
        raise DataError(f"missing field(s) {', '.join(missing)} (expected prompt, completion, "
                        "label; or prompt, chosen, rejected)")
    return [(as_messages(row["prompt"], "user", "prompt"),
             as_messages(row["completion"], "assistant", "completion"), _label(row["label"]))]


def encode_unpaired(rows: "Iterable[Mapping[str, Any]] | Dataset", tokenizer: Any,
                    template: Any = "chatml", masking: Any = "all_assistant_turns",
                    *, where: str = "dataset", max_length: int | None = None,
                    **bad_rows: Any) -> tuple["Dataset", DroppedRows]:
    """Rows -> a Dataset of `prompt_ids`, `completion_ids`, `completion_mask`, `label`, and the
    rows dropped (bad rows under `bad_rows="skip"`, no trained token within `max_length`)."""
    tpl, msk = get_components(template, masking)

    def encode(row: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        for prompt, completion, label in unpaired_messages(row):
            ids, mask = completion_features(prompt, completion, tokenizer, tpl, msk)
            cut = split_prompt([ids], [mask])
            out.append({"prompt_ids": ids[:cut], "completion_ids": ids[cut:],
                        "completion_mask": mask[cut:], "label": label})
        return out

    from datasets import Value

    features = {**id_features("prompt_ids", "completion_ids", "completion_mask"),
                "label": Value("bool")}
    return encode_rows(rows, encode, ("completion",), features, where=where,
                       max_length=max_length, **bad_rows)


def synthetic_unpaired_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """The synthetic task's preference pairs, each as a desirable and an undesirable row (shuffled)."""
    import random

    from ...data import synth

    rows = []
    for pair in synth.preference_rows(n, seed, split):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    # KTO's KL term pairs each prompt with its batch neighbour's completion: not the same prompt
    random.Random(seed).shuffle(rows)
    return rows


def labelled_samples(rows: Iterable[Mapping[str, Any]], *, min_reward: float = 0.5,
                     holdout_every: int = 3, where: str = "sample") -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows from graded samples (rows of `where`: a file names a bad row by
    its line): each sample labelled by the verifier (reward at least `min_reward`: desirable);
    every `holdout_every`-th prompt is held out."""
    from ...data.verified_pairs import missing_sample_fields

    train: list[dict] = []
    held_out: list[dict] = []
    for i, row in enumerate(rows):
        problem = missing_sample_fields(row, where, i)
        if problem:
            raise DataError(problem)
        if row["reward"] is None:  # not graded
            continue
        item = {"prompt": row["prompt"], "completion": row["completion"],
                "label": float(row["reward"]) >= min_reward, "prompt_index": row["prompt_index"]}
        (held_out if int(row["prompt_index"]) % holdout_every == 0 else train).append(item)
    return train, held_out


def write_labelled_samples(samples_jsonl: str | os.PathLike, out_dir: str | os.PathLike,
                           **options: Any) -> dict[str, str] | None:
    """Write `kto_samples_train.jsonl` (+ `kto_samples_heldout.jsonl` when a prompt is held out)
    under `out_dir`; None when the training side lacks a desirable or an undesirable row."""
    from ...cache import atomic_write_jsonl

    from ...data.verified_pairs import split_graded_samples

    train, held_out = split_graded_samples(samples_jsonl, labelled_samples, **options)
    if len({r["label"] for r in train}) < 2:
        return None
    out = Path(out_dir)
    paths = {"train": out / "kto_samples_train.jsonl"}
    atomic_write_jsonl(paths["train"], train)
    if held_out:
        paths["eval"] = out / "kto_samples_heldout.jsonl"
        atomic_write_jsonl(paths["eval"], held_out)
    return {key: str(p) for key, p in paths.items()}
