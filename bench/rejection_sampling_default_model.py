"""Rejection sampling + SFT on the selection, on the embedded default model (issue 5, integration).

    python bench/rejection_sampling_default_model.py --policy runs/quickstart/sft/merged \
        [--prompts 64] [--samples 8] [--eval 100] [--control] [--out DIR]

1. Held-out accuracy (greedy, `exact_answer`, the synthetic task's "test" split) of the
   starting policy.
2. `rlhf_plugins.stages.rejection_sampling.run.run_sampling`: N samples per training prompt, scored by the
   `exact_answer` verifier, selected with `threshold` (verified-correct, at most 2 per prompt),
   then the SFT stage on the selection (LoRA, merged) - and the held-out accuracy of the result.
3. With `--control`: the matched random control `random_k` (same number of rows, drawn from the
   same cached generations), fine-tuned the same way and evaluated.
Prints a Markdown table (numbers go into bench/README.md) and writes `results.json` in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_tuning import greedy_correct  # noqa: E402

SFT = {"masking": "all_assistant_turns", "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
       "merge": True, "num_train_epochs": 1, "per_device_train_batch_size": 8,
       "learning_rate": 1e-4, "lr_scheduler_type": "constant", "max_length": 512,
       "logging_steps": 2, "save_strategy": "no", "seed": 0, "report_to": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="default", help="starting policy (default: embedded)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--eval", type=int, default=100, help="held-out problems")
    parser.add_argument("--eval-split", default="test",
                        help="synthetic split of the held-out problems ('validation' to tune on: the "
                             "quickstart evaluates on 'test')")
    parser.add_argument("--max-per-prompt", type=int, default=2, help="threshold: rows kept per prompt")
    parser.add_argument("--answer-stop", action="store_true",
                        help="sampling and evaluation stop at the answer line (the pipeline's eval.stop_pattern)")
    parser.add_argument("--control", action="store_true", help="also fine-tune on random_k")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from rlhf_plugins.data import synth
    from rlhf_plugins.stages.pipeline import EvalSettings
    from rlhf_plugins.stages.rejection_sampling.run import run_sampling
    from rlhf_plugins.stages.rejection_sampling.settings import SamplingSettings
    from rlhf_plugins.stats import compare

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-rs-"))
    held_out = synth.rl_rows(args.eval, 0, args.eval_split)
    stops = [EvalSettings().stop_pattern] if args.answer_stop else []
    base = dict(stop_pattern=stops[0] if stops else None, model=args.policy, dataset="synthetic", num_prompts=args.prompts,
                num_samples=args.samples, max_new_tokens=96, temperature=0.8, top_p=0.95,
                seed=0, chunk_size=8, batch_size=32, reward_functions=["exact_answer"],
                sft=SFT)
    results: dict[str, Any] = {"args": vars(args)}
    started = time.time()
    start = greedy_correct(args.policy, held_out, batch_size=25, stop_patterns=stops)
    results["start_accuracy"] = sum(start) / len(start)
    print(f"start policy held-out accuracy {results['start_accuracy']:.3f}", flush=True)

    runs = [("threshold", {"min_reward": 1.0, "max_per_prompt": args.max_per_prompt})]
    if args.control:  # k = the size of the threshold selection, filled in below
        runs.append(("random_k", {"k": None, "seed": 0}))
    for rule, params in runs:
        if rule == "random_k":
            params["k"] = results["threshold"]["selected"]
        t0 = time.time()
        run = run_sampling(SamplingSettings(**base, selection=rule, selection_params=params),
                           out / "rs", finetune=True)
        s = run.summary
        correct = greedy_correct(s["sft"]["merged_dir"], held_out, batch_size=25, stop_patterns=stops)
        results[rule] = {"selected": s["selected"], "selected_prompts": s["selected_prompts"],
                         "pool_accuracy": s["reward_mean_all"],
                         "selection_accuracy": s["reward_mean_selected"],
                         "train_loss": s["sft"].get("train_loss"),
                         "heldout_accuracy": sum(correct) / len(correct),
                         "vs_start": compare(start, correct),
                         "seconds": round(time.time() - t0, 1)}
        print(rule, json.dumps(results[rule]), flush=True)
    results["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\n| policy | selected rows | selection accuracy | held-out accuracy ({args.eval}, "
          f"{args.eval_split}) | paired vs start [95% CI] |")
    print("|---|---:|---:|---:|---:|")
    print(f"| start ({args.policy}) | - | pool {results['threshold']['pool_accuracy']:.3f} | "
          f"{results['start_accuracy']:.3f} | - |")
    for rule, _ in runs:
        r = results[rule]
        print(f"| + SFT on `{rule}` selection | {r['selected']} | {r['selection_accuracy']:.3f} | "
              f"**{r['heldout_accuracy']:.3f}** | {r['vs_start']['difference']:+.3f} "
              f"[{r['vs_start']['ci_low']:+.3f}, {r['vs_start']['ci_high']:+.3f}] |")
    print(f"total {results['seconds']:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
