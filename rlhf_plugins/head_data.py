"""Row and batch helpers for reward heads: render rows with a chat template, pad, read scores.

Reward heads (built-in or third-party) turn rows into token ids + supervision and batches into
tensors with these. A row's prompt/completion is text, one message or a message list; it is
rendered with a chat template component (``encode(messages) -> Encoded`` with per-token
roles/turns) and cut right after the completion's end-of-turn token.

Importing this module does not import torch (the tensor helpers import it when called).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

from .errors import ConfigError, DataError

__all__ = [
    # rows
    "as_messages", "prompt_messages", "content_text", "render_completion", "render_row",
    "render_ranked", "split_steps", "render_steps", "step_end_positions", "step_end_features",
    "scoring_features",
    # labels
    "IGNORE_INDEX", "PRM_CLASS_OF_LABEL", "finite_number", "outcome_label", "step_label",
    "step_labels",
    # batches and scores
    "resolve_pad_token_id", "pad_batch", "rank_major_batch", "last_attended_index",
    "at_last_attended", "aggregate_probabilities",
]

#: label value meaning "no supervision at this position" (as :data:`rlhf_plugins.losses.IGNORE_INDEX`)
IGNORE_INDEX = -100
#: step label (-1 incorrect, 0 neutral, +1 correct) -> PRM class index (as in :mod:`rlhf_plugins.losses`)
PRM_CLASS_OF_LABEL = {-1: 0, 0: 1, 1: 2}


# --- rendering rows with a chat template ----------------------------------------------------

def as_messages(value: Any, role: str, field: str) -> list[dict]:
    """A prompt/completion given as text, one message or a message list, as a message list."""
    if value is None:  # a key missing from this row of a file whose other rows have it
        raise DataError(f"{field}: missing")
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        out = []
        for i, m in enumerate(value):
            if "role" not in m or "content" not in m:
                raise DataError(f"{field}[{i}]: a message needs 'role' and 'content'")
            out.append(dict(m))
        return out
    raise DataError(f"{field}: expected text or a non-empty list of messages, got "
                    f"{type(value).__name__}")


def prompt_messages(row: Mapping[str, Any]) -> list[dict]:
    """The row's ``prompt`` as a message list (no prompt: an empty list)."""
    prompt = row.get("prompt")
    if prompt is None:
        return []
    if isinstance(prompt, str) and not prompt.strip():
        raise DataError("prompt: empty")
    return as_messages(prompt, "user", "prompt")


