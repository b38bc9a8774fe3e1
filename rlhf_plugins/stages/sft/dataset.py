"""SFT data: rows (file, hub or synthetic) -> conversations -> `input_ids` + `assistant_masks`.

The dataset is encoded here, not by TRL: each conversation is rendered by the chat template
component named in the config (`registry().chat_templates`), the masking strategy
(`registry().masking_strategies`) picks the trained tokens, and the trainer receives
pre-tokenized rows `{"input_ids", "assistant_masks"}`. Rows are encoded through
`datasets.Dataset.map` (:func:`~rlhf_plugins.stages.bad_rows.map_rows`): a bad row is an error
or, with `bad_rows: skip`, dropped and counted.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ...errors import ConfigError, DataError
from ...guard import check_mask, guarded
from ...protocols import member
from ..bad_rows import ROW, DroppedRows, bad_row, map_rows
from ..skeleton import SYNTHETIC, load_dataset_source
from .settings import SFTSettings

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)


def get_components(template: Any, masking: Any) -> tuple[Any, Any]:
    """The chat template and masking components, given names (looked up) or components."""
    from ... import registry

    reg = registry()
    tpl = reg.chat_templates.get(template) if isinstance(template, str) else template
    msk = reg.masking_strategies.get(masking) if isinstance(masking, str) else masking
    return tpl, msk


def load_rows(settings: SFTSettings, dataset: str | None = None,
              split: str | None = None) -> tuple[Any, str]:
    """The raw rows named by `settings.dataset` (or `dataset`) and a label naming the source."""
    split = split or settings.dataset_split
    dataset = dataset or settings.dataset
    if dataset == SYNTHETIC:
        from ...data import synth

        n = settings.num_examples or 256
        return synth.sft_rows(n, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    return load_dataset_source(dataset, split=split, config=settings.dataset_config,
                               num_examples=settings.num_examples)


def row_messages(row: Mapping[str, Any], messages_field: str = "messages") -> list[dict]:
    """The conversation of one row: `row[messages_field]`, or TRL's `prompt` + `completion`
    (message lists, or plain strings: one user turn and one assistant turn)."""
    from ...head_data import as_messages

    if messages_field in row and row[messages_field] is not None:
        messages = row[messages_field]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        messages = (as_messages(row["prompt"], "user", "prompt")
                    + as_messages(row["completion"], "assistant", "completion"))
    else:
        raise DataError(f"missing field {messages_field!r} (or prompt + completion, or text)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"field {messages_field!r} must be a non-empty list of messages")
    return list(messages)


def row_text(row: Mapping[str, Any], messages_field: str = "messages") -> str | None:
    """A language-modelling row's `text` (TRL's standard format), or None for a conversation."""
    if messages_field in row and row[messages_field] is not None:
        return None
    if row.get("prompt") is not None or "text" not in row:
        return None
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError("text: expected a non-empty string")
    return text


def _text_features(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """TRL's language modelling: the text tokenized (special tokens added) + eos, all trained."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids, [1] * len(ids)


def sft_features() -> dict[str, Any]:
    """The Arrow features of encoded SFT rows."""
    from datasets import Sequence, Value

    return {"input_ids": Sequence(Value("int64")), "assistant_masks": Sequence(Value("int64"))}


def encode_sft_rows(rows: "Iterable[Mapping[str, Any]] | Dataset", tokenizer: Any,
                    template: Any = "chatml", masking: Any = "all_assistant_turns", *,
                    messages_field: str = "messages", where: str = "dataset",
                    bad_rows: str = "error", max_bad_fraction: float = 0.01,
                    num_proc: int | None = None) -> tuple["Dataset", DroppedRows]:
    """Encode conversations (through `Dataset.map`) into `input_ids` + `assistant_masks` (0/1) +
    `row` (the row's number in `where`), and the rows dropped (`bad_rows: skip`)."""
    tpl, msk = get_components(template, masking)

    def encode(row: Mapping[str, Any]) -> list[dict[str, Any]]:
        text = row_text(row, messages_field)
        if text is not None:
            ids, mask = _text_features(text, tokenizer)
            return [{"input_ids": ids, "assistant_masks": mask}]
        messages = row_messages(row, messages_field)
        # Full validation (roles the template supports, system first, tool results after
        # calls, ends with an assistant turn); the Protocol's default when it declares none.
        with guarded(tpl, "chat_templates", "validate()"):
            messages = member(tpl, "chat_templates", "validate")(messages, for_training=True)
        check_assistant_content(messages)
        with guarded(tpl, "chat_templates", "encode()"):
            encoded = tpl.encode(messages, tokenizer=tokenizer, add_generation_prompt=False)
        with guarded(msk, "masking_strategies", "mask()"):
            raw_mask = msk.mask(encoded)
        mask = check_mask(raw_mask, len(encoded.input_ids), msk)  # one 0/1 value per token
        if not any(mask):
            raise bad_row(f"no token is trained (masking {getattr(msk, 'name', msk)!r} masks the "
                          "whole conversation)", "no_trained_token")
        return [{"input_ids": list(encoded.input_ids), "assistant_masks": mask}]

    dataset, drops = map_rows(rows, encode, sft_features(), where=where, bad_rows=bad_rows,
                              max_bad_fraction=max_bad_fraction, num_proc=num_proc,
                              desc="Encoding conversations")
    if len(dataset) == 0:
        raise DataError(f"{where}: no rows" + (f" (dropped: {drops.describe()})" if drops.dropped
                                               else ""))
    return dataset, drops


