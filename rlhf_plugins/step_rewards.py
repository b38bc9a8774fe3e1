"""Dense process rewards: step rewards placed on the tokens that end each step.

A reward function may return, per completion, a float, None (unscorable), or **step rewards**:
a list of ``(end_char_offset, value)`` pairs. ``end_char_offset`` is the exclusive end of the
step in the completion text (the step is ``text[start:end_char_offset]``), so it lies in
``1..len(text)``. The step's reward goes on the token that completes the character
``text[end_char_offset - 1]``: the last token covering it (with byte-level BPE one character may
span several tokens; a token may also hold the end of one step and the start of the next).
Several steps ending on the same token add up. A float (or None, as NaN) goes on the last token.

Offsets are found by decoding prefixes of the completion's token ids (``skip_special_tokens=True``,
as TRL decodes completions) and matching them against the text, so any tokenizer works and the
mapping follows the ids actually generated, not a re-tokenization of the text.

Importing this module does not import torch (only :func:`batch_token_rewards` uses it).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Sequence

from .errors import ConfigError, DataError

__all__ = ["PRM_MODES", "batch_token_rewards", "is_step_rewards", "prm_step_rewards",
           "step_end_offsets", "step_rewards_to_tokens"]

PRM_MODES = ("probability", "sign")
"""How :func:`prm_step_rewards` turns a step's PRM output into a reward."""


def is_step_rewards(value: Any) -> bool:
    """Whether a reward function's per-completion value is a step-reward list (not a float/None)."""
    return isinstance(value, (list, tuple))


def step_end_offsets(text: str, delimiter: str = "\n\n") -> list[int]:
    """Exclusive end offsets of the non-blank steps of `text` split on `delimiter` (as ProcessHead)."""
    if not isinstance(delimiter, str) or not delimiter:
        raise ConfigError("step_end_offsets: delimiter must be a non-empty string")
    ends: list[int] = []
    start = 0
    for piece in text.split(delimiter):
        if piece.strip():
            ends.append(start + len(piece))
        start += len(piece) + len(delimiter)
    return ends


def _ids(completion_ids: Any) -> list[int]:
    if hasattr(completion_ids, "tolist"):
        completion_ids = completion_ids.tolist()
    return [int(i) for i in completion_ids]


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _pairs(step_rewards: Sequence[Any], where: str) -> list[tuple[int, float]]:
    """Validated (offset, value) pairs."""
    out: list[tuple[int, float]] = []
    for k, pair in enumerate(step_rewards):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{where}: step {k} must be an (end_char_offset, value) pair, got {pair!r}")
        offset, value = pair
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
            raise DataError(f"{where}: step {k} end_char_offset must be an integer, got {offset!r}")
        out.append((int(offset), _finite(value, f"{where}: step {k} value")))
    return out


class _PrefixText:
    """Characters of the text produced by the first k tokens (decoded and matched, memoised)."""

    def __init__(self, ids: list[int], tokenizer: Any, text: str) -> None:
        self.ids, self.tokenizer, self.text = ids, tokenizer, text
        self.cache: dict[int, int] = {0: 0}

    def chars(self, k: int) -> int:
        if k not in self.cache:
            prefix = self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)
            # a token that ends mid-character decodes to U+FFFD, which does not match the text
            self.cache[k] = len(os.path.commonprefix([prefix, self.text]))
        return self.cache[k]

    def token_ending_at(self, offset: int, start: int = 0) -> int | None:
        """Index (>= start) of the first token after which `offset` characters are complete.

        A binary search: the matched length only grows with k (a longer prefix decodes to a
        longer prefix of the text), so each step costs O(log T) prefix decodes.
        """
        lo, hi = start + 1, len(self.ids)
        if hi == 0 or self.chars(hi) < offset:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self.chars(mid) >= offset:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1


def step_rewards_to_tokens(step_rewards: Any, completion_ids: Any, tokenizer: Any = None,
                           completion_text: str | None = None) -> list[float]:
    """Per-token rewards [T] for one completion's (real) token ids; see the module docstring.

    `step_rewards` is a float, None (NaN on the last token: unscorable) or a list of
    ``(end_char_offset, value)`` pairs; `completion_text` defaults to the decoded ids and is
    what the offsets index. Offsets outside ``1..len(text)``, or past the text the ids decode
    to, are DataErrors.
    """
    ids = _ids(completion_ids)
    out = [0.0] * len(ids)
    if not is_step_rewards(step_rewards):
        if step_rewards is None:
            value = math.nan
        elif isinstance(step_rewards, numbers.Real) and not isinstance(step_rewards, bool) \
                and not math.isinf(step_rewards):
            value = float(step_rewards)
        else:
            raise DataError(f"step rewards: a completion's reward must be a number, None or a list of "
                            f"(end_char_offset, value) pairs, got {step_rewards!r}")
        if out:
            out[-1] = value
        return out
    where = "step rewards"
    pairs = _pairs(step_rewards, where)
    if not pairs:
        return out
    if tokenizer is None:
        raise ConfigError(f"{where}: mapping character offsets to tokens needs a tokenizer")
    text = completion_text if completion_text is not None else \
        tokenizer.decode(ids, skip_special_tokens=True)
    prefix = _PrefixText(ids, tokenizer, text)
    start = 0
    for offset, value in sorted(pairs, key=lambda p: p[0]):
        if not 1 <= offset <= len(text):
            raise DataError(f"{where}: end_char_offset {offset} is outside 1..{len(text)} (the "
                            f"completion text has {len(text)} characters)")
        token = prefix.token_ending_at(offset)
        if token is None:
            raise DataError(f"{where}: end_char_offset {offset} is past the text the completion's "
                            f"tokens decode to ({prefix.chars(len(ids))} matching characters of "
                            f"{len(text)}); offsets must index the decoded completion")
        out[token] += value
        start = token
    return out