def content_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The concatenated text content of messages (text parts of multimodal content included)."""
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):  # multimodal-style content parts
            parts.extend(str(p.get("text", "")) for p in c if isinstance(p, Mapping))
        elif c is not None:
            parts.append(str(c))
    return "".join(parts)


def render_completion(prompt: list[dict], completion: list[dict], tokenizer: Any, template: Any,
                      max_length: int | None = None) -> tuple[list[int], list[int], Any]:
    """Token ids of prompt + completion (cut after the completion's last token) and its 0/1 mask.

    Returns ``(input_ids, completion_mask, encoded)``; the mask marks the completion messages'
    tokens, including their end-of-turn tokens (the template's scaffolding is 0).
    """
    if template is None or tokenizer is None:
        raise ConfigError("reward head: encoding rows needs a tokenizer and a chat template")
    if not content_text(completion).strip():
        raise DataError("empty completion")
    encoded = template.encode(prompt + completion, tokenizer=tokenizer, add_generation_prompt=False)
    n_prompt = len(prompt)
    mask = [1 if (turn >= n_prompt and role != "template") else 0
            for role, turn in zip(encoded.roles, encoded.turns)]
    if not any(mask):
        raise DataError("empty completion (no completion tokens after rendering)")
    last = max(i for i, m in enumerate(mask) if m)
    ids, mask = list(encoded.input_ids[:last + 1]), mask[:last + 1]
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise DataError(f"the prompt alone fills max_length={max_length}; no completion token left")
    return ids, mask, encoded


def step_end_positions(encoded: Any, turn: int, steps: Sequence[str], tokenizer: Any) -> list[int]:
    """Token positions (in `encoded`) of the last token of each step of message `turn`.

    The message's tokens are decoded; each step is found in that text in order and mapped to
    the first token whose decoded prefix covers the step's last character (binary search over
    prefix decodes, so templates that re-tokenize or trim content are handled).
    """
    positions = [i for i, (t, r) in enumerate(zip(encoded.turns, encoded.roles))
                 if t == turn and r != "template"]
    if not positions:
        raise DataError("the steps' message has no tokens after rendering")
    ids = [encoded.input_ids[p] for p in positions]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cache: dict[int, int] = {}

    def prefix_len(k: int) -> int:
        if k not in cache:
            cache[k] = len(tokenizer.decode(ids[:k], skip_special_tokens=False))
        return cache[k]

    out: list[int] = []
    cursor = 0
    for i, step in enumerate(steps):
        needle = step if step in text[cursor:] else step.strip()
        found = text.find(needle, cursor) if needle else -1
        if found < 0:
            raise DataError(f"steps[{i}]: not found in the rendered completion (the template "
                            "changed its text)")
        last_char = found + len(needle) - 1
        lo, hi = 1, len(ids)  # smallest k with prefix_len(k) > last_char
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_len(mid) > last_char:
                hi = mid
            else:
                lo = mid + 1
        out.append(positions[lo - 1])
        cursor = found + len(needle)
    return out


def render_row(row: Mapping[str, Any], tokenizer: Any, template: Any, max_length: int | None = None,
               *, what: str = "a row") -> tuple[list[int], list[int]]:
    """The row's ``prompt`` + ``completion`` rendered: ``(input_ids, completion_mask)``."""
    if "completion" not in row:
        raise DataError(f"{what} needs 'completion'")
    ids, mask, _ = render_completion(prompt_messages(row),
                                     as_messages(row["completion"], "assistant", "completion"),
                                     tokenizer, template, max_length)
    return ids, mask


def render_ranked(row: Mapping[str, Any], tokenizer: Any, template: Any,
                  max_length: int | None = None) -> list[list[int]]:
    """Token ids of a preference (`chosen`, `rejected`) or ranked (`completions`) row's completions.

    Best first; DataError for a malformed row or two completions identical after rendering.
    """
    if "completions" in row and row["completions"] is not None:
        completions = row["completions"]
        if isinstance(completions, (str, Mapping)) or not isinstance(completions, (list, tuple)):
            raise DataError("completions: expected a list of completions, best to worst")
        if len(completions) < 2:
            raise DataError(f"completions: need at least 2 ranked completions, got {len(completions)}")
        fields = [f"completions[{i}]" for i in range(len(completions))]
    elif "chosen" in row and "rejected" in row:
        completions, fields = [row["chosen"], row["rejected"]], ["chosen", "rejected"]
    else:
        raise DataError("a preference row needs 'chosen' and 'rejected' (or ranked 'completions')")
    prompt = prompt_messages(row)
    ids_list = []
    for value, field in zip(completions, fields):
        try:
            ids, _, _ = render_completion(prompt, as_messages(value, "assistant", field),
                                          tokenizer, template, max_length)
        except DataError as exc:
            text = str(exc)
            raise DataError(text if text.startswith(f"{field}") else f"{field}: {text}") from None
        ids_list.append(ids)
    seen: dict[tuple, int] = {}
    for i, ids in enumerate(ids_list):
        key = tuple(ids)
        if key in seen:
            what = ("chosen == rejected" if len(ids_list) == 2 and "chosen" in row else
                    f"completions {seen[key]} and {i} are identical")
            raise DataError(f"{what} after rendering/truncation"
                            + (f" (max_length={max_length})" if max_length else ""))
        seen[key] = i
    return ids_list


def split_steps(row: Mapping[str, Any], delimiter: str) -> list[str]:
    """The row's ``steps``, or its ``completion`` split on `delimiter`; DataError when empty."""
    if "steps" in row and row["steps"] is not None:
        steps = row["steps"]
        if isinstance(steps, str) or not isinstance(steps, (list, tuple)):
            raise DataError("steps: expected a list of strings")
    elif "completion" in row:
        text = content_text(as_messages(row["completion"], "assistant", "completion"))
        steps = [s for s in text.split(delimiter) if s.strip()]
    else:
        raise DataError("a step row needs 'steps' (or a 'completion' to split into steps)")
    if not steps:
        raise DataError("steps: empty")
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            raise DataError(f"steps[{i}]: empty step")
    return list(steps)


def render_steps(row: Mapping[str, Any], delimiter: str, tokenizer: Any, template: Any,
                 max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps joined by `delimiter` (truncated) and each step's last-token position.

    Positions past `max_length` are kept; callers drop the steps they lose.
    """
    steps = split_steps(row, delimiter)
    prompt = prompt_messages(row)
    completion = [{"role": "assistant", "content": delimiter.join(steps)}]
    ids, _, encoded = render_completion(prompt, completion, tokenizer, template, None)
    ends = step_end_positions(encoded, len(prompt), steps, tokenizer)
    return (ids[:max_length] if max_length is not None else ids), ends


def step_end_features(ids: list[int], ends: Sequence[int], step_labels: Sequence[int] | None = None,
                      max_length: int | None = None) -> dict[str, Any]:
    """``input_ids`` + a 0/1 ``step_mask`` at the step ends within `ids` (with `step_labels`: also
    PRM class ``labels`` there, -100 elsewhere, and the kept ``step_labels``)."""
    step_mask = [0] * len(ids)
    labels = [IGNORE_INDEX] * len(ids)
    kept = 0
    for k, pos in enumerate(ends):
        if pos < len(ids):
            step_mask[pos] = 1
            if step_labels is not None:
                labels[pos] = PRM_CLASS_OF_LABEL[step_labels[k]]
            kept += 1
    if kept == 0:
        raise DataError(f"no step end survives truncation to max_length={max_length}")
    out: dict[str, Any] = {"input_ids": ids, "step_mask": step_mask}
    if step_labels is not None:
        out.update(labels=labels, step_labels=list(step_labels[:kept]))
    return out


def scoring_features(row: Mapping[str, Any], *, tokenizer: Any = None, template: Any = None,
                     max_length: int | None = None) -> dict[str, Any]:
    """A (prompt, completion) row, or pre-tokenized ``input_ids``, -> ``input_ids`` + ``score_mask``."""
    if "input_ids" in row:
        ids = list(row["input_ids"])
        if not ids:
            raise DataError("input_ids: empty")
        mask = list(row.get("completion_mask") or [1] * len(ids))
        return {"input_ids": ids[:max_length] if max_length else ids,
                "score_mask": mask[:max_length] if max_length else mask}
    if "completion" not in row:
        raise DataError("a scoring row needs 'completion' (text or messages) or 'input_ids'")
    ids, mask = render_row(row, tokenizer, template, max_length)
    return {"input_ids": ids, "score_mask": mask}


# --- labels ----------------------------------------------------------------------------------

def finite_number(value: Any, field: str) -> float:
    """`value` as a float, or DataError naming `field` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{field}: expected a finite number, got {value!r}")
    return float(value)


def outcome_label(row: Mapping[str, Any]) -> float:
    """The row's ``label`` (0/1, True/False or a probability) as a float in [0, 1]."""
    if "label" not in row:
        raise DataError("an outcome row needs 'label' (0 or 1)")
    label = row["label"]
    if isinstance(label, bool):
        return float(label)
    if not isinstance(label, numbers.Real) or not (0.0 <= float(label) <= 1.0) or math.isnan(label):
        raise DataError(f"label: expected 0 or 1 (or a probability in [0, 1]), got {label!r}")
    return float(label)


def step_label(value: Any, index: int) -> int:
    """A step label as -1/0/+1 (True/False map to +1/-1); DataError naming ``labels[index]``."""
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, numbers.Integral) and int(value) in PRM_CLASS_OF_LABEL:
        return int(value)
    if isinstance(value, numbers.Real) and float(value) in (-1.0, 0.0, 1.0):
        return int(value)
    raise DataError(f"labels[{index}]: unknown step label {value!r} (expected -1, 0 or +1)")


def step_labels(row: Mapping[str, Any], num_steps: int) -> list[int]:
    """The row's ``labels`` as -1/0/+1, one per step; DataError when missing or miscounted."""
    raw = row.get("labels")
    if raw is None:
        raise DataError("a step row needs 'labels' (one of -1/0/+1 per step)")
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, (list, tuple)):
        raise DataError("labels: expected a list of -1/0/+1")
    if len(raw) != num_steps:
        raise DataError(f"labels: {len(raw)} labels for {num_steps} steps")
    return [step_label(v, i) for i, v in enumerate(raw)]


