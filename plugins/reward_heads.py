"""Built-in reward heads (family ``reward_heads``): bradley_terry, orm, prm and value.

Each is an SDK component (:class:`rlhf_plugins.sdk.RewardHead`) on the last hidden state of a
causal-LM backbone; rows are rendered with a chat template by :mod:`rlhf_plugins.head_data` and
cut right after the completion's end-of-turn token.

- ``bradley_terry``: a scalar read at the last *attended* token (pad == eos and left/right
  padding are all correct); losses ``pairwise``, ``margin`` (Llama 2), ``plackett_luce``
  (K-wise, Starling) and ``balanced`` (InstructGPT: all C(K, 2) pairs, each weighted 1/C(K, 2)).
- ``orm``: a scalar per token; the 0/1 outcome label is broadcast to the completion tokens
  (end-of-turn included); score: P(correct) aggregated (``last``, ``mean``, ``min``, ``product``).
- ``prm``: 3 classes per token (incorrect/neutral/correct) labelled at the last token of each
  step; score: per-step P(correct) aggregated (``min``, ``mean``, ``product``, ``last``).
- ``value``: a scalar per token regressed on returns (masked MSE, optionally PPO-clipped).

Importing this module does not import torch.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from rlhf_plugins import DataError, hookimpl
from rlhf_plugins.head_data import (IGNORE_INDEX, aggregate_probabilities, at_last_attended,
                                    finite_number, outcome_label, pad_batch, rank_major_batch,
                                    render_ranked, render_row, render_steps, resolve_pad_token_id,
                                    scoring_features, split_steps, step_end_features, step_labels)
from rlhf_plugins.sdk import RewardHead, SyntheticRows, option

BT_LOSSES = ("pairwise", "margin", "plackett_luce", "balanced")
BT_INITS = ("zero", "random")
ORM_AGGREGATIONS = ("last", "mean", "min", "product")
PRM_AGGREGATIONS = ("min", "mean", "product", "last")


def _one_of(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class _CompletionHead(RewardHead):
    """Scoring of (prompt, completion) rows and encode-if-needed collation, shared by the built-ins."""

    #: the key that marks a row as already encoded (collate skips encoding)
    encoded_key: ClassVar[str] = "input_ids"

    def encode_for_scoring(self, row: Mapping[str, Any], *, tokenizer: Any = None,
                           template: Any = None, max_length: int | None = None) -> dict[str, Any]:
        """A (prompt, completion) row, or pre-tokenized ``input_ids``, -> scoring features."""
        return scoring_features(row, tokenizer=tokenizer, template=template, max_length=max_length)

    def collate_for_scoring(self, features: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0,
                            padding_side: str = "right") -> dict[str, Any]:
        """Pad scoring features into a batch `sequence_scores` understands."""
        return pad_batch(features, pad_token_id, padding_side, {"score_mask": (0, "long")})

    def _encode_rows(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any, template: Any,
                     max_length: int | None) -> list[Mapping[str, Any]]:
        return [r if self.encoded_key in r else
                self.encode(r, tokenizer=tokenizer, template=template, max_length=max_length)
                for r in rows]


# --- Bradley-Terry ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BradleyTerryHead(_CompletionHead):
    """Scalar at the last attended token; pairwise / margin / Plackett-Luce / balanced loss."""

    name = "bradley_terry"
    description = ("Preference RM: scalar at the last attended token; pairwise, margin "
                   "(Llama 2), plackett_luce (K-wise) or balanced (InstructGPT) loss")
    label_kind = "preference"
    supports_normalize = True
    encoded_key = "completions_ids"

    loss: str = option("pairwise", help="pairwise, margin (Llama 2; needs a `margin` column), "
                                        "plackett_luce (K-wise) or balanced (InstructGPT)")
    normalize: bool = option(False, help="after training, shift scores so the training data's best "
                                         "completions score 0 on average (InstructGPT)")
    init: str = option("zero", help="zero: the head starts at 0, every pair tied (held-out accuracy "
                                    "0.5 before training); random: nn.Linear's default init")

    def validate_options(self) -> None:
        """`loss` is a known loss; `normalize` is a bool; `init` is zero or random."""
        _one_of("loss", self.loss, BT_LOSSES)
        if not isinstance(self.normalize, bool):
            raise ValueError("normalize must be true/false")
        _one_of("init", self.init, BT_INITS)

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 without bias (like HF's sequence-classification `score`).

        Zero-initialised by default: a random projection of the last hidden state orders whole
        kinds of pairs (e.g. long vs short answers) all right or all wrong by the sign of the
        draw, so its "before training" accuracy measures a coin, not the backbone.
        """
        from rlhf_plugins.head_modules import ScalarHead

        return ScalarHead(hidden_size, bias=False, zero_init=self.init == "zero")

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Preference (`chosen`/`rejected`, optional `margin`) or ranked (`completions`) row."""
        ids_list = render_ranked(row, tokenizer, template, max_length)
        margin = row.get("margin")
        if self.loss == "margin" and (margin is None or len(ids_list) != 2):
            raise DataError("loss 'margin' needs preference rows with a 'margin' column")
        out: dict[str, Any] = {"completions_ids": ids_list}
        if margin is not None and len(ids_list) == 2:
            out["margin"] = finite_number(margin, "margin")
        return out

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Sequences rank-major (TRL's chosen block, then rejected block) + pair indices."""
        feats = self._encode_rows(rows, tokenizer, template, max_length)
        return rank_major_batch([f["completions_ids"] for f in feats], [f.get("margin") for f in feats],
                                resolve_pad_token_id(tokenizer, pad_token_id), padding_side)

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The head's value at each sequence's last attended token."""
        return at_last_attended(head_outputs, batch["attention_mask"])

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The configured Bradley-Terry family loss over the batch's pairs / rankings."""
        from rlhf_plugins.losses import bradley_terry_loss, plackett_luce_loss

        scores = self.sequence_scores(head_outputs, batch)
        if self.loss == "plackett_luce":
            ranking = batch["ranking"].to(scores.device)
            return plackett_luce_loss(scores[ranking.clamp(min=0)], ranking >= 0)
        chosen = scores[batch["pair_chosen"].to(scores.device)]
        rejected = scores[batch["pair_rejected"].to(scores.device)]
        if self.loss == "margin":
            if "margin" not in batch:
                raise DataError("loss 'margin' needs a 'margin' column")
            return bradley_terry_loss(chosen, rejected, margin=batch["margin"].to(scores.device))
        if self.loss == "balanced":
            return bradley_terry_loss(chosen, rejected, weights=batch["pair_weight"].to(scores.device))
        margin = batch.get("margin")
        # TRL's RewardTrainer subtracts a margin whenever the data has one; so do we.
        return bradley_terry_loss(chosen, rejected,
                                  margin=None if margin is None else margin.to(scores.device))

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Pairwise accuracy (ties 0.5) and mean score margin over the batch's pairs."""
        import torch

        with torch.no_grad():
            scores = self.sequence_scores(head_outputs, batch).float()
            chosen = scores[batch["pair_chosen"].to(scores.device)]
            diff = chosen - scores[batch["pair_rejected"].to(scores.device)]
            correct = (diff > 0).float() + 0.5 * (diff == 0).float()
            n = float(diff.numel())
            return {"accuracy": (float(correct.sum()), n), "margin": (float(diff.sum()), n),
                    "mean_reward": (float(scores.sum()), float(scores.numel()))}

    def synthetic_format(self) -> SyntheticRows:
        """Synthetic pairs (rejected: rambling, unsupported or wrong); K=4 rankings for PL/balanced."""
        if self.loss in ("plackett_luce", "balanced"):
            return SyntheticRows("ranked")
        # margin: wrong answers are worse than rambling ones
        return SyntheticRows("preference", {"rambling_fraction": 1 / 3, "unsupported_fraction": 1 / 3},
                             margin=self.loss == "margin")


