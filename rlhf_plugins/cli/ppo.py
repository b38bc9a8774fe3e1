"""`rlhf-plugins ppo --config ppo.yaml`: policy optimisation (PPO/GAE, GRPO, RLOO, ...) through TRL."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Add the `ppo` command."""
    parser = subparsers.add_parser(
        "ppo", help="policy optimisation with a pluggable advantage estimator (TRL GRPOTrainer)",
        description="Optimise a policy against reward functions and/or a reward adapter. The YAML "
                    "holds TRL GRPOConfig fields plus model, dataset, reward_functions, "
                    "advantage_estimator (gae|grpo|rloo|...), critic, kl_penalty, lora, "
                    "quantization (see examples/ppo.yaml).")
    parser.add_argument("--config", required=True, metavar="YAML", help="stage config file")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where the adapter/model, value head and metrics go (overrides output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable; dotted keys for sections, "
                             "e.g. --set max_steps=10 --set lora.r=8)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the PPO stage; prints where the policy went and its final reward/KL."""
    from ..stages.ppo import METRICS_FILE, ppo_from_config

    result = ppo_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    m = result.metrics
    parts = [f"saved {'adapter' if result.adapter else 'model'} to {result.output_dir}"]
    train_logs = [h for h in m.get("log_history", []) if "reward" in h]
    if train_logs:
        last = train_logs[-1]
        for key in ("reward", "kl", "value_loss"):
            if key in last:
                parts.append(f"{key}={last[key]:.4f}")
    for key in ("eval_reward_before", "eval_reward"):
        if m.get(key) is not None:
            parts.append(f"{key}={m[key]:.4f}")
    print("; ".join(parts) + f" (metrics: {result.output_dir / METRICS_FILE})")
    return 0
