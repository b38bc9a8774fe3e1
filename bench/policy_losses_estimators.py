"""Held-out reward before/after a few PPO steps: every estimator with ppo_clip, every loss with grpo.

    python bench/policy_losses_estimators.py --model tiny              # CI smoke, seconds per run
    python bench/policy_losses_estimators.py --model default --steps 4 # the embedded SmolLM2-135M
        [--estimators grpo,gae,...] [--losses ppo_clip,gspo,...] [--eval 16] [--json out.json]
        [--heldout 128]   # greedy accuracy on held-out problems, paired with the starting policy

Every run goes through `rlhf_plugins.stages.ppo.train.run_ppo` (our GRPOTrainer subclass) with the
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
                completion_length: int, iterations: int = 2, eval_generations: int | None = None,
                eval_batch: int | None = None) -> dict[str, Any]:
    """The config every run shares (ours + TRL's GRPOConfig fields)."""
    config: dict[str, Any] = {
        "model": model, "num_examples": max(2, steps * 2), "eval_examples": n_eval,
        "num_iterations": iterations, "num_generations_eval": eval_generations,
        "num_generations": generations, "per_device_train_batch_size": 2 * generations,
        "per_device_eval_batch_size": eval_batch or 2 * generations,
        "max_completion_length": completion_length,
        "temperature": 1.0, "beta": 0.0, "max_steps": steps, "logging_steps": 1,
        "save_strategy": "no", "seed": 0, "report_to": "none",
    }
    if tiny:
        config.update(reward_functions=[TINY_REWARD], learning_rate=1e-2)
    else:
        config.update(reward_functions=["exact_answer"], learning_rate=2e-4,
                      lora={"r": 16, "alpha": 32, "dropout": 0.0})
    return config


def run_one(config: dict[str, Any], heldout: "Heldout | None" = None) -> dict[str, Any]:
    """One `run_ppo` in a temporary directory: held-out reward before/after, time.

    With `heldout`, TRL's sampled evaluation is off and the trained policy is scored greedily on
    the held-out problems instead (per-problem correctness, compared paired with the starting
    policy, which `heldout` scored once for all rows).
    """
    from rlhf_plugins.stages.ppo.train import ppo_from_config

    started = time.time()
    if heldout is not None:
        config = {**config, "eval_examples": 0}
    # TRL/transformers print their log dicts to stdout: keep stdout for the tables
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        result = ppo_from_config({**config, "eval_before": heldout is None}, output_dir=out)
        scored = None
        if heldout is not None:  # a LoRA adapter on the starting model, or a fully trained model
            scored = heldout.score(config["model"], out) if result.adapter else heldout.score(out)
    history = [e for e in result.metrics["log_history"] if "reward" in e and "eval_reward" not in e]
    row = {"before": result.metrics.get("eval_reward_before"), "after": result.metrics.get("eval_reward"),
           "train_reward": [e["reward"] for e in history], "seconds": round(time.time() - started, 1)}
    if scored is not None:
        row.update(heldout.compare(scored))
    return row


class Heldout:
    """Greedy accuracy on the synthetic task's test problems (the quickstart's held-out set).

    The same evaluation as the pipeline's (`rlhf_plugins.evaluation`, answer-line stop), so every
    row is scored on the same problems and compared *paired* with the starting policy.
    """

    def __init__(self, n: int, max_new_tokens: int, batch_size: int = 20):
        from rlhf_plugins.data import synth
        from rlhf_plugins.stages.pipeline import EvalSettings

        self.rows = synth.rl_rows(n, 0, "test")
        self.kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "stop_patterns": [EvalSettings().stop_pattern], "samples": 0}
        self.start: list[bool] | None = None

    def score(self, model: str, adapter_dir: str | None = None) -> list[bool]:
        from rlhf_plugins.evaluation import evaluate_saved_policy

        return evaluate_saved_policy(model, self.rows, adapter_dir=adapter_dir, **self.kwargs)["correct"]

    def compare(self, correct: list[bool]) -> dict[str, Any]:
        """before/after accuracies and the paired difference (bootstrap interval, McNemar p)."""
        from rlhf_plugins.stats import compare

        assert self.start is not None
        n = len(correct)
        return {"before": sum(self.start) / n, "after": sum(correct) / n, "paired": compare(self.start, correct),
                "correct": correct}


def registered(family: str) -> list[str]:
    """Every name registered in `family` (built-ins and installed plugins)."""
    from rlhf_plugins import registry

    return list(registry().family(family).names())


