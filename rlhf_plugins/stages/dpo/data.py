"""Preference rows -> our template + masking components -> pre-tokenized trainer rows.

TRL's DPOTrainer and KTOTrainer tokenize with the tokenizer's own chat template and train every
completion token. Here each (prompt, completion) conversation is rendered by the stage's
`chat_templates` component and its trained tokens are picked by the `masking_strategies`
component, restricted to the completion: whatever the masking plugin says, no token of the
prompt (the messages before the completion, including earlier assistant turns) is trained.
The trainers receive `prompt_ids` + `<completion>_ids` (TRL's tokenized columns) plus
`<completion>_mask` (our per-token mask of the completion part), which the collators of
:mod:`.trainer` turn into TRL's `completion_mask`.

Formats (TRL's): explicit prompt (`prompt`, `chosen`, `rejected`) and implicit prompt
(`chosen`, `rejected` sharing a prefix, split by TRL's `extract_prompt`), each standard (text:
one user turn, one assistant turn) or conversational (message lists); unpaired rows
(`prompt`, `completion`, `label`) for KTO.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from ...errors import DataError
from ...guard import check_mask, guarded
from ...protocols import member
from ..bad_rows import ROW, DroppedRows, bad_row, map_rows
from ..sft.dataset import check_assistant_content, get_components
from ..skeleton import SYNTHETIC, load_dataset_source

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = ["completion_features", "encode_pairs", "encode_rows", "id_features", "load_preference_rows",
           "pair_messages", "split_prompt", "trained_within"]


def load_preference_rows(settings: Any, dataset: str | None = None, split: str | None = None,
                         synthetic: Any = None) -> tuple[Any, str]:
    """The raw rows named by `settings.dataset` (or `dataset`) and a label naming the source;
    "synthetic" calls `synthetic(n, seed, split)` (default: the task's preference pairs)."""
    split = split or settings.dataset_split
    dataset = dataset or settings.dataset
    if dataset == SYNTHETIC:
        from ...data import synth

        make = synthetic or synth.preference_rows
        return make(settings.num_examples or 256, settings.dataset_seed, split), f"synthetic[{split}]"
    return load_dataset_source(dataset, split=split, config=settings.dataset_config,
                               num_examples=settings.num_examples)


def _messages(value: Any, role: str, name: str) -> list[dict]:
    from ...head_data import as_messages

    return as_messages(value, role, name)


def pair_messages(row: Mapping[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of one preference row in any TRL format."""
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise DataError(f"missing field(s) {', '.join(missing)} (expected prompt/chosen/rejected "
                        "or an implicit-prompt chosen/rejected pair)")
    if row.get("prompt") is None:  # implicit prompt: the shared beginning of both
        from trl.data_utils import extract_prompt

        split = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
        if not split["prompt"]:
            raise DataError("chosen and rejected share no prompt (give a `prompt` field)")
        row = {**row, **split}
    return (_messages(row["prompt"], "user", "prompt"), _messages(row["chosen"], "assistant", "chosen"),
            _messages(row["rejected"], "assistant", "rejected"))


def completion_features(prompt: Sequence[Mapping[str, Any]], completion: Sequence[Mapping[str, Any]],
                        tokenizer: Any, template: Any, masking: Any) -> tuple[list[int], list[int]]:
    """(token ids, 0/1 mask) of prompt + completion rendered by `template`; the mask is the
    masking component's, zeroed up to the end of the prompt's last message."""
    messages = [dict(m) for m in prompt] + [dict(m) for m in completion]
    with guarded(template, "chat_templates", "validate()"):
        messages = member(template, "chat_templates", "validate")(messages, for_training=True)
    check_assistant_content(messages[len(prompt):])
    with guarded(template, "chat_templates", "encode()"):
        encoded = template.encode(messages, tokenizer=tokenizer, add_generation_prompt=False)
    with guarded(masking, "masking_strategies", "mask()"):
        raw = masking.mask(encoded)
    mask = check_mask(raw, len(encoded.input_ids), masking)
    # the prompt ends after the last token of its last message (its end-of-turn token included)
    start = max((i + 1 for i, t in enumerate(encoded.turns) if 0 <= t < len(prompt)), default=0)
    mask = [0] * start + list(mask[start:])
    if not any(mask):
        raise bad_row(f"no completion token is trained (masking {getattr(masking, 'name', masking)!r} "
                      "masks the whole completion)", "no_trained_token")
    return list(encoded.input_ids), mask


def split_prompt(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> int:
    """Where the shared prompt ends: at most the common prefix of `sequences` and at most the
    first trained token of each (so the prompt holds no trained token)."""
    first = min(m.index(1) for m in masks)
    common = min(len(s) for s in sequences)
    for i in range(common):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            common = i
            break
    return min(first, common)


def trained_within(row: Mapping[str, Any], keys: Sequence[str], max_length: int | None) -> bool:
    """Whether every completion of an encoded row keeps a trained token within `max_length`
    (TRL's collators keep the start of a longer sequence)."""
    if max_length is None:
        return True
    room = max_length - len(row["prompt_ids"])
    return room > 0 and all(any(row[f"{k}_mask"][:room]) for k in keys)


def id_features(*names: str) -> dict[str, Any]:
    """Arrow features of token-id / 0-1 mask columns named `names`."""
    from datasets import Sequence, Value

    return {name: Sequence(Value("int64")) for name in names}


def encode_rows(rows: "Iterable[Mapping[str, Any]] | Dataset",
                encode_row: Callable[[Mapping[str, Any]], list], keys: Sequence[str],
                features: Mapping[str, Any], *, where: str, max_length: int | None,
                bad_rows: str = "error", max_bad_fraction: float = 0.01,
                num_proc: int | None = None) -> tuple["Dataset", DroppedRows]:
    """`encode_row(row)` (-> encoded rows with `features`) over `rows` through `Dataset.map`, a bad
    row's error naming it (`bad_rows: skip`: dropped and counted); the rows whose completions
    (`keys`) keep no trained token within `max_length` are dropped and counted. DataError when
    none is left."""
    def truncated(encoded: dict[str, Any]) -> str | None:
        return None if trained_within(encoded, keys, max_length) else "truncated"

    dataset, drops = map_rows(rows, encode_row, features, where=where, bad_rows=bad_rows,
                              max_bad_fraction=max_bad_fraction, num_proc=num_proc, drop=truncated)
    if len(dataset) == 0:
        why = f" with a trained token within max_length={max_length}" \
            if drops.counts.get("truncated") else ""
        bad = f" (dropped: {drops.describe()})" if drops.bad else ""
        raise DataError(f"{where}: no rows{why}{bad}")
    drops.warn()
    return dataset.remove_columns(ROW), drops


def encode_pairs(rows: "Iterable[Mapping[str, Any]] | Dataset", tokenizer: Any,
                 template: Any = "chatml", masking: Any = "all_assistant_turns",
                 *, where: str = "dataset", max_length: int | None = None,
                 **bad_rows: Any) -> tuple["Dataset", DroppedRows]:
    """Preference rows -> a Dataset of `prompt_ids`, `chosen_ids`, `rejected_ids`,
    `chosen_mask`, `rejected_mask`, and the rows dropped: bad rows (`bad_rows="skip"`,
    `max_bad_fraction`, see :func:`encode_rows`) and those whose truncation to `max_length` left
    a completion nothing to train."""
    tpl, msk = get_components(template, masking)

    def encode(row: Mapping[str, Any]) -> list[dict[str, Any]]:
        prompt, chosen, rejected = pair_messages(row)
        c_ids, c_mask = completion_features(prompt, chosen, tokenizer, tpl, msk)
        r_ids, r_mask = completion_features(prompt, rejected, tokenizer, tpl, msk)
        cut = split_prompt([c_ids, r_ids], [c_mask, r_mask])
        return [{"prompt_ids": c_ids[:cut], "chosen_ids": c_ids[cut:], "rejected_ids": r_ids[cut:],
                 "chosen_mask": c_mask[cut:], "rejected_mask": r_mask[cut:]}]

    features = id_features("prompt_ids", "chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask")
    return encode_rows(rows, encode, ("chosen", "rejected"), features, where=where,
                       max_length=max_length, **bad_rows)
