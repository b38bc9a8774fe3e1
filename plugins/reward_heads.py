"""Built-in reward heads (family ``reward_heads``): bradley_terry, orm, prm and value.

A head sits on the last hidden state ``[B, T, H]`` of a causal-LM backbone. Each component
knows its data (``encode`` one row into token ids + supervision, ``collate`` rows into a padded
batch), its module (``build_module(hidden_size)``), its loss (``compute_loss``) and how to turn
its outputs into one score per sequence (``sequence_scores``). Rows are rendered with a chat
template component (``encode(messages) -> Encoded`` with per-token roles/turns); the rendered
conversation is cut right after the completion's end-of-turn token, so a Bradley-Terry score is
read at the end-of-turn (EOS) token.

- ``bradley_terry``: a scalar read at the last *attended* token (found from the attention mask,
  so pad == eos and left or right padding are all correct). Losses: ``pairwise`` (default),
  ``margin`` (Llama 2, a ``margin`` column), ``plackett_luce`` (K-wise, Starling) and
  ``balanced`` (InstructGPT: all C(K, 2) pairs of a prompt, each weighted 1/C(K, 2)).
- ``orm``: a scalar per token; the 0/1 outcome label is broadcast to the completion tokens
  (including its end-of-turn token), the prompt is masked. Scores: P(correct) aggregated with
  ``last`` (default), ``mean``, ``min`` or ``product``.
- ``prm``: 3 classes per token (0 incorrect, 1 neutral, 2 correct), labelled only at the last
  token of each step (steps joined by ``delimiter``, default a blank line). Scores: P(correct)
  per step aggregated with ``min`` (default), ``mean``, ``product`` or ``last``.
- ``value``: a scalar per token regressed on returns (masked MSE, optionally PPO-clipped);
  PPO's critic.

Importing this module does not import torch.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Any, ClassVar, Mapping, Sequence

from rlhf_plugins import hookimpl
from rlhf_plugins.errors import ConfigError, DataError

IGNORE_INDEX = -100
PRM_CLASS_OF_LABEL = {-1: 0, 0: 1, 1: 2}
BT_LOSSES = ("pairwise", "margin", "plackett_luce", "balanced")
ORM_AGGREGATIONS = ("last", "mean", "min", "product")
PRM_AGGREGATIONS = ("min", "mean", "product", "last")


# --------------------------------------------------------------------------------------------
# Rendering rows with a chat template
# --------------------------------------------------------------------------------------------

def as_messages(value: Any, role: str, field: str) -> list[dict]:
    """A prompt/completion given as text, one message or a message list, as a message list."""
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


def _prompt_messages(row: Mapping[str, Any]) -> list[dict]:
    prompt = row.get("prompt")
    if prompt is None:
        return []
    if isinstance(prompt, str) and not prompt.strip():
        raise DataError("prompt: empty")
    return as_messages(prompt, "user", "prompt")


def _content_text(messages: Sequence[Mapping[str, Any]]) -> str:
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
    if not _content_text(completion).strip():
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


# --------------------------------------------------------------------------------------------
# Padding and small helpers
# --------------------------------------------------------------------------------------------

def pad_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int,
              padding_side: str = "right", extra: Mapping[str, tuple[Any, Any]] | None = None
              ) -> dict[str, Any]:
    """Pad `input_ids` (+ per-token `extra` keys: name -> (pad value, dtype)) into tensors."""
    import torch

    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    extra = dict(extra or {})
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


def _pad_id(tokenizer: Any, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return 0


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{field}: expected a finite number, got {value!r}")
    return float(value)


def _modules() -> Any:
    """The torch modules of the heads (defined on first use so importing stays light)."""
    global _MODULES
    if _MODULES is None:
        import torch
        from torch import nn

        class ScalarHead(nn.Module):
            """Linear hidden -> 1 at every position, minus a stored score offset."""

            def __init__(self, hidden_size: int, bias: bool) -> None:
                super().__init__()
                self.score = nn.Linear(hidden_size, 1, bias=bias)
                # InstructGPT-style normalisation: subtracted from scores, never trained.
                self.register_buffer("offset", torch.zeros(()))

            def forward(self, hidden: torch.Tensor) -> torch.Tensor:
                return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1) - self.offset

        class ClassHead(nn.Module):
            """Linear hidden -> num_classes at every position."""

            def __init__(self, hidden_size: int, num_classes: int) -> None:
                super().__init__()
                self.score = nn.Linear(hidden_size, num_classes)

            def forward(self, hidden: torch.Tensor) -> torch.Tensor:
                return self.score(hidden.to(self.score.weight.dtype))

        _MODULES = {"scalar": ScalarHead, "classes": ClassHead}
    return _MODULES


_MODULES: Any = None


# --------------------------------------------------------------------------------------------
# Base component
# --------------------------------------------------------------------------------------------

class _Head:
    """Shared option handling and scoring-row encoding of the built-in heads."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        self.options = {**self.defaults, **options}
        self._validate()

    def configure(self, **options: Any) -> "_Head":
        """A copy with `options` applied (ConfigError on unknown or invalid ones)."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], list(self.defaults), n=1)
            raise ConfigError(f"reward head {self.name!r}: unknown option {unknown[0]!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; options: {', '.join(self.defaults) or 'none'}")
        return type(self)(**{**copy.deepcopy(self.options), **options})

    def _validate(self) -> None:
        pass

    def _choice(self, key: str, choices: Sequence[str]) -> None:
        if self.options[key] not in choices:
            raise ConfigError(f"reward head {self.name!r}: {key} must be one of "
                              f"{', '.join(choices)}, got {self.options[key]!r}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # -- data ------------------------------------------------------------------------------
    #: keys that mark a row as already encoded (collate skips encoding)
    encoded_key: ClassVar[str] = "input_ids"

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """One training row -> features (token ids + supervision); DataError for a bad row."""
        raise NotImplementedError

    def encode_for_scoring(self, row: Mapping[str, Any], *, tokenizer: Any = None,
                           template: Any = None, max_length: int | None = None) -> dict[str, Any]:
        """A (prompt, completion) row, or pre-tokenized ``input_ids``, -> scoring features."""
        if "input_ids" in row:
            ids = list(row["input_ids"])
            if not ids:
                raise DataError("input_ids: empty")
            mask = list(row.get("completion_mask") or [1] * len(ids))
            return {"input_ids": ids[:max_length] if max_length else ids,
                    "score_mask": mask[:max_length] if max_length else mask}
        if "completion" not in row:
            raise DataError("a scoring row needs 'completion' (text or messages) or 'input_ids'")
        ids, mask, _ = render_completion(_prompt_messages(row),
                                         as_messages(row["completion"], "assistant", "completion"),
                                         tokenizer, template, max_length)
        return {"input_ids": ids, "score_mask": mask}

    def collate_for_scoring(self, features: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0,
                            padding_side: str = "right") -> dict[str, Any]:
        """Pad scoring features into a batch `sequence_scores` understands."""
        import torch

        return pad_batch(features, pad_token_id, padding_side, {"score_mask": (0, torch.long)})

    def _encode_rows(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any, template: Any,
                     max_length: int | None) -> list[Mapping[str, Any]]:
        return [r if self.encoded_key in r else
                self.encode(r, tokenizer=tokenizer, template=template, max_length=max_length)
                for r in rows]

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Per-batch metrics as ``name -> (sum, count)`` (summed over batches, then divided)."""
        return {}

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Rows of the built-in synthetic task in this head's training format."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------------