# --- ORM -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutcomeHead(_CompletionHead):
    """Per-token scalar; outcome label broadcast to completion tokens; P(correct) aggregated."""

    name = "orm"
    description = ("Outcome RM: per-token BCE with the 0/1 outcome broadcast to completion tokens; "
                   "score = last/mean/min/product of P(correct)")
    label_kind = "outcome"

    aggregation: str = option("last", help="how per-token P(correct) becomes the score: "
                                           "last, mean, min or product")

    def validate_options(self) -> None:
        """`aggregation` is a known aggregation."""
        _one_of("aggregation", self.aggregation, ORM_AGGREGATIONS)

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 (with bias) applied at every position."""
        from rlhf_plugins.head_modules import ScalarHead

        return ScalarHead(hidden_size, bias=True)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Outcome row (`prompt`, `completion`, `label`) -> ids, per-token labels, score mask."""
        label = outcome_label(row)
        ids, mask = render_row(row, tokenizer, template, max_length, what="an outcome row")
        labels = [label if m else float(IGNORE_INDEX) for m in mask]
        return {"input_ids": ids, "labels": labels, "score_mask": mask, "outcome": label}

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, float labels (-100 outside completions), score mask, outcome per row."""
        import torch

        feats = self._encode_rows(rows, tokenizer, template, max_length)
        batch = pad_batch(feats, resolve_pad_token_id(tokenizer, pad_token_id), padding_side,
                          {"labels": (float(IGNORE_INDEX), torch.float32),
                           "score_mask": (0, torch.long)})
        if all("outcome" in f for f in feats):
            batch["outcome"] = torch.tensor([f["outcome"] for f in feats], dtype=torch.float32)
        return batch

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """Per-token BCE-with-logits over labelled positions."""
        from rlhf_plugins.losses import orm_loss

        return orm_loss(head_outputs, batch["labels"].to(head_outputs.device))

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """P(correct) over the completion tokens, aggregated (last / mean / min / product)."""
        import torch
        import torch.nn.functional as F

        mask = batch.get("score_mask")
        if mask is None:
            mask = batch["attention_mask"]
        mask = mask.to(head_outputs.device) != 0
        logits = head_outputs.float()
        return aggregate_probabilities(torch.sigmoid(logits), F.logsigmoid(logits), mask,
                                       self.aggregation)

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Sequence accuracy of P(correct) at the last completion token vs the outcome (0.5 cut)."""
        import torch

        if "outcome" not in batch:
            return {}
        with torch.no_grad():
            last = OutcomeHead(aggregation="last").sequence_scores(head_outputs, batch)
            target = batch["outcome"].to(last.device)
            correct = ((last > 0.5).float() == (target > 0.5).float()).float()
            return {"accuracy": (float(correct.sum()), float(correct.numel()))}

    def synthetic_format(self) -> SyntheticRows:
        """Synthetic outcome rows, 4 candidates per problem, half of them correct (best-of-N metrics)."""
        return SyntheticRows("outcome", {"unsupported_fraction": 0.5, "per_prompt": 4})


