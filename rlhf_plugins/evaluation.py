"""Held-out evaluation of a policy on verifiable prompts: greedy answers scored by reward functions."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)


def evaluate_policy(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                    template: str = "chatml", reward_functions: Sequence[Any] = ("exact_answer",),
                    max_new_tokens: int = 96, batch_size: int = 16, samples: int = 3,
                    ) -> dict[str, Any]:
    """Greedy-decode every row's `prompt`, score with the reward functions; accuracy = first one.

    Rows carry a conversational `prompt` plus the columns the reward functions read (`answer`).
    Returns `{"accuracy", "mean_reward", "n", "samples": [...]}`.
    """
    from .generation import generate_completions
    from .rewarding import call_reward_functions, resolve_reward_functions

    funcs, weights = resolve_reward_functions(list(reward_functions))
    prompts = [list(r["prompt"]) for r in rows]
    completions = generate_completions(model, tokenizer, prompts, template=template,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       do_sample=False, desc="evaluating")
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    total, per_function = call_reward_functions(funcs, weights, prompts, completions, **columns)
    first = next(iter(per_function.values()))
    scored = [v for v in first if v is not None]
    accuracy = sum(scored) / len(scored) if scored else 0.0
    valid = [t for t in total if t == t]
    out = {
        "accuracy": float(accuracy),
        "mean_reward": float(sum(valid) / len(valid)) if valid else float("nan"),
        "n": len(rows),
        "samples": [{"prompt": r["prompt"][-1]["content"], "answer": r.get("answer"),
                     "completion": c, "correct": bool(first[i])}
                    for i, (r, c) in enumerate(zip(rows[:samples], completions[:samples]))],
    }
    logger.info("held-out accuracy %.3f over %d prompts", out["accuracy"], len(rows))
    return out
