"""PPO's prompt data: the prompt rows, their checks, and held-out prompts that never hold a
training prompt."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ...errors import ConfigError, DataError
from ..bad_rows import DroppedRows
from ..skeleton import SYNTHETIC, load_dataset_source

if TYPE_CHECKING:
    from .settings import PPOSettings

logger = logging.getLogger("rlhf_plugins.stages.ppo.train")


def load_prompt_rows(settings: PPOSettings, split: str | None = None, n: int | None = None,
                     dataset: str | None = None) -> tuple[Any, str]:
    """The prompt dataset (an HF Dataset with a `prompt` column) and a label naming its source."""
    split = split or settings.dataset_split
    dataset = dataset or settings.dataset
    if dataset == SYNTHETIC:
        from ...data import synth

        count = n or settings.num_examples or 256
        return synth.rl_dataset(count, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    rows, source = load_dataset_source(dataset, split=split, config=settings.dataset_config,
                                       num_examples=n or settings.num_examples)
    if "prompt" not in rows.column_names:
        raise DataError(f"{source}: rows need a `prompt` column (a string or a list of messages)")
    # `bad_rows: skip`: bad rows are dropped (and counted) once the tokenizer checked them too
    check_prompt_column(rows["prompt"], source, [] if settings.bad_rows == "skip" else None)
    return rows, source


def check_prompt_column(prompts: Sequence[Any], source: str,
                        problems: list[tuple[int, str]] | None = None) -> None:
    """DataError naming the 1-based row of a prompt that is neither a non-empty string nor a valid
    message list (known roles, not ending with an assistant turn), or whose form differs from the
    first row's (TRL treats the whole dataset as conversational or not from one row). With
    `problems`, a bad row is appended there as (index, message) instead (the form stays an error)."""
    first: str | None = None
    for i, prompt in enumerate(prompts):
        try:
            kind = _prompt_kind(prompt, source, i)
        except DataError as exc:
            if problems is None:
                raise
            problems.append((i, str(exc)))
            continue
        if first is None:
            first, first_index = kind, i
        elif kind != first:
            from ...guard import row_number

            raise DataError(f"{source}: row {row_number(source, i)}: prompt is {kind} but row "
                            f"{row_number(source, first_index)} holds {first}; use one form for "
                            "every row")


def _prompt_kind(prompt: Any, source: str, i: int) -> str:
    """What form row `i`'s prompt has (DataError naming the row when it is a bad prompt)."""
    from ...guard import row_number
    from ...messages import validate_messages

    row = row_number(source, i)
    if isinstance(prompt, str):
        kind = "a string"
        if not prompt.strip():
            raise DataError(f"{source}: row {row}: prompt: empty string")
    elif isinstance(prompt, (list, tuple)):
        kind = "a list of messages"
        try:
            messages = validate_messages(list(prompt), row=row)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{source}: row {row}: prompt: ends with an assistant message")
    else:
        raise DataError(f"{source}: row {row}: prompt: expected a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    return kind


def check_prompt_tokens(prompts: Sequence[Any], tokenizer: Any, template: Any, source: str,
                        label: str | None = None,
                        problems: list[tuple[int, str]] | None = None) -> None:
    """DataError naming the row of a prompt whose content spells one of the tokenizer's special
    tokens (TRL renders prompts as text and parses special tokens in it, so the content would
    become that control token) or a turn marker the template rejects (a forged turn).
    `prompts` are `source`'s rows in order; `label` names them in messages (default `source`).
    With `problems`, a bad row is appended there as (index, message) instead."""
    added = sorted(getattr(tokenizer, "added_tokens_encoder", None) or {}, key=len, reverse=True)
    for i, prompt in enumerate(prompts):
        try:
            _check_tokens(i, prompt, added, tokenizer, template, source, label)
        except DataError as exc:
            if problems is None:
                raise
            problems.append((i, str(exc)))


def _check_tokens(i: int, prompt: Any, added: Sequence[str], tokenizer: Any, template: Any,
                  source: str, label: str | None) -> None:
    from ...guard import guarded, located, row_number

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    place = f"{label or source}: row {row_number(source, i)}"
    for j, message in enumerate(messages):
        content = message.get("content")
        hit = next((t for t in added if isinstance(content, str) and t in content), None)
        if hit is not None:
            raise DataError(f"{place}, message {j}: content contains {hit!r}, a special token "
                            "of the tokenizer; the prompt is rendered as text, so it would "
                            "become that control token: remove it from the data")
    if template is not None and not isinstance(prompt, str):
        try:
            with guarded(template, "chat_templates", "encode()"):
                template.encode(messages, tokenizer=tokenizer, add_generation_prompt=True)
        except DataError as exc:
            raise located(exc, place) from None


def checked_prompts(rows: Any, tokenizer: Any, template: Any, source: str, label: str | None,
                    max_bad_fraction: float) -> tuple[Any, DroppedRows]:
    """`bad_rows: skip`: the prompt rows (`source`'s, in order) without the bad ones (bad form,
    special tokens, forged turn markers), and those counted. DataError when more than
    `max_bad_fraction` of them or all of them are bad."""
    from ...guard import row_number

    problems: list[tuple[int, str]] = []
    prompts = rows["prompt"]
    check_prompt_column(prompts, source, problems)
    bad = {i for i, _ in problems}
    kept = [i for i in range(len(prompts)) if i not in bad]
    later: list[tuple[int, str]] = []
    check_prompt_tokens([prompts[i] for i in kept], tokenizer, template, source, label, later)
    problems += [(kept[i], message) for i, message in later]  # back to `source`'s indices
    drops = DroppedRows(label or source, len(prompts))
    for i, message in sorted(problems):
        drops.add("invalid", row_number(source, i), message)
    drops.check(max_bad_fraction)
    if drops.dropped == len(prompts):
        raise DataError(f"{label or source}: no prompts left (dropped: {drops.describe()})")
    drops.warn()
    bad = {i for i, _ in problems}
    return (rows.select([i for i in range(len(prompts)) if i not in bad]) if bad else rows), drops


def _prompt_key(prompt: Any) -> str:
    import json

    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return json.dumps(prompt, sort_keys=True, default=str)


def held_out_prompts(settings: PPOSettings, train: Any,
                     check: Callable[[Any, str, str], Any] | None = None) -> tuple[Any, Any]:
    """(training rows, held-out rows or None): the eval rows never hold a training prompt.

    Synthetic data evaluates on its "test" split; `eval_split` / `eval_dataset` name the eval
    rows; otherwise `eval_examples` rows are carved from `train` (seeded) and removed from it.
    Eval rows whose prompt is also a training prompt are dropped (logged). `check(rows, source,
    label)` sees rows loaded from another split or source as `source` holds them (before any drop)
    and returns the rows to keep.
    """
    n = settings.eval_examples or None
    named = settings.eval_split is not None or settings.eval_dataset is not None
    if n is None and not named:
        return train, None
    source = settings.eval_dataset or settings.dataset
    if named or source == SYNTHETIC:
        split = settings.eval_split or ("test" if source == SYNTHETIC else settings.dataset_split)
        if source == settings.dataset and split == settings.dataset_split and source != SYNTHETIC:
            raise ConfigError(f"eval_split: {split!r} is the training split; name another split "
                              "(or leave eval_split unset to carve eval_examples rows out of it)")
        held, label = load_prompt_rows(settings, split=split, n=n, dataset=source)
        if check is not None:  # may drop bad rows (`bad_rows: skip`)
            held = check(held, label, f"{label} (eval)")
    else:
        if n >= len(train):
            raise ConfigError(f"eval_examples: {n} held-out prompts would leave none of the "
                              f"{len(train)} training prompts")
        parts = train.train_test_split(test_size=n, seed=settings.dataset_seed, shuffle=True)
        train, held = parts["train"], parts["test"]
    seen = {_prompt_key(p) for p in train["prompt"]}
    keep = [i for i, p in enumerate(held["prompt"]) if _prompt_key(p) not in seen]
    if len(keep) < len(held):
        logger.warning("held-out prompts: dropped %d that are also training prompts",
                       len(held) - len(keep))
        held = held.select(keep)
    if len(held) == 0:
        raise DataError("held-out prompts: none left that is not a training prompt")
    return train, held
