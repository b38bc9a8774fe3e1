"""Held-out reward before/after a few PPO steps: every estimator with ppo_clip, every loss with grpo.

    python bench/policy_losses_estimators.py --model tiny              # CI smoke, seconds per run
    python bench/policy_losses_estimators.py --model default --steps 4 # the embedded SmolLM2-135M
        [--estimators grpo,gae,...] [--losses ppo_clip,gspo,...] [--eval 16] [--json out.json]

Every run goes through `rlhf_plugins.stages.ppo.run_ppo` (our GRPOTrainer subclass) with the
same prompts, seed and generation settings; only one config line differs between two rows of a
table: `advantage_estimator` (table 1, with `policy_loss: ppo_clip`) or `policy_loss` (table 2,
with `advantage_estimator: grpo`). Names default to everything registered, so a third-party
plugin's estimator or loss shows up too.

- `--model tiny`: a 2-layer random Llama (hidden 32) with the default model's tokenizer, full
  fine-tuning, reward `length_penalty` (two-sided, 12 characters): a random model has no
  verifiable skill, but the length of what it writes varies and can be learned in a few steps.
- `--model default` (or a model directory): LoRA r=16 on the model, reward `exact_answer` on
  the synthetic arithmetic task (the held-out reward is its accuracy under sampling).

"Before" is TRL's evaluation of the starting policy on the held-out prompts (every run makes
it, so every run consumes the same random numbers; with one seed they are equal, except for
`gae`, whose value head draws random numbers first); "after" the same evaluation after
`--steps` optimizer steps. `--iterations 2` (TRL `num_iterations`) reuses each generation
batch for two updates: the second one is off-policy (ratios != 1), where the losses differ;
with on-policy updates only (`--iterations 1`) every ratio is 1 and the ratio-based losses
reduce to the same gradient up to their aggregation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

TINY_REWARD = {"name": "length_penalty", "target": 12, "unit": "chars", "two_sided": True}


def tiny_model(directory: Path) -> str:
    """A tiny random causal LM with the embedded default model's tokenizer, saved in `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_plugins.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(None))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def base_config(model: str, tiny: bool, steps: int, n_eval: int, generations: int,
                completion_length: int, iterations: int = 2) -> dict[str, Any]:
    """The config every run shares (ours + TRL's GRPOConfig fields)."""
    config: dict[str, Any] = {
        "model": model, "num_examples": max(2, steps * 2), "eval_examples": n_eval,
        "num_iterations": iterations,
        "num_generations": generations, "per_device_train_batch_size": 2 * generations,
        "per_device_eval_batch_size": 2 * generations, "max_completion_length": completion_length,
        "temperature": 1.0, "beta": 0.0, "max_steps": steps, "logging_steps": 1,
        "save_strategy": "no", "seed": 0, "report_to": "none",
    }
    if tiny:
        config.update(reward_functions=[TINY_REWARD], learning_rate=1e-2)
    else:
        config.update(reward_functions=["exact_answer"], learning_rate=2e-4,
                      lora={"r": 16, "alpha": 32, "dropout": 0.0})
    return config


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """One `run_ppo` in a temporary directory: held-out reward before/after, time."""
    from rlhf_plugins.stages.ppo import ppo_from_config

    started = time.time()
    # TRL/transformers print their log dicts to stdout: keep stdout for the tables
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        result = ppo_from_config({**config, "eval_before": True}, output_dir=out)
    history = [e for e in result.metrics["log_history"] if "reward" in e and "eval_reward" not in e]
    return {"before": result.metrics.get("eval_reward_before"), "after": result.metrics.get("eval_reward"),
            "train_reward": [e["reward"] for e in history], "seconds": round(time.time() - started, 1)}


def registered(family: str) -> list[str]:
    """Every name registered in `family` (built-ins and installed plugins)."""
    from rlhf_plugins import registry

    return list(registry().family(family).names())


def run_tables(model: str, *, tiny: bool, estimators: Sequence[str], losses: Sequence[str], steps: int,
               n_eval: int, generations: int = 2, completion_length: int = 16, iterations: int = 2,
               log: Any = print) -> dict[str, Any]:
    """Run both tables; returns {"estimators": {name: row}, "policy_losses": {name: row}}."""
    base = base_config(model, tiny, steps, n_eval, generations, completion_length, iterations)
    results: dict[str, Any] = {"estimators": {}, "policy_losses": {}}
    plan = [("estimators", "estimator", est, {"advantage_estimator": est, "policy_loss": "ppo_clip"})
            for est in estimators]
    plan += [("policy_losses", "policy loss", loss, {"advantage_estimator": "grpo", "policy_loss": loss})
             for loss in losses]
    for table, label, name, line in plan:
        row = run_one({**base, **line})
        results[table][name] = row
        log(f"{label} {name}: held-out reward {row['before']:.3f} -> {row['after']:.3f} "
            f"({row['seconds']:.0f}s)")
    return results


def markdown(results: dict[str, Any]) -> str:
    """Both tables side by side as markdown."""
    lines = []
    for table, label, fixed in (("estimators", "estimator", "policy_loss: ppo_clip"),
                                ("policy_losses", "policy loss", "advantage_estimator: grpo")):
        if not results[table]:
            continue
        lines += [f"\n{label} ({fixed})\n", f"| {label} | held-out reward before | after | change | time |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in results[table].items():
            lines.append(f"| {name} | {r['before']:.3f} | {r['after']:.3f} | "
                         f"{r['after'] - r['before']:+.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (random 2-layer model, CI), 'default' (embedded SmolLM2) or a path")
    parser.add_argument("--estimators", help="comma-separated (default: every registered estimator; "
                                             "'' for none)")
    parser.add_argument("--losses", help="comma-separated (default: every registered policy loss; "
                                         "'' for none)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--eval", type=int, default=8, help="held-out prompts")
    parser.add_argument("--generations", type=int, default=2, help="completions per prompt")
    parser.add_argument("--completion-length", type=int, default=16, help="max new tokens")
    parser.add_argument("--iterations", type=int, default=2,
                        help="TRL num_iterations: updates per generation batch (1 = on-policy: every "
                             "ratio is 1 and the clipped losses coincide)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    estimators = registered("advantage_estimators") if args.estimators is None \
        else [x for x in args.estimators.split(",") if x]
    losses = registered("policy_losses") if args.losses is None else [x for x in args.losses.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.model == "tiny"
        model = tiny_model(Path(tmp) / "tiny") if tiny else args.model
        if model == "default":
            from rlhf_plugins.models import resolve_model

            model = resolve_model(None)
        results = run_tables(model, tiny=tiny, estimators=estimators, losses=losses, steps=args.steps,
                             n_eval=args.eval, generations=args.generations,
                             completion_length=args.completion_length, iterations=args.iterations,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    results["command"] = " ".join(["python", "bench/policy_losses_estimators.py", *(argv or sys.argv[1:])])
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