# --- batches ---------------------------------------------------------------------------------

def resolve_pad_token_id(tokenizer: Any, pad_token_id: int | None = None) -> int:
    """`pad_token_id` if given, else the tokenizer's pad id, else 0."""
    if pad_token_id is not None:
        return int(pad_token_id)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return 0


def pad_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int,
              padding_side: str = "right", extra: Mapping[str, tuple[Any, Any]] | None = None
              ) -> dict[str, Any]:
    """Pad `input_ids` (+ per-token `extra` keys: name -> (pad value, dtype or its name)) into tensors."""
    import torch

    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    extra = {key: (value, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
             for key, (value, dtype) in (extra or {}).items()}
    for key, (value, dtype) in extra.items():
        out[key] = torch.full((n, width), value, dtype=dtype)
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        sl = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[i, sl] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention[i, sl] = 1
        for key, (_, dtype) in extra.items():
            if key in f and f[key] is not None:
                out[key][i, sl] = torch.as_tensor(f[key], dtype=dtype)
    return out


def last_attended_index(attention_mask: Any) -> Any:
    """Index of the last position with attention_mask == 1 per row (left or right padding)."""
    import torch

    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0).long()).argmax(dim=-1)


def at_last_attended(values: Any, mask: Any) -> Any:
    """`values` [B, T] at each row's last position where `mask` is nonzero -> [B]."""
    import torch

    idx = last_attended_index(mask.to(values.device).long())
    return values[torch.arange(values.shape[0], device=values.device), idx]


