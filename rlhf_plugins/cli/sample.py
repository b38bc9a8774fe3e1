"""`rlhf-plugins sample` (rejection sampling) and `rlhf-plugins best-of-n` (inference-time selection)."""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_output_and_overrides, print_up_to_date


def add_parser(subparsers: Any) -> None:
    """Add the `sample` and `best-of-n` commands."""
    p = subparsers.add_parser(
        "sample", help="rejection sampling: generate N completions per prompt, score, select, write",
        description="Generate N completions per prompt with the policy, score them with reward "
                    "functions and/or a reward model, keep those a selection rule picks, and "
                    "write them (JSONL + HF dataset) with a summary and a reward histogram. "
                    "Interrupted runs resume from the per-chunk cache. See examples/rs.yaml.")
    p.add_argument("--config", required=True, metavar="YAML", help="sampling config file")
    _common(p)
    p.add_argument("--sft", action="store_true",
                   help="fine-tune on the selection with the SFT stage (the config's `sft:` "
                        "section; output in <output_dir>/sft)")
    p.set_defaults(func=handle_sample)

    b = subparsers.add_parser(
        "best-of-n", help="best-of-N: per prompt, the highest-scoring of N samples (no training)",
        description="Sample N completions per prompt and return the best one by the configured "
                    "reward functions / reward model. Prompts come from the config's dataset or "
                    "from --prompt. Writes the same files as `sample` (selected.jsonl holds the "
                    "best completion of each prompt).")
    b.add_argument("--config", metavar="YAML",
                   help="sampling config file (optional with --prompt and a scorer option)")
    _common(b)
    b.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a user prompt (repeatable); replaces the config's dataset")
    b.add_argument("-n", "--num-samples", type=int, metavar="N", help="completions per prompt")
    b.add_argument("--reward-function", action="append", default=[], metavar="NAME",
                   help="a registered reward function (repeatable; replaces the config's)")
    b.add_argument("--reward-model", metavar="DIR",
                   help="a reward model directory (rlhf-plugins rm output or any transformers "
                        "sequence-classification reward model)")
    b.add_argument("--model", help="the policy (default: the config's, else the embedded model)")
    b.set_defaults(func=handle_best_of_n)


def _common(p: argparse.ArgumentParser) -> None:
    add_output_and_overrides(p, "where outputs go",
                             example="--set num_samples=8 --set selection_params.k=16")


def _report(result: Any) -> str:
    s = result.summary

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    return (f"selected {s['selected']} of {s['completions']} completions "
            f"({s['prompts']} prompts x {s['num_samples']}; {s['all_nan_prompts']} prompts "
            f"unscored); mean reward {fmt(s['reward_mean_all'])} -> "
            f"{fmt(s['reward_mean_selected'])}; outputs in {result.output_dir}")


def handle_sample(args: argparse.Namespace) -> int:
    """Run the rejection-sampling stage (and SFT with --sft)."""
    from ..stages.rejection_sampling.run import sample_from_config

    result = sample_from_config(args.config, output_dir=args.output_dir,
                                overrides=args.overrides, finetune=True if args.sft else None)
    if result.up_to_date:
        return print_up_to_date("sample", result.output_dir)
    print(_report(result))
    if result.sft is not None:
        print(f"fine-tuned model: {result.summary['sft']['merged_dir'] or result.sft.output_dir}")
    return 0


def handle_best_of_n(args: argparse.Namespace) -> int:
    """Run best-of-N; with --prompt, print each prompt's best completion."""
    import json

    from ..config import load_yaml
    from ..errors import ConfigError
    from ..stages.rejection_sampling.run import best_of_n
    from ..stages.rejection_sampling.settings import load_sampling_config

    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    if args.num_samples is not None:
        data["num_samples"] = args.num_samples
    if args.reward_function:
        data["reward_functions"] = list(args.reward_function)
    if args.reward_model:
        data["reward_model"] = args.reward_model
    if args.model:
        data["model"] = args.model
    if args.prompt:
        data.setdefault("output_dir", "runs/best-of-n")
    if not args.config and not args.prompt:
        raise ConfigError("best-of-n: give --config, or --prompt with --reward-function/--reward-model")
    settings, out = load_sampling_config(data, args.overrides, args.output_dir)
    rows = [{"prompt": text} for text in args.prompt] or None
    result = best_of_n(settings, out, rows=rows)
    if args.prompt:
        for row in result.selected:
            print(json.dumps({"prompt": row["prompt"][-1]["content"],
                              "completion": row["completion"][0]["content"],
                              "reward": row["reward"], "rewards": row["rewards"]},
                             ensure_ascii=False))
    print(_report(result))
    return 0