def batch_token_rewards(per_completion_rewards: Sequence[Any], completion_ids: Any, mask: Any,
                        tokenizer: Any = None, texts: Sequence[str | None] | None = None,
                        ) -> tuple[Any, bool]:
    """[B, T] float32 token rewards for a batch, and whether any completion returned step rewards.

    Row i's real tokens are where ``mask[i] == 1`` (any padding side); scalar rewards (and None,
    as NaN) go on its last real token, step rewards on the tokens ending the steps, 0 elsewhere.
    A row without real tokens gets nothing. `texts[i]` (default: decoded) is what offsets index.
    """
    import torch

    ids_t = completion_ids if isinstance(completion_ids, torch.Tensor) \
        else torch.as_tensor(completion_ids)
    mask_t = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    if ids_t.dim() != 2 or tuple(mask_t.shape) != tuple(ids_t.shape):
        raise DataError(f"batch_token_rewards: completion_ids and mask must both be [B, T], got "
                        f"{list(ids_t.shape)} and {list(mask_t.shape)}")
    batch, length = ids_t.shape
    rewards = list(per_completion_rewards)
    if len(rewards) != batch:
        raise DataError(f"batch_token_rewards: {len(rewards)} rewards for {batch} completions")
    if texts is not None and len(texts) != batch:
        raise DataError(f"batch_token_rewards: {len(texts)} texts for {batch} completions")
    if mask_t.dtype != torch.bool and bool(((mask_t != 0) & (mask_t != 1)).any()):
        raise DataError("batch_token_rewards: mask must hold only 0/1")
    real = (mask_t != 0).cpu()
    out = torch.zeros(batch, length, dtype=torch.float32)
    dense = False
    ids_rows = ids_t.cpu().tolist()
    for i, reward in enumerate(rewards):
        positions = torch.nonzero(real[i]).squeeze(-1).tolist()
        dense = dense or is_step_rewards(reward)
        try:
            values = step_rewards_to_tokens(reward, [ids_rows[i][t] for t in positions], tokenizer,
                                            None if texts is None else texts[i])
        except DataError as exc:
            raise DataError(f"completion {i}: {exc}") from None
        if positions:
            out[i, positions] = torch.tensor(values, dtype=torch.float32)
    return out.to(ids_t.device), dense


def prm_step_rewards(step_probs: Sequence[Any], step_ends: Sequence[Sequence[int]],
                     mode: str = "probability") -> list[list[tuple[int, float]] | None]:
    """Step rewards ``[(end_char_offset, value), ...]`` per completion from a PRM's step outputs.

    ``step_probs[i]`` holds, per step, the class probabilities ``[P(incorrect), P(neutral),
    P(correct)]`` (ProcessHead's class order: labels -1/0/+1) or, in ``probability`` mode, just
    P(correct); None marks an unscored completion (kept as None). ``mode="probability"``: the
    reward is P(correct); ``mode="sign"``: +1/0/-1 by the arg-max class (ties: the first, as
    ``torch.argmax``). ``step_ends[i]`` are the steps' end offsets (:func:`step_end_offsets`);
    fewer probabilities than steps means the PRM input was truncated: later steps get none.
    """
    if mode not in PRM_MODES:
        raise ConfigError(f"prm_step_rewards: mode must be one of {', '.join(PRM_MODES)}, got {mode!r}")
    if len(step_probs) != len(step_ends):
        raise DataError(f"prm_step_rewards: {len(step_probs)} completions of step probabilities but "
                        f"{len(step_ends)} of step ends")
    out: list[list[tuple[int, float]] | None] = []
    for i, (probs, ends) in enumerate(zip(step_probs, step_ends)):
        if probs is None:
            out.append(None)
            continue
        if hasattr(probs, "tolist"):
            probs = probs.tolist()
        ends = _ids(ends)
        if len(probs) > len(ends):
            raise DataError(f"prm_step_rewards: completion {i} has {len(probs)} step outputs but "
                            f"{len(ends)} step ends")
        steps: list[tuple[int, float]] = []
        for k, p in enumerate(probs):
            where = f"prm_step_rewards: completion {i}, step {k}"
            if isinstance(p, (list, tuple)):
                if len(p) != 3:
                    raise DataError(f"{where}: expected 3 class probabilities, got {len(p)}")
                row = [_finite(x, where) for x in p]
                value = row[2] if mode == "probability" else float(row.index(max(row)) - 1)
            elif mode == "probability":
                value = _finite(p, where)
            else:
                raise DataError(f"{where}: mode 'sign' needs the 3 class probabilities, got {p!r}")
            steps.append((ends[k], value))
        out.append(steps)
    return out