# --- PRM -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessHead(_CompletionHead):
    """3 classes per token, labelled at the last token of each step; P(correct) aggregated."""

    name = "prm"
    description = ("Process RM: 3-class (incorrect/neutral/correct) CE at the last token of each "
                   "step; score = min/mean/product/last of P(correct)")
    label_kind = "step"
    has_step_outputs = True

    aggregation: str = option("min", help="how per-step P(correct) becomes the score: "
                                          "min, mean, product or last")
    delimiter: str = option("\n\n", help="the text between steps (splits a `completion` into steps)")

    def validate_options(self) -> None:
        """`aggregation` is a known aggregation; `delimiter` a non-empty string."""
        _one_of("aggregation", self.aggregation, PRM_AGGREGATIONS)
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ValueError("delimiter must be a non-empty string")

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 3 classes at every position."""
        from rlhf_plugins.head_modules import ClassHead

        return ClassHead(hidden_size, 3)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Step row (`prompt`, `steps`, `labels` in -1/0/+1) -> ids and class labels at step ends."""
        if row.get("labels") is None:
            raise DataError("a step row needs 'labels' (one of -1/0/+1 per step)")
        labels = step_labels(row, len(split_steps(row, self.delimiter)))
        ids, ends = render_steps(row, self.delimiter, tokenizer, template, max_length)
        return step_end_features(ids, ends, labels, max_length)

    def encode_for_scoring(self, row: Mapping[str, Any], *, tokenizer: Any = None,
                           template: Any = None, max_length: int | None = None) -> dict[str, Any]:
        """A (`prompt`, `steps` or `completion`) row -> ids + step-end mask."""
        if "input_ids" in row:
            ids = list(row["input_ids"])
            mask = list(row.get("step_mask") or [0] * (len(ids) - 1) + [1])
            return {"input_ids": ids, "step_mask": mask}
        ids, ends = render_steps(row, self.delimiter, tokenizer, template, max_length)
        return step_end_features(ids, ends, max_length=max_length)

    def collate_for_scoring(self, features: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0,
                            padding_side: str = "right") -> dict[str, Any]:
        """Pad scoring features (ids + step mask)."""
        return pad_batch(features, pad_token_id, padding_side, {"step_mask": (0, "long")})

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, class labels at step ends (-100 elsewhere) and the step-end mask."""
        feats = self._encode_rows(rows, tokenizer, template, max_length)
        return pad_batch(feats, resolve_pad_token_id(tokenizer, pad_token_id), padding_side,
                         {"labels": (IGNORE_INDEX, "long"), "step_mask": (0, "long")})

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """3-class cross-entropy at labelled step ends."""
        from rlhf_plugins.losses import prm_loss

        return prm_loss(head_outputs, batch["labels"].to(head_outputs.device))

    def step_probabilities(self, head_outputs: Any, batch: Mapping[str, Any]) -> list[list[float]]:
        """P(correct) at each step end, per sequence."""
        import torch

        mask = _step_mask(head_outputs, batch)
        p = torch.softmax(head_outputs.float(), dim=-1)[..., 2]
        return [p[i][mask[i]].tolist() for i in range(p.shape[0])]

    def step_predictions(self, head_outputs: Any, batch: Mapping[str, Any]) -> list[list[int]]:
        """Predicted step labels (-1/0/+1, argmax class) at each step end, per sequence."""
        mask = _step_mask(head_outputs, batch)
        cls = head_outputs.argmax(dim=-1) - 1  # class index 0/1/2 -> label -1/0/+1
        return [cls[i][mask[i]].tolist() for i in range(cls.shape[0])]

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """P(correct) at the step ends aggregated (min / mean / product / last)."""
        import torch

        mask = _step_mask(head_outputs, batch)
        logp = torch.log_softmax(head_outputs.float(), dim=-1)[..., 2]
        return aggregate_probabilities(logp.exp(), logp, mask, self.aggregation)

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Step accuracy (argmax class == label at labelled step ends)."""
        import torch

        with torch.no_grad():
            labels = batch["labels"].to(head_outputs.device)
            valid = labels != IGNORE_INDEX
            if not bool(valid.any()):
                return {}
            correct = (head_outputs.argmax(dim=-1)[valid] == labels[valid]).float()
            return {"accuracy": (float(correct.sum()), float(correct.numel()))}

    def synthetic_format(self) -> SyntheticRows:
        """Synthetic step-labelled solutions."""
        return SyntheticRows("step")


