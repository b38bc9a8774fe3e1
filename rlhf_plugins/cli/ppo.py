"""`rlhf-plugins ppo --config ppo.yaml`: policy optimisation (PPO/GAE, GRPO, RLOO, ...) through TRL."""
from __future__ import annotations

import argparse
from typing import Any

from .common import metric_parts, print_stage_result, print_up_to_date, stage_command


def add_parser(subparsers: Any) -> None:
    """Add the `ppo` command."""
    stage_command(
        subparsers, "ppo", help="policy optimisation with a pluggable advantage estimator (TRL GRPOTrainer)",
        description="Optimise a policy against reward functions and/or a reward model. The YAML "
                    "holds TRL GRPOConfig fields plus model, dataset, reward_functions, "
                    "reward_model (an rlhf-plugins rm output or any transformers "
                    "sequence-classification reward model), "
                    "advantage_estimator (gae|grpo|rloo|...), critic, kl_penalty, lora, "
                    "quantization (see examples/ppo.yaml).",
        output_help="where the adapter/model, value head and metrics go", func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the PPO stage; prints where the policy went and its final reward/KL."""
    from ..stages.ppo.train import METRICS_FILE, ppo_from_config

    result = ppo_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    if result.up_to_date:
        return print_up_to_date("ppo", result.output_dir)
    m = result.metrics
    parts = [f"saved {'adapter' if result.adapter else 'model'} to {result.output_dir}"]
    train_logs = [h for h in m.get("log_history", []) if "reward" in h]
    if train_logs:
        parts += metric_parts(train_logs[-1], ("reward", "kl", "value_loss"))
    parts += metric_parts(m, ("eval_reward_before", "eval_reward"))
    return print_stage_result(parts, result.output_dir / METRICS_FILE)
