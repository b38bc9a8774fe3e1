"""TRL's dataset formats, normalised to the rows each stage reads (no torch, no datasets).

TRL names (https://huggingface.co/docs/trl/dataset_formats), standard (strings) and
conversational (message lists):

- language modelling: ``text`` / ``messages`` - SFT (``text`` is trained as is, every token);
- prompt-only: ``prompt`` - ``sample``, ``best-of-n``, ``ppo`` (a string is one user turn);
- prompt-completion: ``prompt`` + ``completion`` - SFT (strings: a user and an assistant turn);
- preference: ``chosen`` + ``rejected`` with an explicit ``prompt`` or an implicit one (the
  messages both conversations share: :func:`extract_implicit_prompt`) - the Bradley-Terry RM;
- unpaired preference: ``prompt`` + ``completion`` + ``label`` (bool) - the ORM;
- stepwise supervision: ``prompt`` + ``completions`` (the steps) + ``labels`` (one bool per
  step) - the PRM (:func:`stepwise_row`; our own name for the steps is ``steps``).
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["extract_implicit_prompt", "normalize_reward_row", "stepwise_row"]


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def extract_implicit_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """A conversational preference row without ``prompt``: the shared leading messages become
    the prompt, the rest ``chosen`` / ``rejected`` (TRL's ``extract_prompt``). Other rows as they are."""
    out = dict(row)
    chosen, rejected = out.get("chosen"), out.get("rejected")
    if out.get("prompt") is not None or not (_is_messages(chosen) and _is_messages(rejected)):
        return out
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and dict(chosen[k]) == dict(rejected[k]):
        k += 1
    if k == 0:
        return out
    out["prompt"], out["chosen"], out["rejected"] = list(chosen[:k]), list(chosen[k:]), list(rejected[k:])
    return out


def stepwise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """TRL's stepwise supervision (``completions`` = the steps, ``labels``) as a PRM row (``steps``)."""
    out = dict(row)
    steps = out.get("completions")
    if out.get("steps") is None and isinstance(steps, (list, tuple)) and steps \
            and all(isinstance(s, str) for s in steps) and "labels" in out:
        out["steps"] = list(out.pop("completions"))
    return out


def normalize_reward_row(row: Mapping[str, Any], label_kind: str) -> dict[str, Any]:
    """A reward-model row in TRL's format for a head of `label_kind`, in the head's own form."""
    if label_kind == "preference":
        return extract_implicit_prompt(row)
    if label_kind == "step":
        return stepwise_row(row)
    return dict(row)
