"""`rlhf-plugins sft --config sft.yaml`: supervised fine-tuning through TRL's SFTTrainer."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Add the `sft` command."""
    parser = subparsers.add_parser(
        "sft", help="supervised fine-tuning (chat template + masking plugins, TRL SFTTrainer)",
        description="Fine-tune a causal LM on conversations. The YAML holds TRL SFTConfig fields "
                    "plus model, dataset, template, masking, lora, quantization (see "
                    "examples/sft.yaml).")
    parser.add_argument("--config", required=True, metavar="YAML", help="stage config file")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where the model, tokenizer and metrics go (overrides output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config field (repeatable; dotted keys for sections, "
                             "e.g. --set max_steps=10 --set lora.r=8)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the SFT stage; prints where the model went and its final losses."""
    from ..stages.sft import METRICS_FILE, sft_from_config

    result = sft_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    m = result.metrics
    parts = [f"saved {'adapter' if result.adapter else 'model'} to {result.output_dir}"]
    for key in ("train_loss", "eval_loss_before", "eval_loss"):
        if m.get(key) is not None:
            parts.append(f"{key}={m[key]:.4f}")
    print("; ".join(parts) + f" (metrics: {result.output_dir / METRICS_FILE})")
    return 0
