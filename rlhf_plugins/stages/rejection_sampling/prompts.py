"""Rejection sampling's prompts: rows of the dataset (or the synthetic task) as validated messages."""
from __future__ import annotations

from typing import Any

from ...errors import DataError
from ..bad_rows import DroppedRows
from ..skeleton import SYNTHETIC, load_dataset_source
from .settings import SamplingSettings


def load_prompt_rows(settings: SamplingSettings) -> tuple[list[dict[str, Any]], str]:
    """The prompt rows (each with a conversational `prompt`) and a label naming their source."""
    rows, label, _, _ = counted_prompt_rows(settings)
    return rows, label


def counted_prompt_rows(settings: SamplingSettings,
                        ) -> tuple[list[dict[str, Any]], str, list[int], DroppedRows]:
    """(prompt rows, source label, each row's index in the source, the rows dropped): under
    `bad_rows: skip` a row without a valid prompt is dropped and counted, else it is an error."""
    from ...guard import row_number

    split = settings.dataset_split
    if settings.dataset == SYNTHETIC:
        from ...data import synth

        rows = synth.rl_rows(settings.num_prompts or 64, seed=settings.dataset_seed, split=split)
        label = f"synthetic[{split}]"
    else:
        dataset, label = load_dataset_source(settings.dataset, split=split,
                                             config=settings.dataset_config,
                                             num_examples=settings.num_prompts)
        rows = [dict(r) for r in dataset]
    if not rows:
        raise DataError(f"dataset: {label}: no rows")
    out, numbers, drops = [], [], DroppedRows(f"dataset {label}", len(rows))
    for i, row in enumerate(rows):
        try:
            if row.get(settings.prompt_field) is None:  # absent (or null in a file whose other rows have it)
                raise DataError(f"dataset {label}: row {row_number(label, i)}: missing field "
                                f"{settings.prompt_field!r}")
            prompt = row[settings.prompt_field]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = check_prompt(prompt, i, label)
        except DataError as exc:
            if settings.bad_rows == "error":
                raise
            drops.add("invalid", row_number(label, i), str(exc))
            continue
        extra = {k: v for k, v in row.items() if k != settings.prompt_field}
        out.append({"prompt": prompt, **extra})
        numbers.append(i)
    drops.check(settings.max_bad_fraction)
    if not out:
        raise DataError(f"dataset {label}: no prompts left (dropped: {drops.describe()})")
    return out, label, numbers, drops


def check_prompt(prompt: Any, i: int, label: str) -> list[dict]:
    """A prompt as validated messages (a DataError naming the 1-based row; no final assistant turn)."""
    from ...messages import validate_messages
    from ...guard import row_number

    row = row_number(label, i)
    try:
        messages = validate_messages(prompt, row=row)
    except DataError as exc:
        raise DataError(f"dataset {label}: {exc}") from None
    if messages[-1].get("role") == "assistant":
        raise DataError(f"dataset {label}: row {row}: the prompt ends with an assistant message")
    return [dict(m) for m in messages]
