"""Tune the quickstart's later stages on the validation split (issue 16), never on its test problems.

    python bench/quickstart_tuning.py --run RUN rs  [--eval 300] [--only 2,7] [--samples DIR] [--out DIR]
    python bench/quickstart_tuning.py --run RUN ppo [--eval 300] [--only 3] [--policy DIR] [--out DIR]

`RUN` is a finished `rlhf-plugins pipeline examples/quickstart.yaml` directory.

- `rs`: SFT on the run's `rejection_sampling/selected.jsonl` (or `--samples DIR`'s, an `rlhf-plugins
  sample` output; for a `per_prompt` variant, on up to that many verified-correct samples per
  prompt of its `all.jsonl`), starting from `--policy` (default: the run's `sft/merged`),
  with the learning rates and epoch counts of `RS_VARIANTS` (LoRA r=16, full precision, as the
  quickstart's `rejection_sampling.sft`).
- `ppo`: the run's PPO stage settings (`ppo/rlhf_plugins_stage.json`), started from `--policy`
  (default: the run's rejection-sampling model), with the TRL overrides of `PPO_VARIANTS`.

Each variant's merged model / adapter is scored greedily (`exact_answer`, the eval's answer-line
stop) on `--eval` problems of the synthetic task's `validation` split and paired with the
starting policy (bootstrap 95% interval, McNemar). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
RS_SFT = {"template": "chatml", "masking": "all_assistant_turns", "merge": True, "num_train_epochs": 1,
          "per_device_train_batch_size": 8, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
          "logging_steps": 2, "save_strategy": "no", "seed": 0, "report_to": "none"}
RS_VARIANTS: dict[str, dict[str, Any]] = {
    "1 epoch, lr 1e-4": {},
    "2 epochs, lr 1e-4": {"num_train_epochs": 2},
    "1 epoch, lr 3e-4": {"learning_rate": 3e-4},
    "2 epochs, lr 3e-4": {"num_train_epochs": 2, "learning_rate": 3e-4},
    "3 epochs, lr 2e-4": {"num_train_epochs": 3, "learning_rate": 2e-4},
    "1 epoch, lr 5e-4": {"learning_rate": 5e-4},
    "1 epoch, lr 3e-4, up to 4 correct per prompt": {"learning_rate": 3e-4, "per_prompt": 4},
    # a control: the reload / LoRA / merge path alone must leave the start model's answers as they are
    "1 epoch, lr 1e-7 (no-op control)": {"learning_rate": 1e-7},
}
PPO_TRL = {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 64,
           "beta": 0.05, "learning_rate": 5e-5, "max_steps": 8, "logging_steps": 1,
           "save_strategy": "no", "report_to": "none", "seed": 0}
PPO16 = {"learning_rate": 1e-4, "steps_per_generation": 4, "num_iterations": 2, "max_steps": 16}
PPO_VARIANTS: dict[str, dict[str, Any]] = {
    "8 steps, lr 5e-5": {},
    "8 steps, lr 2e-4": {"learning_rate": 2e-4},
    "16 steps, lr 1e-4, 32 rollouts reused twice": PPO16,
    "the same, rollouts at temperature 0.7": {**PPO16, "temperature": 0.7},
    "the same, T 0.7, verifier only (no RM)": {**PPO16, "temperature": 0.7, "reward_model_weight": 0.0},
    "the same, T 0.7, no RM, grpo advantages": {**PPO16, "temperature": 0.7, "reward_model_weight": 0.0,
                                                 "advantage_estimator": "grpo"},
    # six times the updates (12 rollouts of 8 prompts x 4), bf16 autocast as the quickstart trains
    "96 steps, T 0.7, bf16": {**PPO16, "temperature": 0.7, "max_steps": 96, "num_examples": 128,
                              "bf16": True},
    # the quickstart's PPO as committed, and the same with a third of its learning rate
    "16 steps, T 0.7, bf16 (the quickstart's)": {**PPO16, "temperature": 0.7, "bf16": True},
    "16 steps, T 0.7, bf16, lr 3e-5": {**PPO16, "temperature": 0.7, "bf16": True, "learning_rate": 3e-5},
    # a learnable band: only prompts the SFT model solved in some but not all of its rejection-sampling
    # samples (so every group of rollouts is likely to hold both a right and a wrong answer)
    "16 steps, T 0.7, bf16, lr 3e-5, band prompts": {**PPO16, "temperature": 0.7, "bf16": True,
                                                     "learning_rate": 3e-5, "band": True},
    "16 steps, T 0.7, bf16, lr 1e-4, band prompts": {**PPO16, "temperature": 0.7, "bf16": True,
                                                     "band": True},
}


def greedy_correct(model_dir: str, rows: list[dict[str, Any]], *, adapter_dir: str | None = None,
                   batch_size: int = 64, stop_patterns: list[str] | None = None) -> list[bool]:
    """Greedy `exact_answer` correctness of a saved policy (+ adapter) on `rows`, per row.

    `stop_patterns` default to the pipeline eval's answer-line stop.
    """
    from rlhf_plugins.evaluation import evaluate_saved_policy
    from rlhf_plugins.models import resolve_model
    from rlhf_plugins.stages.pipeline import EvalSettings

    stops = [EvalSettings().stop_pattern] if stop_patterns is None else stop_patterns
    return evaluate_saved_policy(resolve_model(model_dir), rows, adapter_dir=adapter_dir,
                                 template="chatml", reward_functions=["exact_answer"],
                                 max_new_tokens=64, batch_size=batch_size,
                                 stop_patterns=stops)["correct"]


def up_to_k_correct(all_jsonl: Path, k: int, out: Path) -> Path:
    """The verified-correct samples of a sampling run, at most `k` per prompt, as SFT rows:
    the `threshold` selection rule the stage uses, with `max_per_prompt: k`."""
    from rlhf_plugins import registry

    rows = [json.loads(line) for line in all_jsonl.read_text().splitlines()]
    grid: dict[tuple[int, int], dict[str, Any]] = {(r["prompt_index"], r["completion_index"]): r for r in rows}
    prompts = 1 + max(i for i, _ in grid)
    samples = 1 + max(j for _, j in grid)
    rewards = [[grid[i, j]["reward"] if (i, j) in grid else float("nan") for j in range(samples)]
               for i in range(prompts)]
    rule = registry().selection_rules.get("threshold", min_reward=0.5, max_per_prompt=k)
    with open(out, "w") as dst:
        for i, j in rule.select(rewards):
            dst.write(json.dumps({"prompt": grid[i, j]["prompt"], "completion": grid[i, j]["completion"]}) + "\n")
    return out


def band_prompts(all_jsonl: Path, out: Path) -> Path:
    """The prompts of a sampling run solved by some but not all of their samples, in pool order,
    as prompt rows (`prompt`, `answer`, `uid`, `kind`)."""
    per: dict[int, list[dict[str, Any]]] = {}
    for line in all_jsonl.read_text().splitlines():
        row = json.loads(line)
        per.setdefault(row["prompt_index"], []).append(row)
    with open(out, "w") as dst:
        for i in sorted(per):
            right = sum(r["reward"] >= 0.5 for r in per[i])
            if 0 < right < len(per[i]):
                first = per[i][0]
                dst.write(json.dumps({k: first[k] for k in ("prompt", "answer", "uid", "kind")}) + "\n")
    return out


def chosen(variants: dict[str, dict[str, Any]], only: list[int] | None
           ) -> list[tuple[int, str, dict[str, Any]]]:
    """`(index, name, overrides)` of the variants to run: all, or those at the indices `only`."""
    items = list(variants.items())
    for i in only or []:
        if not 0 <= i < len(items):
            raise SystemExit(f"error: --only: no variant {i} (0..{len(items) - 1})")
    return [(i, *items[i]) for i in (only if only is not None else range(len(items)))]


def tune_rs(samples: Path, out: Path, start_dir: str, rows: list[dict[str, Any]],
            picked: list[tuple[int, str, dict[str, Any]]]) -> list[tuple[str, list[bool], float]]:
    """RS-SFT variants on the selection of the sampling output `samples`, from `start_dir`."""
    from trl import SFTConfig

    from rlhf_plugins.config import load_stage_config
    from rlhf_plugins.stages.sft.settings import SFTSettings
    from rlhf_plugins.stages.sft.train import run_sft

    got = []
    for i, name, variant in picked:
        extra = dict(variant)
        data = str(samples / "selected.jsonl")
        if "per_prompt" in extra:
            k = extra.pop("per_prompt")
            data = str(up_to_k_correct(samples / "all.jsonl", k, out / f"k{k}.jsonl"))
        t0 = time.time()
        cfg = {**RS_SFT, **extra, "model": start_dir, "lora": LORA, "dataset": data,
               "output_dir": str(out / f"rs{i}")}
        ours, trl_kwargs = load_stage_config(cfg, SFTSettings, SFTConfig, where=name)
        result = run_sft(ours, trl_kwargs, out / f"rs{i}")
        seconds = time.time() - t0
        got.append((name, greedy_correct(str(result.merged_dir), rows), seconds))
    return got


def tune_ppo(run: Path, out: Path, start_dir: str, rows: list[dict[str, Any]],
             picked: list[tuple[int, str, dict[str, Any]]]) -> list[tuple[str, list[bool], float]]:
    from trl import GRPOConfig

    from rlhf_plugins.config import load_stage_config
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import run_ppo

    settings = json.loads((run / "ppo" / "rlhf_plugins_stage.json").read_text())["settings"]
    got = []
    for i, name, extra in picked:
        t0 = time.time()
        extra = dict(extra)
        if extra.pop("band", False):
            extra["dataset"] = str(band_prompts(run / "rejection_sampling" / "all.jsonl", out / "band.jsonl"))
        cfg = {**settings, **PPO_TRL, **extra, "model": start_dir}
        ours, trl_kwargs = load_stage_config(cfg, PPOSettings, GRPOConfig, where=name)
        run_ppo(ours, trl_kwargs, out / f"ppo{i}")
        seconds = time.time() - t0
        got.append((name, greedy_correct(start_dir, rows, adapter_dir=str(out / f"ppo{i}")), seconds))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["rs", "ppo"])
    parser.add_argument("--run", required=True, help="a finished quickstart pipeline directory")
    parser.add_argument("--policy", help="starting policy (default: the run's model before the stage)")
    parser.add_argument("--samples", help="rs: an `rlhf-plugins sample` output directory to train on "
                                          "(default: the run's rejection_sampling/)")
    parser.add_argument("--eval", type=int, default=300, help="validation problems")
    parser.add_argument("--out", help="scratch directory (default: a temp dir)")
    parser.add_argument("--only", help="comma-separated indices of the variants to run (default: all)")
    args = parser.parse_args()

    from rlhf_plugins.data import synth
    from rlhf_plugins.stats import compare

    run = Path(args.run)
    only = [int(i) for i in args.only.split(",")] if args.only else None
    # a bad index fails before any work
    picked = chosen(RS_VARIANTS if args.what == "rs" else PPO_VARIANTS, only)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"bench-tune-{args.what}-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = synth.rl_rows(args.eval, 0, "validation")
    before = "sft/merged" if args.what == "rs" else "rejection_sampling/sft/merged"
    start_dir = args.policy or str(run / before)
    start = greedy_correct(start_dir, rows)
    if args.what == "rs":
        samples = Path(args.samples) if args.samples else run / "rejection_sampling"
        table = tune_rs(samples, out, start_dir, rows, picked)
    else:
        table = tune_ppo(run, out, start_dir, rows, picked)

    print(f"\n| {args.what} variant, from {start_dir} | validation accuracy ({args.eval}) "
          "| paired vs start [95% CI], McNemar p | train s |")
    print("|---|---:|---:|---:|")
    print(f"| start | {sum(start) / len(start):.3f} | - | - |")
    results: dict[str, Any] = {"start": sum(start) / len(start)}
    for name, got, seconds in table:
        c = compare(start, got)
        print(f"| {name} | {sum(got) / len(got):.3f} | {c['difference']:+.3f} [{c['ci_low']:+.3f}, "
              f"{c['ci_high']:+.3f}], p = {c['mcnemar_p']:.2g} | {seconds:.0f} |")
        results[name] = {"accuracy": sum(got) / len(got), **c, "seconds": round(seconds, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
