"""QLoRA reward heads (BT, ORM, PRM) on the embedded default model vs their trivial baselines.

    python bench/reward_heads_default_model.py [--heads bradley_terry,orm,prm] [--steps 12]
        [--lr 1e-3] [--rambling 0.25] [--unsupported 0.0] [--per-prompt 1]

Each head trains a LoRA adapter + head on the 4-bit SmolLM2-135M-Instruct with the built-in
synthetic task's rows of its kind (preference pairs, outcome-labelled completions, step-labelled
solutions) through `rlhf_plugins.stages.reward_model.train.rm_from_config` (TRL Trainer subclass), then
prints the held-out metrics before and after training next to each metric's trivial baseline
and the wall time. Numbers go into bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

#: (metric, its trivial baseline) reported per head
METRICS = {
    "bradley_terry": [("pairwise_accuracy", None)],
    "orm": [("best_of_n_top1", "best_of_n_random_baseline"),
            ("within_prompt_pairwise_accuracy", None), ("accuracy", "majority_baseline")],
    "prm": [("step_accuracy", "step_majority_baseline"),
            ("first_error_accuracy", "first_error_no_error_baseline"), ("first_error_f1", None)],
}
CHANCE = {"pairwise_accuracy": 0.5, "within_prompt_pairwise_accuracy": 0.5}


def synthetic_files(head: str, n_train: int, n_eval: int, out: str, args: argparse.Namespace) -> dict:
    """The head's synthetic train/held-out rows with the chosen mix of wrong-answer kinds."""
    from rlhf_plugins.data import synth

    files = {}
    for key, split, n, seed in (("dataset", "train", n_train, 0), ("eval_dataset", "test", n_eval, 1)):
        if head == "bradley_terry":
            rows = synth.preference_rows(n, seed, split, rambling_fraction=args.rambling,
                                         unsupported_fraction=args.unsupported)
        elif head == "orm":
            rows = synth.outcome_rows(max(1, n // args.per_prompt), seed, split,
                                      unsupported_fraction=args.unsupported,
                                      per_prompt=args.per_prompt)
        else:
            rows = synth.step_rows(n, seed, split)
        files[key] = f"{out}/{head}_{split}.jsonl"
        synth.write_jsonl(files[key], rows)
    return files


def run_head(head: str, steps: int, n_eval: int, out: str, args: argparse.Namespace) -> dict:
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    config = {"model": "default", "head": head, **synthetic_files(head, steps * 8, n_eval, out, args),
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "quantization": {"quant_type": "nf4"}, "max_steps": steps,
              "per_device_train_batch_size": 8, "learning_rate": args.lr, "warmup_steps": 2,
              "logging_steps": 2, "max_length": 256, "save_strategy": "no", "seed": 0,
              "report_to": "none"}
    started = time.time()
    result = rm_from_config(config, output_dir=out)
    return {"seconds": round(time.time() - started, 1), "before": result.metrics["heldout_before"],
            "after": result.metrics["heldout"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="bradley_terry,orm,prm")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of 8 rows")
    parser.add_argument("--eval", type=int, default=48, help="held-out rows")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rambling", type=float, default=0.25,
                        help="BT: fraction of rejected answers that ramble (correct, with filler)")
    parser.add_argument("--unsupported", type=float, default=0.0,
                        help="BT/ORM: fraction of wrong answers whose final line contradicts the work")
    parser.add_argument("--per-prompt", type=int, default=1, help="ORM: candidates per problem")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    print("| head | metric | before | after | trivial baseline | time |")
    print("|---|---|---:|---:|---:|---:|")
    for head in args.heads.split(","):
        with tempfile.TemporaryDirectory() as out:
            r = results[head] = run_head(head, args.steps, args.eval, out, args)
        for metric, baseline in METRICS[head]:
            base = r["after"].get(baseline) if baseline else CHANCE.get(metric, "")
            fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
            print(f"| {head} | {metric} | {fmt(r['before'].get(metric))} | "
                  f"{fmt(r['after'].get(metric))} | {fmt(base)} | {r['seconds']:.0f}s |", flush=True)
        for metric in sorted(k for k in r["after"] if "/" in k):  # per wrong-answer kind
            print(f"| {head} | {metric} | {fmt(r['before'].get(metric))} | "
                  f"{fmt(r['after'].get(metric))} | | |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