def build_sft_dataset(rows: "Iterable[Mapping[str, Any]] | Dataset", tokenizer: Any,
                      template: Any = "chatml", masking: Any = "all_assistant_turns", *,
                      messages_field: str = "messages", where: str = "dataset",
                      bad_rows: str = "error", max_bad_fraction: float = 0.01,
                      num_proc: int | None = None) -> "Dataset":
    """Encode conversations into an HF Dataset of `input_ids` + `assistant_masks` (0/1)."""
    dataset, drops = encode_sft_rows(rows, tokenizer, template, masking,
                                     messages_field=messages_field, where=where, bad_rows=bad_rows,
                                     max_bad_fraction=max_bad_fraction, num_proc=num_proc)
    drops.warn()
    return dataset.remove_columns(ROW)


def check_assistant_content(messages: Sequence[Mapping[str, Any]]) -> None:
    """DataError for an assistant turn with nothing in it (no text, tool call or reasoning):
    training on it teaches the model to answer with an empty turn."""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or m.get("tool_calls"):
            continue
        if not any(isinstance(m.get(k), str) and m[k].strip()
                   for k in ("content", "thinking", "reasoning_content")):
            raise bad_row(f"message {i}: empty assistant content (nothing to train on); "
                          "drop the row or give the assistant turn some text", "empty_answer")


def drop_truncated(dataset: "Dataset", args: Any, where: str,
                   drops: DroppedRows | None = None) -> tuple["Dataset", int]:
    """Remove (and count) the rows TRL would drop after truncating to `max_length`: those whose
    trained tokens all lie in the cut-off part. DataError when no row is left. With `drops`
    (and a `row` column), they are counted there as `truncated` and `drops` warns once."""
    if args.max_length is None or getattr(args, "packing", False) or dataset is None:
        return dataset, 0
    if args.truncation_mode not in ("keep_start", "keep_end"):
        raise ConfigError(f"truncation_mode: expected 'keep_start' or 'keep_end', got "
                          f"{args.truncation_mode!r}")
    cut = slice(None, args.max_length) if args.truncation_mode == "keep_start" \
        else slice(-args.max_length, None)
    masks = dataset["assistant_masks"]
    keep = [i for i, m in enumerate(masks) if any(m[cut])]
    dropped = len(dataset) - len(keep)
    if drops is not None and dropped:
        numbers = dataset[ROW] if ROW in dataset.column_names else range(1, len(dataset) + 1)
        kept = set(keep)
        for i, number in enumerate(numbers):
            if i not in kept:
                drops.add("truncated", number)
    if not keep:
        raise DataError(f"{where}: no row has a trained token within max_length={args.max_length} "
                        f"(truncation_mode {args.truncation_mode}); raise max_length")
    if dropped:
        if drops is None:
            logger.warning("%s: %d of %d rows have no trained token within max_length=%d and are "
                           "dropped", where, dropped, len(dataset), args.max_length)
        dataset = dataset.select(keep)
    return dataset, dropped


def split_eval(dataset: "Dataset", settings: SFTSettings, seed: int) -> tuple["Dataset", "Dataset | None"]:
    """Hold out `eval_size` rows or `eval_fraction` of them (deterministic by seed)."""
    n = len(dataset)
    k = settings.eval_size if settings.eval_size is not None else int(round(n * settings.eval_fraction))
    if k <= 0:
        return dataset, None
    if k >= n:
        raise ConfigError(f"eval_size/eval_fraction: would hold out {k} of {n} rows, leaving none "
                          "to train on")
    parts = dataset.train_test_split(test_size=k, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
