"""Rejection sampling's prompts: rows of the dataset (or the synthetic task) as validated messages."""
from __future__ import annotations

from typing import Any

from ...errors import DataError
from ..skeleton import SYNTHETIC, load_dataset_source
from .settings import SamplingSettings


def load_prompt_rows(settings: SamplingSettings) -> tuple[list[dict[str, Any]], str]:
    """The prompt rows (each with a conversational `prompt`) and a label naming their source."""
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
    out = []
    for i, row in enumerate(rows):
        if row.get(settings.prompt_field) is None:  # absent (or null in a file whose other rows have it)
            from ...guard import row_number

            raise DataError(f"dataset {label}: row {row_number(label, i)}: missing field "
                            f"{settings.prompt_field!r}")
        prompt = row[settings.prompt_field]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = check_prompt(prompt, i, label)
        extra = {k: v for k, v in row.items() if k != settings.prompt_field}
        out.append({"prompt": prompt, **extra})
    return out, label


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