def rank_major_batch(completions_ids: Sequence[Sequence[Sequence[int]]],
                     margins: Sequence[float | None], pad_token_id: int,
                     padding_side: str = "right") -> dict[str, Any]:
    """Ranked completions of each row (best first) padded rank-major, with pair indices.

    All best completions come first, then all second, ... (for pairs: TRL's chosen block, then
    rejected block). Adds ``ranking`` [rows, K] (sequence index per rank, -1 if absent),
    ``pair_chosen``/``pair_rejected``/``pair_weight`` (every ranked pair, weighted 1/C(K, 2)
    per row) and, when any row has one, ``margin`` per pair (0 unless the row is a pair).
    """
    import torch

    k_max = max(len(c) for c in completions_ids)
    seqs: list[dict[str, Any]] = []
    index = torch.full((len(completions_ids), k_max), -1, dtype=torch.long)
    for k in range(k_max):
        for i, comps in enumerate(completions_ids):
            if k < len(comps):
                index[i, k] = len(seqs)
                seqs.append({"input_ids": comps[k]})
    batch = pad_batch(seqs, pad_token_id, padding_side)
    chosen, rejected, weights, pair_margins = [], [], [], []
    for i, (comps, margin) in enumerate(zip(completions_ids, margins)):
        k = len(comps)
        n_pairs = k * (k - 1) // 2
        for a in range(k):
            for b in range(a + 1, k):
                chosen.append(int(index[i, a]))
                rejected.append(int(index[i, b]))
                weights.append(1.0 / n_pairs)
                pair_margins.append(float(margin or 0.0) if k == 2 else 0.0)
    batch.update(ranking=index, pair_chosen=torch.tensor(chosen, dtype=torch.long),
                 pair_rejected=torch.tensor(rejected, dtype=torch.long),
                 pair_weight=torch.tensor(weights, dtype=torch.float32))
    if any(m is not None for m in margins):
        batch["margin"] = torch.tensor(pair_margins, dtype=torch.float32)
    return batch


def aggregate_probabilities(p: Any, logp: Any, mask: Any, how: str) -> Any:
    """Probabilities `p` [B, T] (`logp` their logs) over bool `mask` -> [B]: min/mean/product/last."""
    import torch

    if how == "min":
        return p.masked_fill(~mask, float("inf")).min(dim=-1).values
    if how == "mean":
        return (p * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if how == "product":  # in log space
        return torch.exp((logp * mask).sum(-1))
    if how == "last":
        return at_last_attended(p, mask)
    raise ConfigError(f"aggregation must be one of min, mean, product, last, got {how!r}")
