"""`rlhf-plugins rm --config rm.yaml`: train a reward head; `rm mc-labels`: Monte Carlo PRM labels."""
from __future__ import annotations

import argparse
from typing import Any

from .common import metric_parts, print_stage_result, print_up_to_date, stage_command


def add_parser(subparsers: Any) -> None:
    """Add the `rm` command (and its `mc-labels` subcommand)."""
    parser = stage_command(
        subparsers, "rm", help="reward models: bradley_terry / orm / prm / value heads (LoRA, QLoRA)",
        description="Train a reward head on a causal LM. The YAML holds TRL RewardConfig fields "
                    "plus model, head, loss, aggregation, template, dataset, lora, quantization "
                    "(see examples/rm.yaml). Writes the adapter + head, rm_metrics.json and "
                    "rm_training.png to the output directory.",
        output_help="where the model, metrics and plot go", func=handle, config_required=False)
    sub = parser.add_subparsers(dest="rm_command", metavar="SUBCOMMAND")
    mc = sub.add_parser(
        "mc-labels", help="label solution steps by Monte Carlo rollouts (Math-Shepherd)",
        description="For each step prefix of each solution, sample continuations with a policy "
                    "and score them with a reward function; write step rows (prompt, steps, "
                    "labels) as JSONL for the prm head.")
    mc.add_argument("--problems", required=True, metavar="JSONL",
                    help="rows with prompt, steps (and the verifier's columns, e.g. answer); "
                         "'synthetic' uses the built-in task's step rows")
    mc.add_argument("--out", required=True, metavar="JSONL", help="output step rows")
    mc.add_argument("--policy", default="default", help="policy model (dir, hub id, 'default')")
    mc.add_argument("--reward", default="exact_answer", help="verifier reward function plugin")
    mc.add_argument("--template", default="chatml", help="chat template plugin")
    mc.add_argument("--num-rollouts", type=int, default=8)
    mc.add_argument("--mode", choices=("hard", "soft"), default="hard")
    mc.add_argument("--threshold", type=float, default=0.0,
                    help="hard labels: +1 when the success rate exceeds this")
    mc.add_argument("--num-problems", type=int, default=None)
    mc.add_argument("--max-new-tokens", type=int, default=128)
    mc.add_argument("--temperature", type=float, default=1.0)
    mc.add_argument("--seed", type=int, default=0)
    mc.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Dispatch `rm` / `rm mc-labels`."""
    from ..errors import ConfigError

    if getattr(args, "rm_command", None) == "mc-labels":
        return handle_mc_labels(args)
    if not args.config:
        raise ConfigError("rm: --config is required (or use `rm mc-labels`)")
    from ..stages.reward_model.train import METRICS_FILE, rm_from_config

    result = rm_from_config(args.config, output_dir=args.output_dir, overrides=args.overrides)
    if result.up_to_date:
        return print_up_to_date("rm", result.output_dir)
    m = result.metrics
    parts = [f"saved {m['head']} reward model to {result.output_dir}"]
    parts += metric_parts(m, ("train_loss", "eval_loss", "eval_accuracy"))
    parts += metric_parts(m.get("heldout") or {}, ("pairwise_accuracy", "accuracy", "best_of_n_top1",
                                                   "step_accuracy", "first_error_accuracy"),
                          prefix="heldout_")
    return print_stage_result(parts, result.output_dir / METRICS_FILE)


def handle_mc_labels(args: argparse.Namespace) -> int:
    """Write Monte Carlo step labels for a problem set."""
    from pathlib import Path

    from .. import registry
    from ..data import synth
    from ..data.files import load_data_file
    from ..errors import ConfigError
    from ..models import load_causal_lm, load_tokenizer, resolve_model
    from ..guard import check_output_dir
    from ..stages.reward_model.train import check_step_rows, mc_step_labels, policy_sampler

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory (give a .jsonl file path)")
    check_output_dir(out.parent, f"--out: {out}")  # before any model loads
    if args.problems == "synthetic":
        problems = synth.step_rows(args.num_problems or 16, seed=args.seed, split="train")
        problems = [{k: v for k, v in r.items() if k != "labels"} for r in problems]
    else:
        path = Path(args.problems)
        if not path.is_file():
            raise ConfigError(f"--problems: {path}: no such file")
        problems = load_data_file(path)  # memory-mapped; a broken line is named by its number
        if args.num_problems and len(problems) > args.num_problems:
            problems = problems.select(range(args.num_problems))
    where = "synthetic" if args.problems == "synthetic" else str(args.problems)
    check_step_rows(problems, where)  # before any model loads
    template = registry().chat_templates.get(args.template)
    reward = registry().reward_functions.get(args.reward)
    model_path = resolve_model(args.policy)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    sampler = policy_sampler(model, tokenizer, template, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed)
    rows = mc_step_labels(problems, sampler, reward, num_rollouts=args.num_rollouts, mode=args.mode,
                          threshold=args.threshold, where=where)
    synth.write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} step rows to {args.out}")
    return 0
