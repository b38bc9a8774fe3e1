"""Reward-model data: loading rows, encoding them with a head (bad rows dropped or rejected), metrics.

Row formats (prompts/completions are text or message lists; rendered with the chat template):

- preference: ``prompt``, ``chosen``, ``rejected``, optional ``margin``
- ranked: ``prompt``, ``completions`` (best to worst)
- outcome: ``prompt``, ``completion``, ``label`` (0/1)
- step: ``prompt``, ``steps`` (list of str), ``labels`` (-1/0/+1 per step)

Bad rows (chosen == rejected after truncation, label counts that do not match the steps,
unknown labels, empty completions, ...) are rejected with a
:class:`~rlhf_plugins.errors.DataError` (`bad_rows: error`, the stage's default), or dropped and
counted with one warning line naming the first rows (`bad_rows: skip`, up to
`max_bad_fraction`) - never silently.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ...errors import ComponentError, DataError, RlhfPluginsError
from ...guard import guarded, located, row_number, row_place
from ...protocols import member
from ..bad_rows import DroppedRows, reason_of
from ..skeleton import SYNTHETIC, load_dataset_source

logger = logging.getLogger(__name__)


@dataclass
class EncodedRows:
    """Encoded features of the rows that passed, their indices, and what was dropped."""

    features: list[dict[str, Any]]
    kept: list[int]
    dropped: int = 0
    first_error: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    #: the dropped rows counted per reason with their numbers (the metrics every stage writes)
    drops: DroppedRows | None = None

    def summary(self) -> dict[str, Any]:
        """Counts for the metrics file."""
        return {"kept": len(self.kept), "dropped": self.dropped, "first_error": self.first_error,
                "reasons": dict(self.reasons)}


def _reason(message: str) -> str:
    """A short key for a DataError message: its text without the field prefix and details."""
    text = message.split(" (", 1)[0]
    if text.startswith(("chosen: ", "rejected: ", "completions[")) and ": " in text:
        text = text.split(": ", 1)[1]
    return text[:80]


def encode_rows(rows: Sequence[Mapping[str, Any]], head: Any, tokenizer: Any, template: Any, *,
                max_length: int | None = None, strict: bool = False,
                where: str = "dataset", numbers: Sequence[int] | None = None,
                label: str | None = None, max_bad_fraction: float = 1.0) -> EncodedRows:
    """Encode rows with `head.encode`; drop bad ones (counted, one warning line) or raise
    DataError when `strict` (`bad_rows: error`) or more than `max_bad_fraction` of them are bad.

    Errors name the row as the user numbers it in `where`: `numbers[i]` is row i's index in
    `where` (rows of a split or shuffle; None: the rows are `where`'s, in order); `label`
    names the rows in messages (default `where`)."""
    from tqdm.auto import tqdm

    out = EncodedRows([], [])
    drops = out.drops = DroppedRows(label or where, len(rows))

    def index_in_source(index: int) -> int:
        return index if numbers is None else numbers[index]

    total = len(rows) if hasattr(rows, "__len__") else None
    desc = f"Encoding {getattr(head, 'name', None) or 'reward head'} rows"
    for index, row in enumerate(tqdm(rows, total=total, desc=desc,
                                     leave=False, disable=total is not None and total < 2000)):
        place = row_place(where, index_in_source(index), label)
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"expected a mapping, got {type(row).__name__}")
            with guarded(head, "reward_heads", "encode()"):
                feats = head.encode(row, tokenizer=tokenizer, template=template, max_length=max_length)
        except ComponentError as exc:  # the head failed, not the row: never dropped as a bad row
            raise located(exc, place) from exc.__cause__
        except RlhfPluginsError as exc:
            message = f"{place}: {exc}"
            if strict:
                raise DataError(message) from None
            out.dropped += 1
            key = _reason(str(exc))
            out.reasons[key] = out.reasons.get(key, 0) + 1
            drops.add(reason_of(exc), row_number(where, index_in_source(index)), message)
            if out.first_error is None:
                out.first_error = message
            continue
        out.features.append(feats)
        out.kept.append(index)
    drops.warn()
    drops.check(max_bad_fraction)
    if not out.features:
        raise DataError(f"{label or where}: no usable rows" + (f" (first problem: {out.first_error})"
                                                      if out.first_error else ""))
    return out


def load_rows(source: str, *, split: str, head: Any, num_examples: int | None, seed: int,
              dataset_config: str | None = None, default_synthetic: int = 256) -> tuple[list[dict], str]:
    """Rows from ``"synthetic"`` (the head's synthetic task) or a dataset source (a data file,
    saved HF dataset dir or hub name: :func:`~rlhf_plugins.stages.skeleton.load_dataset_source`)."""
    if source == SYNTHETIC:
        n = num_examples or default_synthetic
        return member(head, "reward_heads", "synthetic_rows")(n, seed, split), f"synthetic[{split}]"
    from ...data.formats import normalize_reward_row

    rows, where = load_dataset_source(source, split=split, config=dataset_config,
                                      num_examples=num_examples)
    kind = member(head, "reward_heads", "label_kind")  # TRL's formats -> the head's rows
    return [normalize_reward_row(r, kind) for r in rows], where


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs with chosen > rejected (ties count 0.5)."""
    if len(chosen) != len(rejected) or not chosen:
        raise DataError("pairwise_accuracy: need equally long, non-empty score lists")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def _group_key(row: Mapping[str, Any]) -> str:
    return json.dumps(row.get("prompt"), sort_keys=True, default=str)


def outcome_metrics(scores: Sequence[float], labels: Sequence[float],
                    groups: Sequence[Any] | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """ORM metrics: accuracy at `threshold`, best-of-N top-1 and within-prompt pairwise accuracy.

    `groups` (one key per row, e.g. the prompt) defines the candidates of each prompt. Best-of-N
    top-1: the fraction of prompts (with >= 2 candidates) whose top-scored candidate is correct
    (ties share credit); its random baseline is the mean correct rate per prompt. Pairwise: over
    (correct, incorrect) pairs of a prompt, 1 if the correct one scores higher, 0.5 on ties.
    """
    n = len(scores)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    out["accuracy"] = sum((s > threshold) == (lab > 0.5) for s, lab in zip(scores, labels)) / n
    out["majority_baseline"] = max(sum(lab > 0.5 for lab in labels), sum(lab <= 0.5 for lab in labels)) / n
    if groups is None:
        return out
    by: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    top1, rand, pair_hits, pair_n = [], [], 0.0, 0
    for idx in by.values():
        if len(idx) < 2:
            continue
        best = max(scores[i] for i in idx)
        winners = [i for i in idx if scores[i] == best]
        top1.append(sum(labels[i] > 0.5 for i in winners) / len(winners))
        rand.append(sum(labels[i] > 0.5 for i in idx) / len(idx))
        for i in idx:
            for j in idx:
                if labels[i] > 0.5 >= labels[j]:
                    pair_n += 1
                    pair_hits += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    if top1:
        out["best_of_n_top1"] = sum(top1) / len(top1)
        out["best_of_n_random_baseline"] = sum(rand) / len(rand)
        out["best_of_n_prompts"] = len(top1)
    if pair_n:
        out["within_prompt_pairwise_accuracy"] = pair_hits / pair_n
        out["within_prompt_pairs"] = pair_n
    return out


def first_error(labels: Sequence[int]) -> int:
    """Index of the first step labelled -1, or -1 when every step is fine (ProcessBench)."""
    return next((i for i, lab in enumerate(labels) if lab == -1), -1)


def step_metrics(predicted: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, Any]:
    """PRM metrics: step accuracy and first-error-step accuracy (ProcessBench: error/correct/F1)."""
    steps = hits = 0
    majority: dict[int, int] = {}
    fe_err, fe_ok = [], []
    for pred, lab in zip(predicted, labels):
        k = min(len(pred), len(lab))
        steps += k
        hits += sum(int(p == t) for p, t in zip(pred[:k], lab[:k]))
        for t in lab[:k]:
            majority[t] = majority.get(t, 0) + 1
        true_fe, pred_fe = first_error(lab[:k]), first_error(pred[:k])
        (fe_err if true_fe >= 0 else fe_ok).append(float(pred_fe == true_fe))
    out: dict[str, Any] = {"n": len(labels), "steps": steps}
    if steps:
        out["step_accuracy"] = hits / steps
        out["step_majority_baseline"] = max(majority.values()) / steps
    allfe = fe_err + fe_ok
    if allfe:
        out["first_error_accuracy"] = sum(allfe) / len(allfe)
        # Always answering "no error" is right exactly on the all-correct solutions.
        out["first_error_no_error_baseline"] = len(fe_ok) / len(allfe)
    if fe_err:
        out["first_error_accuracy_erroneous"] = sum(fe_err) / len(fe_err)
    if fe_ok:
        out["first_error_accuracy_correct"] = sum(fe_ok) / len(fe_ok)
    if fe_err and fe_ok:
        a, b = out["first_error_accuracy_erroneous"], out["first_error_accuracy_correct"]
        out["first_error_f1"] = 0.0 if a + b == 0 else 2 * a * b / (a + b)
    return out


def evaluate_rows(model: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
                  max_length: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Held-out metrics of a reward model on rows of its head's format (see module docstring)."""
    from .scoring import score, step_outputs

    if not rows:
        return {}
    kind = member(model.head, "reward_heads", "label_kind")
    kw = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    first = rows[0]
    if "chosen" in first or "completions" in first:
        # Preference / ranked rows: score every completion; accuracy over all ranked pairs.
        flat, owner = [], []
        for i, r in enumerate(rows):
            comps = r["completions"] if "completions" in r else [r["chosen"], r["rejected"]]
            for k, c in enumerate(comps):
                flat.append({"prompt": r.get("prompt"), "completion": c})
                owner.append((i, k))
        scores = score(model, flat, **kw)
        per: dict[int, dict[int, float]] = {}
        for (i, k), s in zip(owner, scores):
            per.setdefault(i, {})[k] = s
        ch, rj = [], []
        for comp in per.values():
            ks = sorted(comp)
            for a in ks:
                for b in ks:
                    if a < b:
                        ch.append(comp[a])
                        rj.append(comp[b])
        out = {"n": len(rows), "pairs": len(ch), "pairwise_accuracy": pairwise_accuracy(ch, rj),
               "mean_margin": sum(c - r for c, r in zip(ch, rj)) / len(ch),
               "tied_pairs": sum(c == r for c, r in zip(ch, rj)),
               "mean_score": sum(scores) / len(scores)}
        if "completions" not in first:
            # Preference rows that say what is wrong with the rejected answer: accuracy per kind.
            for kind, idx in _rows_by_kind(rows, "rejected_kind").items():
                out[f"pairwise_accuracy/{kind}"] = pairwise_accuracy([per[i][0] for i in idx],
                                                                     [per[i][1] for i in idx])
        return out
    if kind == "step" or "steps" in first:
        labs = [[int(x) if not isinstance(x, bool) else (1 if x else -1) for x in r["labels"]]
                for r in rows]
        if member(model.head, "reward_heads", "has_step_outputs"):
            outs = step_outputs(model, rows, **kw)
            result = step_metrics([o["predicted"] for o in outs], labs)
            seq = [o["score"] for o in outs]
        else:  # a step head without per-step outputs: its sequence score only
            result, seq = {"n": len(rows)}, score(model, rows, **kw)
        # The sequence score (aggregated P(correct)) as an outcome verifier: correct = no -1 step.
        result.update({f"outcome_{k}": v for k, v in outcome_metrics(
            seq, [float(first_error(lab) < 0) for lab in labs]).items() if k != "n"})
        return result
    scores = score(model, rows, **kw)
    labels = [float(r.get("label", r.get("reward", math.nan))) for r in rows]
    out = outcome_metrics(scores, labels, [_group_key(r) for r in rows])
    # Outcome rows that say what kind each completion is: accuracy (at 0.5) per kind.
    for kind, idx in _rows_by_kind(rows, "completion_kind").items():
        out[f"accuracy/{kind}"] = outcome_metrics([scores[i] for i in idx],
                                                  [labels[i] for i in idx])["accuracy"]
    return out


def _rows_by_kind(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, list[int]]:
    """Row indices per value of `column` (sorted), or {} unless every row has a string there."""
    if not all(isinstance(r.get(column), str) for r in rows):
        return {}
    return {kind: [i for i, r in enumerate(rows) if r[column] == kind]
            for kind in sorted({r[column] for r in rows})}
