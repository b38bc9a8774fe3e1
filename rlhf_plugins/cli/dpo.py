"""`rlhf-plugins dpo --config dpo.yaml` and `rlhf-plugins kto --config kto.yaml`: direct
alignment through TRL's DPOTrainer (a `preference_losses` plugin as its loss) and KTOTrainer."""
from __future__ import annotations

import argparse
from typing import Any

from .common import metric_parts, print_stage_result, print_up_to_date, stage_command


def add_parser(subparsers: Any) -> None:
    """Add the `dpo` and `kto` commands."""
    stage_command(
        subparsers, "dpo", help="direct preference optimisation (preference_losses plugin, TRL DPOTrainer)",
        description="Align a causal LM on preference pairs (prompt, chosen, rejected). The YAML "
                    "holds TRL DPOConfig fields plus model, dataset, template, masking, loss, "
                    "loss_options, rpo_alpha, lora, quantization (see examples/dpo.yaml).",
        output_help="where the model, tokenizer and metrics go", func=handle_dpo)
    stage_command(
        subparsers, "kto", help="KTO on unpaired rows labelled desirable or not (TRL KTOTrainer)",
        description="Align a causal LM on unpaired rows (prompt, completion, label). The YAML "
                    "holds TRL KTOConfig fields plus model, dataset, template, masking, lora, "
                    "quantization (see examples/kto.yaml).",
        output_help="where the model, tokenizer and metrics go", func=handle_kto)


def _report(command: str, result: Any, metrics_file: str, keys: tuple[str, ...]) -> int:
    if result.up_to_date:
        return print_up_to_date(command, result.output_dir)
    parts = [f"saved {'adapter' if result.adapter else 'model'} to {result.output_dir}"]
    parts += metric_parts(result.metrics, keys)
    return print_stage_result(parts, result.output_dir / metrics_file)


def handle_dpo(args: argparse.Namespace) -> int:
    """Run the DPO stage; prints where the model went and its preference accuracies."""
    from ..stages.dpo.run import dpo_from_config
    from ..stages.dpo.settings import DPO_METRICS_FILE

    result = dpo_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    return _report("dpo", result, DPO_METRICS_FILE, ("train_loss", "eval_preference_accuracy_before",
                                              "eval_preference_accuracy"))


def handle_kto(args: argparse.Namespace) -> int:
    """Run the KTO stage; prints where the model went and its losses."""
    from ..stages.kto.run import kto_from_config
    from ..stages.kto.settings import KTO_METRICS_FILE

    result = kto_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    return _report("kto", result, KTO_METRICS_FILE, ("train_loss", "eval_loss_before", "eval_loss"))
