"""Held-out evaluation of a policy on verifiable prompts: greedy answers scored by reward functions."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)


def evaluate_policy(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                    template: str = "chatml", reward_functions: Sequence[Any] = ("exact_answer",),
                    max_new_tokens: int = 96, batch_size: int = 16, samples: int = 3,
                    stop_patterns: Sequence[str] = (),
                    ) -> dict[str, Any]:
    """Greedy-decode every row's `prompt`, score with the reward functions; accuracy = first one.

    Rows (a list or a `datasets.Dataset`) carry a conversational `prompt` plus the columns the
    reward functions read (`answer`).
    Returns `{"accuracy", "mean_reward", "n", "samples": [...]}`.
    """
    from tqdm.auto import tqdm

    from .manager import registry
    from .rewarding import call_reward_functions, resolve_reward_functions
    from .generation import (HFGenerator, encode_prompt, end_of_turn_stop_strings,
                             end_of_turn_token_ids)

    funcs, weights = resolve_reward_functions(list(reward_functions))
    tpl = registry().chat_templates.get(template) if isinstance(template, str) else template
    prompts = [list(r["prompt"]) for r in rows]
    ids = [encode_prompt(tpl, tokenizer, p) for p in prompts]
    generator = HFGenerator(model, tokenizer, stop_ids=end_of_turn_token_ids(tpl, tokenizer),
                            max_new_tokens=max_new_tokens, temperature=0.0,
                            batch_size=batch_size, stop_patterns=stop_patterns,
                            stop_strings=end_of_turn_stop_strings(tpl, tokenizer))
    with tqdm(total=len(ids), desc="evaluating", leave=False) as bar:
        generated = generator.generate(ids, list(range(len(ids))), 1, progress=bar.update)
    completions = [c[0].text for c in generated]
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
        # per problem, in row order: what the paired intervals between stages are computed from
        "correct": [bool(v) for v in first],
        "uids": [r.get("uid", i) for i, r in enumerate(rows)],
        "accuracy_by_kind": accuracy_by_kind(rows, first),
        "samples": [{"prompt": r["prompt"][-1]["content"], "answer": r.get("answer"),
                     "completion": c, "correct": bool(first[i])}
                    for i, (r, c) in enumerate(zip(rows, completions[:samples]))],
    }
    logger.info("held-out accuracy %.3f over %d prompts", out["accuracy"], len(rows))
    return out


def accuracy_by_kind(rows: Sequence[Mapping[str, Any]], correct: Sequence[Any]) -> dict[str, float]:
    """Accuracy per value of the rows' `kind` column (the synthetic task's problem types)."""
    groups: dict[str, list[float]] = {}
    for row, value in zip(rows, correct):
        if isinstance(row.get("kind"), str) and value is not None:
            groups.setdefault(row["kind"], []).append(float(value))
    return {kind: sum(v) / len(v) for kind, v in sorted(groups.items())}


def evaluate_saved_policy(model_dir: str, rows: Sequence[Mapping[str, Any]], *,
                          adapter_dir: str | None = None, dtype: str | None = None,
                          **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_policy` of a saved model (+ a PEFT adapter on it); `kwargs` go through.

    `dtype` (e.g. ``"bfloat16"``): the dtype the model runs in; None: as loaded (float32 on CPU).

    The tokenizer comes from the adapter directory when there is one (stages save it there).
    An adapter one of our stages trained on a 4-bit base runs on that base's dequantized
    weights, the model it was trained as (:func:`~rlhf_plugins.models.load_base_as_trained`).
    """
    from .models import (load_base_as_trained, load_causal_lm, load_tokenizer, resolve_dtype,
                         trained_quantization)

    tokenizer = load_tokenizer(adapter_dir or model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = load_base_as_trained(model_dir, trained_quantization(adapter_dir))
        model = PeftModel.from_pretrained(model, adapter_dir)
        if dtype is not None:  # merged first: one plain model in `dtype`, no LoRA matmuls per token
            model = model.merge_and_unload().to(resolve_dtype(dtype))
            # PEFT leaves the merged weights frozen; on CPU, bf16 decoding with frozen weights
            # ran ~1.5x slower (torch 2.13; bench/README.md, issue 16). No grads: generate is no_grad.
            model.requires_grad_(True)
    else:
        model = load_causal_lm(model_dir, dtype=dtype)
    model.eval()
    return evaluate_policy(model, tokenizer, rows, **kwargs)
