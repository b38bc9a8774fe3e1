"""Scoring with a reward model: rows encoded by its head, batched by length, input order kept.

:func:`score` returns one score per row (``prompt`` + ``completion``, PRM ``steps``, or
``input_ids``); :func:`step_outputs` the PRM's per-step probabilities and labels. Their
`model` is a :class:`~.model.RewardModel` (read duck-typed: its ``head``, ``head_module``,
``tokenizer``, ``template``, ``score_pad_token_id``), so this module sits below the model's.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from ...errors import ConfigError, DataError
from ...protocols import member

__all__ = ["reward_model_function", "score", "scoring_batch", "step_outputs"]


def _model_device(model: Any) -> torch.device:
    return next(model.head_module.parameters()).device


def _encode_for_scoring(model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any,
                        template: Any, max_length: int | None,
                        where: str | None = None) -> list[dict[str, Any]]:
    """The head's scoring features of every row; a bad row is named by its 1-based number (in
    `where`, a data file: its line)."""
    from ...guard import row_place

    encode = member(model.head, "reward_heads", "encode_for_scoring")
    feats = []
    for i, row in enumerate(rows):
        try:
            feats.append(encode(row, tokenizer=tokenizer, template=template, max_length=max_length))
        except DataError as exc:
            place = row_place(where, i) if where else f"score: row {i + 1}"
            raise DataError(f"{place}: {exc}") from None
    return feats


def _run_batches(model: Any, feats: list[dict[str, Any]], fn: Any, *, pad_token_id: int,
                 batch_size: int, sort_by_length: bool, padding_side: str, progress: bool,
                 desc: str = "Scoring") -> tuple[list[Any], dict[str, Any]]:
    """Apply `fn(head_outputs, batch) -> per-row values` over batches; results in input order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"score: batch_size must be >= 1, got {batch_size}")
    order = list(range(len(feats)))
    if sort_by_length:  # longest first: similar lengths share a batch, and OOM shows up early
        order.sort(key=lambda i: -len(feats[i]["input_ids"]))
    device = _model_device(model)
    out: list[Any] = [None] * len(feats)
    tokens = padded = 0
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    collate = member(model.head, "reward_heads", "collate_for_scoring")
    try:
        with torch.no_grad():
            for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch = collate([feats[i] for i in idx], pad_token_id=pad_token_id,
                                padding_side=padding_side)
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                padded += int(batch["attention_mask"].numel())
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                for i, v in zip(idx, fn(outputs, batch)):
                    out[i] = v
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    stats = {"rows": len(feats), "batches": len(batches), "tokens": tokens, "padded_tokens": padded,
             "padding_fraction": (padded - tokens) / padded if padded else 0.0,
             "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf")}
    return out, stats


def scoring_batch(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` as the head reads it: with `model.score_pad_token_id` set, tokens equal to it
    are not scored (transformers' sequence classifiers read the last non-pad token)."""
    pad = getattr(model, "score_pad_token_id", None)
    if pad is None:
        return batch
    mask = batch["attention_mask"]
    return {**batch, "attention_mask": mask * (batch["input_ids"] != pad).to(mask.dtype)}


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


def score(model: Any, rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
          template: Any = None, batch_size: int = 16, max_length: int | None = None,
          sort_by_length: bool = True, padding_side: str = "right", progress: bool = True,
          return_stats: bool = False, where: str | None = None) -> Any:
    """Score rows (``prompt`` + ``completion``, PRM ``steps``, or ``input_ids``) in input order;
    `where` (the rows' data file) names a bad row by its line, else by its 1-based number.

    Batches are formed from rows sorted by length (longest first) to cut padding; the scores
    come back in the order of `rows`. With `return_stats`, returns ``(scores, stats)`` where
    stats has ``tokens``, ``padded_tokens``, ``padding_fraction``, ``seconds``, ``tokens_per_s``.
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    template = template if template is not None else model.template
    feats = _encode_for_scoring(model, rows, tokenizer, template, max_length, where)
    head = model.head

    def fn(outputs: torch.Tensor, batch: dict[str, Any]) -> list[float]:
        scored = head.sequence_scores(outputs, scoring_batch(model, batch))
        return [float(v) for v in scored.float().cpu().tolist()]

    scores, stats = _run_batches(model, feats, fn, pad_token_id=_pad_id(tokenizer),
                                 batch_size=batch_size, sort_by_length=sort_by_length,
                                 padding_side=padding_side, progress=progress)
    return (scores, stats) if return_stats else scores


def step_outputs(model: Any, rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
                 template: Any = None, batch_size: int = 16, max_length: int | None = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """PRM per-row outputs: ``score``, per-step ``p_correct`` and ``predicted`` labels (-1/0/+1)."""
    head = model.head
    if not member(head, "reward_heads", "has_step_outputs"):
        raise ConfigError(f"step_outputs: head {model.head_name!r} has no per-step outputs "
                          "(has_step_outputs is false)")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    template = template if template is not None else model.template
    feats = _encode_for_scoring(model, rows, tokenizer, template, max_length)

    def fn(outputs: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        scores = head.sequence_scores(outputs, batch).float().cpu().tolist()
        probs = head.step_probabilities(outputs, batch)
        preds = head.step_predictions(outputs, batch)
        return [{"score": s, "p_correct": p, "predicted": q} for s, p, q in zip(scores, probs, preds)]

    out, _ = _run_batches(model, feats, fn, pad_token_id=_pad_id(tokenizer), batch_size=batch_size,
                          sort_by_length=True, padding_side="right", progress=progress)
    return out


def reward_model_function(model: Any, *, batch_size: int = 16, max_length: int | None = None,
                          name: str = "reward_model") -> Any:
    """A TRL-style reward function scoring with `model`: every scorer (sample, best-of-n, ppo)
    uses this one, so one reward model gives one score per (prompt, completion).

    Completions may be strings or conversational (``[{"role": "assistant", ...}]``); an empty
    completion is unscored (None). The train/eval mode of the model underneath (a policy
    sharing its base) is restored after each call.
    """
    from ...rewarding import completion_text

    backbone = getattr(model, "backbone", model)

    def reward_model(prompts: list, completions: list, **_: Any) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        keep = [i for i, t in enumerate(texts) if t.strip()]
        out: list[float | None] = [None] * len(texts)
        if not keep:
            return out
        was_training = backbone.training
        try:
            rows = [{"prompt": prompts[i], "completion": texts[i]} for i in keep]
            values = score(model, rows, batch_size=batch_size, max_length=max_length, progress=False)
        finally:
            backbone.train(was_training)
        for i, v in zip(keep, values):
            out[i] = float(v)
        return out

    reward_model.__name__ = reward_model.__qualname__ = name
    return reward_model
