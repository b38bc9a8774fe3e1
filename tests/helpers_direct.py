"""Shared by tests/test_dpo.py and tests/test_kto.py: the independent references (sequences
rebuilt from the encoded columns, log-probs from a plain forward + log_softmax)."""
from __future__ import annotations

from typing import Any, Sequence


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` tokenized with no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_batch(rows: Sequence[dict], keys: Sequence[str], pad: int) -> tuple[Any, Any, Any]:
    """(input ids, attention mask, completion mask), right-padded, one sequence per (key, row):
    `prompt_ids + <key>_ids` with the mask `[0] * len(prompt) + <key>_mask`."""
    import torch

    seqs = [(r["prompt_ids"] + r[f"{k}_ids"], [0] * len(r["prompt_ids"]) + r[f"{k}_mask"])
            for k in keys for r in rows]
    width = max(len(s) for s, _ in seqs)
    return (torch.tensor([s + [pad] * (width - len(s)) for s, _ in seqs]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs]),
            torch.tensor([m + [0] * (width - len(m)) for _, m in seqs]))


def completion_logps(model: Any, input_ids: Any, attention_mask: Any, mask: Any) -> tuple[Any, Any]:
    """(summed log-probs of the masked tokens, per-token log-probs): a plain forward +
    log_softmax, not TRL's fused head."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (logps * mask[:, 1:]).sum(-1), logps