def _step_mask(head_outputs: Any, batch: Mapping[str, Any]) -> Any:
    mask = batch.get("step_mask")
    if mask is None:
        mask = batch["labels"] != IGNORE_INDEX
    return mask.to(head_outputs.device) != 0


# --- Value -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueHead(_CompletionHead):
    """Per-token scalar regressed on returns (PPO critic); masked MSE, optionally clipped."""

    name = "value"
    description = "Value function: per-token scalar, masked MSE to returns (optionally PPO-clipped)"
    label_kind = "value"

    clip: float | None = option(None, help="PPO value clipping range around `old_values` (> 0; "
                                           "null: no clipping)")

    def validate_options(self) -> None:
        """`clip` is null or a number > 0."""
        clip = self.clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)
                                 or not clip > 0):
            raise ValueError("clip must be a number > 0 or null")

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 (with bias) applied at every position."""
        from rlhf_plugins.head_modules import ScalarHead

        return ScalarHead(hidden_size, bias=True)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """(`prompt`, `completion`, `reward` or `label`) -> ids, returns (terminal reward, gamma 1), mask."""
        if "input_ids" in row and "returns" in row:
            return dict(row)
        reward = row.get("reward", row.get("label"))
        if reward is None:
            raise DataError("a value row needs 'reward' (or 'label'), or 'input_ids' + 'returns'")
        reward = finite_number(reward, "reward")
        ids, mask = render_row(row, tokenizer, template, max_length, what="a value row")
        # A sparse terminal reward with gamma = 1: the return from every completion token is R.
        return {"input_ids": ids, "returns": [reward if m else 0.0 for m in mask], "mask": mask}

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, returns, loss mask (default: every real token) and optional old values."""
        feats = [dict(f) for f in self._encode_rows(rows, tokenizer, template, max_length)]
        for f in feats:
            if len(f["returns"]) != len(f["input_ids"]):
                raise DataError(f"returns: {len(f['returns'])} values for {len(f['input_ids'])} tokens")
            f.setdefault("mask", [1] * len(f["input_ids"]))
        extra = {"returns": (0.0, "float32"), "mask": (0, "long")}
        if all("old_values" in f for f in feats):
            extra["old_values"] = (0.0, "float32")
        return pad_batch(feats, resolve_pad_token_id(tokenizer, pad_token_id), padding_side, extra)

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """`value_loss(values, returns, mask, old_values, clip)`."""
        from rlhf_plugins.losses import value_loss

        dev = head_outputs.device
        mask = batch.get("mask", batch["attention_mask"]).to(dev)
        old = batch.get("old_values")
        return value_loss(head_outputs, batch["returns"].to(dev), mask,
                          old_values=None if old is None else old.to(dev), clip=self.clip)

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The value at each sequence's last attended token."""
        return at_last_attended(head_outputs, batch["attention_mask"])

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Mean squared error over the masked tokens."""
        import torch

        with torch.no_grad():
            mask = batch.get("mask", batch["attention_mask"]).to(head_outputs.device).float()
            err = ((head_outputs.float() - batch["returns"].to(head_outputs.device)) ** 2) * mask
            return {"mse": (float(err.sum()), float(mask.sum()))}

    def synthetic_format(self) -> SyntheticRows:
        """Synthetic outcome rows; the 0/1 label is the terminal reward."""
        return SyntheticRows("outcome")


@hookimpl
def register_reward_heads(register: Any) -> None:
    """Register the built-in heads."""
    for head in (BradleyTerryHead(), OutcomeHead(), ProcessHead(), ValueHead()):
        register(head)
