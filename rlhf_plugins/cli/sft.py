"""`rlhf-plugins sft --config sft.yaml`: supervised fine-tuning through TRL's SFTTrainer."""
from __future__ import annotations

import argparse
from typing import Any

from .common import metric_parts, print_stage_result, print_up_to_date, stage_command


def add_parser(subparsers: Any) -> None:
    """Add the `sft` command."""
    stage_command(
        subparsers, "sft", help="supervised fine-tuning (chat template + masking plugins, TRL SFTTrainer)",
        description="Fine-tune a causal LM on conversations. The YAML holds TRL SFTConfig fields "
                    "plus model, dataset, template, masking, lora, quantization (see "
                    "examples/sft.yaml).",
        output_help="where the model, tokenizer and metrics go", func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the SFT stage; prints where the model went and its final losses."""
    from ..stages.sft.train import METRICS_FILE, sft_from_config

    result = sft_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    if result.up_to_date:
        return print_up_to_date("sft", result.output_dir)
    m = result.metrics
    parts = [f"saved {'adapter' if result.adapter else 'model'} to {result.output_dir}"]
    parts += metric_parts(m, ("train_loss", "eval_loss_before", "eval_loss"))
    return print_stage_result(parts, result.output_dir / METRICS_FILE)