class BradleyTerryHead(_Head):
    """Scalar at the last attended token; pairwise / margin / Plackett-Luce / balanced loss."""

    name = "bradley_terry"
    description = ("Preference RM: scalar at the last attended token; pairwise, margin "
                   "(Llama 2), plackett_luce (K-wise) or balanced (InstructGPT) loss")
    defaults = {"loss": "pairwise", "normalize": False}
    encoded_key = "completions_ids"

    def _validate(self) -> None:
        self._choice("loss", BT_LOSSES)
        if not isinstance(self.options["normalize"], bool):
            raise ConfigError(f"reward head {self.name!r}: normalize must be true/false")

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 without bias (like HF's sequence-classification `score`)."""
        return _modules()["scalar"](hidden_size, bias=False)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Preference (`chosen`/`rejected`, optional `margin`) or ranked (`completions`) row."""
        prompt = _prompt_messages(row)
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
        ids_list = []
        for value, field in zip(completions, fields):
            try:
                ids, _, _ = render_completion(prompt, as_messages(value, "assistant", field),
                                              tokenizer, template, max_length)
            except DataError as exc:
                raise DataError(f"{field}: {exc}") from None
            ids_list.append(ids)
        seen = {}
        for i, ids in enumerate(ids_list):
            key = tuple(ids)
            if key in seen:
                what = ("chosen == rejected" if len(ids_list) == 2 and "chosen" in row else
                        f"completions {seen[key]} and {i} are identical")
                raise DataError(f"{what} after rendering/truncation"
                                + (f" (max_length={max_length})" if max_length else ""))
            seen[key] = i
        margin = row.get("margin")
        if self.options["loss"] == "margin":
            if margin is None or len(ids_list) != 2:
                raise DataError("loss 'margin' needs preference rows with a 'margin' column")
        out: dict[str, Any] = {"completions_ids": ids_list}
        if margin is not None and len(ids_list) == 2:
            out["margin"] = _number(margin, "margin")
        return out

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Sequences ordered rank-major (all best completions, then all second, ...) + pair indices.

        For preference rows this is TRL's layout: chosen block, then rejected block.
        """
        import torch

        feats = self._encode_rows(rows, tokenizer, template, max_length)
        k_max = max(len(f["completions_ids"]) for f in feats)
        seqs: list[dict[str, Any]] = []
        index = torch.full((len(feats), k_max), -1, dtype=torch.long)
        for k in range(k_max):
            for i, f in enumerate(feats):
                if k < len(f["completions_ids"]):
                    index[i, k] = len(seqs)
                    seqs.append({"input_ids": f["completions_ids"][k]})
        batch = pad_batch(seqs, _pad_id(tokenizer, pad_token_id), padding_side)
        chosen, rejected, weights, margins = [], [], [], []
        for i, f in enumerate(feats):
            k = len(f["completions_ids"])
            n_pairs = k * (k - 1) // 2
            for a in range(k):
                for b in range(a + 1, k):
                    chosen.append(int(index[i, a]))
                    rejected.append(int(index[i, b]))
                    weights.append(1.0 / n_pairs)
                    margins.append(float(f.get("margin") or 0.0) if k == 2 else 0.0)
        batch.update(ranking=index, pair_chosen=torch.tensor(chosen, dtype=torch.long),
                     pair_rejected=torch.tensor(rejected, dtype=torch.long),
                     pair_weight=torch.tensor(weights, dtype=torch.float32))
        if any("margin" in f for f in feats):
            batch["margin"] = torch.tensor(margins, dtype=torch.float32)
        return batch

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The head's value at each sequence's last attended token."""
        import torch

        idx = last_attended_index(batch["attention_mask"]).to(head_outputs.device)
        return head_outputs[torch.arange(head_outputs.shape[0], device=head_outputs.device), idx]

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The configured Bradley-Terry family loss over the batch's pairs / rankings."""
        import torch

        from rlhf_plugins.losses import bradley_terry_loss, plackett_luce_loss

        scores = self.sequence_scores(head_outputs, batch)
        loss = self.options["loss"]
        if loss == "plackett_luce":
            ranking = batch["ranking"].to(scores.device)
            valid = ranking >= 0
            matrix = scores[ranking.clamp(min=0)]
            return plackett_luce_loss(matrix, valid)
        chosen = scores[batch["pair_chosen"].to(scores.device)]
        rejected = scores[batch["pair_rejected"].to(scores.device)]
        if loss == "margin":
            if "margin" not in batch:
                raise DataError("loss 'margin' needs a 'margin' column")
            return bradley_terry_loss(chosen, rejected, margin=batch["margin"].to(scores.device))
        if loss == "balanced":
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

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Synthetic preference pairs (ranked K=4 rows for plackett_luce/balanced).

        Rejected answers: a third rambling, a third `unsupported` (the final line does not follow
        from the work), a third with an arithmetic error.
        """
        from rlhf_plugins.data import synth

        if self.options["loss"] in ("plackett_luce", "balanced"):
            return synth.ranked_rows(n, seed, split)
        rows = synth.preference_rows(n, seed, split, rambling_fraction=1 / 3,
                                     unsupported_fraction=1 / 3)
        if self.options["loss"] == "margin":  # wrong answers are worse than rambling ones
            for r in rows:
                r["margin"] = 0.0 if r["rejected_kind"] == "rambling" else 1.0
        return rows


# --------------------------------------------------------------------------------------------
# ORM
# --------------------------------------------------------------------------------------------

def _outcome_label(row: Mapping[str, Any]) -> float:
    if "label" not in row:
        raise DataError("an outcome row needs 'label' (0 or 1)")
    label = row["label"]
    if isinstance(label, bool):
        return float(label)
    if not isinstance(label, numbers.Real) or not (0.0 <= float(label) <= 1.0) or math.isnan(label):
        raise DataError(f"label: expected 0 or 1 (or a probability in [0, 1]), got {label!r}")
    return float(label)


class OutcomeHead(_Head):
    """Per-token scalar; outcome label broadcast to completion tokens; P(correct) aggregated."""

    name = "orm"
    description = ("Outcome RM: per-token BCE with the 0/1 outcome broadcast to completion tokens; "
                   "score = last/mean/min/product of P(correct)")
    defaults = {"aggregation": "last"}

    def _validate(self) -> None:
        self._choice("aggregation", ORM_AGGREGATIONS)

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 (with bias) applied at every position."""
        return _modules()["scalar"](hidden_size, bias=True)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Outcome row (`prompt`, `completion`, `label`) -> ids, per-token labels, score mask."""
        label = _outcome_label(row)
        if "completion" not in row:
            raise DataError("an outcome row needs 'completion'")
        ids, mask, _ = render_completion(_prompt_messages(row),
                                         as_messages(row["completion"], "assistant", "completion"),
                                         tokenizer, template, max_length)
        labels = [label if m else float(IGNORE_INDEX) for m in mask]
        return {"input_ids": ids, "labels": labels, "score_mask": mask, "outcome": label}

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, float labels (-100 outside completions), score mask, outcome per row."""
        import torch

        feats = self._encode_rows(rows, tokenizer, template, max_length)
        batch = pad_batch(feats, _pad_id(tokenizer, pad_token_id), padding_side,
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
        agg = self.options["aggregation"]
        if agg == "last":
            idx = last_attended_index(mask.long())
            return torch.sigmoid(logits[torch.arange(logits.shape[0], device=logits.device), idx])
        if agg == "mean":
            p = torch.sigmoid(logits)
            return (p * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        if agg == "min":
            p = torch.sigmoid(logits).masked_fill(~mask, float("inf"))
            return p.min(dim=-1).values
        return torch.exp((F.logsigmoid(logits) * mask).sum(-1))  # product, in log space

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

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Synthetic outcome-labelled solutions, 4 candidates per problem (best-of-N metrics).

        Half the candidates are correct; the wrong ones are half `unsupported` (right work, a
        final line that does not follow) and half arithmetic errors.
        """
        from rlhf_plugins.data import synth

        per_prompt = 4
        rows = synth.outcome_rows(-(-n // per_prompt), seed, split, unsupported_fraction=0.5,
                                  per_prompt=per_prompt)
        return rows[:n]


# --------------------------------------------------------------------------------------------
# PRM
# --------------------------------------------------------------------------------------------

def _step_label(value: Any, i: int) -> int:
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, numbers.Integral) and int(value) in PRM_CLASS_OF_LABEL:
        return int(value)
    if isinstance(value, numbers.Real) and float(value) in (-1.0, 0.0, 1.0):
        return int(value)
    raise DataError(f"labels[{i}]: unknown step label {value!r} (expected -1, 0 or +1)")


class ProcessHead(_Head):
    """3 classes per token, labelled at the last token of each step; P(correct) aggregated."""

    name = "prm"
    description = ("Process RM: 3-class (incorrect/neutral/correct) CE at the last token of each "
                   "step; score = min/mean/product/last of P(correct)")
    defaults = {"aggregation": "min", "delimiter": "\n\n"}

    def _validate(self) -> None:
        self._choice("aggregation", PRM_AGGREGATIONS)
        if not isinstance(self.options["delimiter"], str) or not self.options["delimiter"]:
            raise ConfigError(f"reward head {self.name!r}: delimiter must be a non-empty string")

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 3 classes at every position."""
        return _modules()["classes"](hidden_size, 3)

    def _steps(self, row: Mapping[str, Any]) -> list[str]:
        if "steps" in row and row["steps"] is not None:
            steps = row["steps"]
            if isinstance(steps, str) or not isinstance(steps, (list, tuple)):
                raise DataError("steps: expected a list of strings")
        elif "completion" in row:
            text = _content_text(as_messages(row["completion"], "assistant", "completion"))
            steps = [s for s in text.split(self.options["delimiter"]) if s.strip()]
        else:
            raise DataError("a step row needs 'steps' (or a 'completion' to split into steps)")
        if not steps:
            raise DataError("steps: empty")
        for i, s in enumerate(steps):
            if not isinstance(s, str) or not s.strip():
                raise DataError(f"steps[{i}]: empty step")
        return list(steps)

    def _render_steps(self, row: Mapping[str, Any], tokenizer: Any, template: Any,
                      max_length: int | None) -> tuple[list[int], list[int], list[int]]:
        steps = self._steps(row)
        prompt = _prompt_messages(row)
        completion = [{"role": "assistant", "content": self.options["delimiter"].join(steps)}]
        ids, mask, encoded = render_completion(prompt, completion, tokenizer, template, None)
        ends = step_end_positions(encoded, len(prompt), steps, tokenizer)
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
        return ids, mask, ends

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """Step row (`prompt`, `steps`, `labels` in -1/0/+1) -> ids and class labels at step ends."""
        if "labels" not in row or row["labels"] is None:
            raise DataError("a step row needs 'labels' (one of -1/0/+1 per step)")
        raw = row["labels"]
        if isinstance(raw, (str, Mapping)) or not isinstance(raw, (list, tuple)):
            raise DataError("labels: expected a list of -1/0/+1")
        steps = self._steps(row)
        if len(raw) != len(steps):
            raise DataError(f"labels: {len(raw)} labels for {len(steps)} steps")
        step_labels = [_step_label(v, i) for i, v in enumerate(raw)]
        ids, _, ends = self._render_steps(row, tokenizer, template, max_length)
        labels = [IGNORE_INDEX] * len(ids)
        step_mask = [0] * len(ids)
        kept = 0
        for pos, lab in zip(ends, step_labels):
            if pos < len(ids):
                labels[pos] = PRM_CLASS_OF_LABEL[lab]
                step_mask[pos] = 1
                kept += 1
        if kept == 0:
            raise DataError(f"no step end survives truncation to max_length={max_length}")
        return {"input_ids": ids, "labels": labels, "step_mask": step_mask,
                "step_labels": step_labels[:kept]}

    def encode_for_scoring(self, row: Mapping[str, Any], *, tokenizer: Any = None,
                           template: Any = None, max_length: int | None = None) -> dict[str, Any]:
        """A (`prompt`, `steps` or `completion`) row -> ids + step-end mask."""
        if "input_ids" in row:
            ids = list(row["input_ids"])
            mask = list(row.get("step_mask") or [0] * (len(ids) - 1) + [1])
            return {"input_ids": ids, "step_mask": mask}
        ids, _, ends = self._render_steps(row, tokenizer, template, max_length)
        step_mask = [0] * len(ids)
        for pos in ends:
            if pos < len(ids):
                step_mask[pos] = 1
        if not any(step_mask):
            raise DataError(f"no step end survives truncation to max_length={max_length}")
        return {"input_ids": ids, "step_mask": step_mask}

    def collate_for_scoring(self, features: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0,
                            padding_side: str = "right") -> dict[str, Any]:
        """Pad scoring features (ids + step mask)."""
        import torch

        return pad_batch(features, pad_token_id, padding_side, {"step_mask": (0, torch.long)})

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, class labels at step ends (-100 elsewhere) and the step-end mask."""
        import torch

        feats = self._encode_rows(rows, tokenizer, template, max_length)
        return pad_batch(feats, _pad_id(tokenizer, pad_token_id), padding_side,
                         {"labels": (IGNORE_INDEX, torch.long), "step_mask": (0, torch.long)})

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """3-class cross-entropy at labelled step ends."""
        from rlhf_plugins.losses import prm_loss

        return prm_loss(head_outputs, batch["labels"].to(head_outputs.device))

    def step_probabilities(self, head_outputs: Any, batch: Mapping[str, Any]) -> list[list[float]]:
        """P(correct) at each step end, per sequence."""
        import torch

        mask = self._step_mask(head_outputs, batch)
        p = torch.softmax(head_outputs.float(), dim=-1)[..., 2]
        return [p[i][mask[i]].tolist() for i in range(p.shape[0])]

    def step_predictions(self, head_outputs: Any, batch: Mapping[str, Any]) -> list[list[int]]:
        """Predicted step labels (-1/0/+1, argmax class) at each step end, per sequence."""
        mask = self._step_mask(head_outputs, batch)
        cls = head_outputs.argmax(dim=-1) - 1  # class index 0/1/2 -> label -1/0/+1
        return [cls[i][mask[i]].tolist() for i in range(cls.shape[0])]

    @staticmethod
    def _step_mask(head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        mask = batch.get("step_mask")
        if mask is None:
            mask = batch["labels"] != IGNORE_INDEX
        return mask.to(head_outputs.device) != 0

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """P(correct) at the step ends aggregated (min / mean / product / last)."""
        import torch

        mask = self._step_mask(head_outputs, batch)
        logp = torch.log_softmax(head_outputs.float(), dim=-1)[..., 2]
        p = logp.exp()
        agg = self.options["aggregation"]
        if agg == "min":
            return p.masked_fill(~mask, float("inf")).min(dim=-1).values
        if agg == "mean":
            return (p * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        if agg == "product":
            return torch.exp((logp * mask).sum(-1))
        idx = last_attended_index(mask.long())
        return p[torch.arange(p.shape[0], device=p.device), idx]

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Step accuracy (argmax class == label at labelled step ends)."""
        import torch

        with torch.no_grad():
            labels = batch["labels"].to(head_outputs.device)
            valid = labels != IGNORE_INDEX
            if not bool(valid.any()):
                return {}
            pred = head_outputs.argmax(dim=-1)
            correct = (pred[valid] == labels[valid]).float()
            return {"accuracy": (float(correct.sum()), float(correct.numel()))}

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Synthetic step-labelled solutions."""
        from rlhf_plugins.data import synth

        return synth.step_rows(n, seed, split)


# --------------------------------------------------------------------------------------------
# Value
# --------------------------------------------------------------------------------------------

class ValueHead(_Head):
    """Per-token scalar regressed on returns (PPO critic); masked MSE, optionally clipped."""

    name = "value"
    description = "Value function: per-token scalar, masked MSE to returns (optionally PPO-clipped)"
    defaults = {"clip": None}

    def _validate(self) -> None:
        clip = self.options["clip"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)
                                 or not clip > 0):
            raise ConfigError(f"reward head {self.name!r}: clip must be a number > 0 or null")

    def build_module(self, hidden_size: int) -> Any:
        """Linear hidden -> 1 (with bias) applied at every position."""
        return _modules()["scalar"](hidden_size, bias=True)

    def encode(self, row: Mapping[str, Any], *, tokenizer: Any, template: Any,
               max_length: int | None = None) -> dict[str, Any]:
        """(`prompt`, `completion`, `reward` or `label`) -> ids, returns (terminal reward, gamma 1), mask."""
        if "input_ids" in row and "returns" in row:
            return dict(row)
        reward = row.get("reward", row.get("label"))
        if reward is None:
            raise DataError("a value row needs 'reward' (or 'label'), or 'input_ids' + 'returns'")
        reward = _number(reward, "reward")
        if "completion" not in row:
            raise DataError("a value row needs 'completion'")
        ids, mask, _ = render_completion(_prompt_messages(row),
                                         as_messages(row["completion"], "assistant", "completion"),
                                         tokenizer, template, max_length)
        # A sparse terminal reward with gamma = 1: the return from every completion token is R.
        return {"input_ids": ids, "returns": [reward if m else 0.0 for m in mask], "mask": mask}

    def collate(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, template: Any = None,
                *, pad_token_id: int | None = None, padding_side: str = "right",
                max_length: int | None = None) -> dict[str, Any]:
        """Padded ids, returns, loss mask (default: every real token) and optional old values."""
        import torch

        feats = [dict(f) for f in self._encode_rows(rows, tokenizer, template, max_length)]
        for f in feats:
            if len(f["returns"]) != len(f["input_ids"]):
                raise DataError(f"returns: {len(f['returns'])} values for {len(f['input_ids'])} tokens")
            f.setdefault("mask", [1] * len(f["input_ids"]))
        extra = {"returns": (0.0, torch.float32), "mask": (0, torch.long)}
        if all("old_values" in f for f in feats):
            extra["old_values"] = (0.0, torch.float32)
        return pad_batch(feats, _pad_id(tokenizer, pad_token_id), padding_side, extra)

    def compute_loss(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """`value_loss(values, returns, mask, old_values, clip)`."""
        from rlhf_plugins.losses import value_loss

        dev = head_outputs.device
        mask = batch.get("mask", batch["attention_mask"]).to(dev)
        old = batch.get("old_values")
        return value_loss(head_outputs, batch["returns"].to(dev), mask,
                          old_values=None if old is None else old.to(dev), clip=self.options["clip"])

    def sequence_scores(self, head_outputs: Any, batch: Mapping[str, Any]) -> Any:
        """The value at each sequence's last attended token."""
        import torch

        idx = last_attended_index(batch["attention_mask"]).to(head_outputs.device)
        return head_outputs[torch.arange(head_outputs.shape[0], device=head_outputs.device), idx]

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Mean squared error over the masked tokens."""
        import torch

        with torch.no_grad():
            mask = batch.get("mask", batch["attention_mask"]).to(head_outputs.device).float()
            err = ((head_outputs.float() - batch["returns"].to(head_outputs.device)) ** 2) * mask
            return {"mse": (float(err.sum()), float(mask.sum()))}

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Synthetic outcome rows; the 0/1 label is the terminal reward."""
        from rlhf_plugins.data import synth

        return synth.outcome_rows(n, seed, split)


@hookimpl
def register_reward_heads(register: Any) -> None:
    """Register the built-in heads."""
    for head in (BradleyTerryHead(), OutcomeHead(), ProcessHead(), ValueHead()):
        register(head)