def run_tables(model: str, *, tiny: bool, estimators: Sequence[str], losses: Sequence[str], steps: int,
               n_eval: int, generations: int = 2, completion_length: int = 16, iterations: int = 2,
               eval_generations: int | None = None, eval_batch: int | None = None,
               heldout: int = 0, log: Any = print) -> dict[str, Any]:
    """Run both tables; returns {"estimators": {name: row}, "policy_losses": {name: row}}.

    `heldout` (> 0): score every policy greedily on that many held-out problems instead of TRL's
    sampled evaluation (see :class:`Heldout`).
    """
    base = base_config(model, tiny, steps, n_eval, generations, completion_length, iterations,
                       eval_generations, eval_batch)
    results: dict[str, Any] = {"estimators": {}, "policy_losses": {},
                               "eval_samples": n_eval * (eval_generations or generations)}
    scorer = None
    if heldout:
        scorer = Heldout(heldout, completion_length, batch_size=eval_batch or 50)
        scorer.start = scorer.score(model)
        results["eval_samples"] = heldout
        results["start_correct"] = scorer.start
        log(f"starting policy: held-out accuracy {sum(scorer.start) / heldout:.3f} ({heldout} problems)")
    plan = [("estimators", "estimator", est, {"advantage_estimator": est, "policy_loss": "ppo_clip"})
            for est in estimators]
    plan += [("policy_losses", "policy loss", loss, {"advantage_estimator": "grpo", "policy_loss": loss})
             for loss in losses]
    done: dict[str, dict[str, Any]] = {}  # grpo + ppo_clip is in both tables: one run
    for table, label, name, line in plan:
        key = json.dumps(line, sort_keys=True)
        row = done[key] if key in done else run_one({**base, **line}, scorer)
        done[key] = row
        results[table][name] = row
        paired = row.get("paired")
        log(f"{label} {name}: held-out reward {row['before']:.3f} -> {row['after']:.3f} "
            + (f"(paired {paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]) "
               if paired else "") + f"({row['seconds']:.0f}s)")
    return results


def markdown(results: dict[str, Any]) -> str:
    """Both tables side by side as markdown.

    With a 0/1 reward (`results["binary"]`, the verifier on the arithmetic task) the "after" column
    carries a Wilson 95% interval over the `eval_samples` held-out samples.
    """
    from rlhf_plugins.stats import wilson_interval

    n = results.get("eval_samples") if results.get("binary") else None
    lines = []
    for table, label, fixed in (("estimators", "estimator", "policy_loss: ppo_clip"),
                                ("policy_losses", "policy loss", "advantage_estimator: grpo")):
        if not results[table]:
            continue
        paired = any("paired" in r for r in results[table].values())
        lines += [f"\n{label} ({fixed})\n"]
        lines += ([f"| {label} | held-out accuracy before | after [95% CI] | paired change [95% CI] "
                   f"| gained / lost (McNemar p) | time |", "|---|---:|---:|---:|---:|---:|"] if paired else
                  [f"| {label} | held-out reward before | after | change | time |", "|---|---:|---:|---:|---:|"])
        for name, r in results[table].items():
            after = f"{r['after']:.3f}"
            if n:
                low, high = wilson_interval(round(r["after"] * n), n)
                after += f" [{low:.3f}, {high:.3f}]"
            if paired:
                c = r["paired"]
                lines.append(f"| {name} | {r['before']:.3f} | {after} | {c['difference']:+.3f} "
                             f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['gained']} / {c['lost']} "
                             f"({c['mcnemar_p']:.2f}) | {r['seconds']:.0f} s |")
                continue
            lines.append(f"| {name} | {r['before']:.3f} | {after} | "
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
    parser.add_argument("--eval-generations", type=int,
                        help="samples per held-out prompt (TRL num_generations_eval; default --generations)")
    parser.add_argument("--eval-batch", type=int,
                        help="held-out samples per generation batch (default 2 x --generations; "
                             "with --heldout: greedy batch, default 50)")
    parser.add_argument("--heldout", type=int, default=0,
                        help="score every policy greedily on this many held-out problems of the synthetic "
                             "task (paired with the starting policy) instead of TRL's sampled evaluation; "
                             "not with --model tiny")
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
                             eval_generations=args.eval_generations, eval_batch=args.eval_batch,
                             heldout=0 if tiny else args.heldout,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    results["binary"] = not tiny  # exact_answer: 0/1 per sample
    results["command"] = " ".join(["python", "bench/policy_losses_estimators.py", *(argv or sys.argv[1:])])
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
