"""PPO (gae + value head) and GRPO on the embedded default model: held-out verifiable reward and KL.

    python bench/ppo_default_model.py [--policy DIR] [--estimators gae,grpo] [--steps 10]
                                      [--greedy-eval 100] [--plot bench/ppo_default_model.png]
                                      [--json out.json]   (--plot-from out.json: redraw only)

Both runs go through `rlhf_plugins.stages.ppo.train.run_ppo` (TRL GRPOTrainer subclass) on one 4-bit
base with a LoRA policy, the same prompts, seed and generation settings; only the advantage
estimator differs. The reward is the built-in `exact_answer` verifier on the synthetic task.
Prints, per estimator, the held-out mean reward (greedy-free TRL evaluation on held-out
prompts) before and after training, the training reward of the first and last steps, the final
KL to the reference and the wall time; `--plot` saves the reward and KL curves.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time


def run(estimator: str, policy: str, steps: int, n_eval: int, out: str, greedy: int = 0) -> dict:
    from rlhf_plugins.stages.ppo.train import ppo_from_config

    config = {"model": policy, "advantage_estimator": estimator, "reward_functions": ["exact_answer"],
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "quantization": {"quant_type": "nf4"},
              "num_examples": steps * 2, "eval_examples": n_eval, "num_generations": 4,
              "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
              "max_completion_length": 64, "temperature": 1.0, "beta": 0.05,
              "kl_penalty": "reward" if estimator == "gae" else "loss",
              "learning_rate": 2e-4, "max_steps": steps, "logging_steps": 1,
              "save_strategy": "no", "seed": 0, "report_to": "none"}
    started = time.time()
    result = ppo_from_config(config, output_dir=out)
    history = [e for e in result.metrics["log_history"] if "reward" in e and "eval_reward" not in e]
    kl_key = "kl" if any(e.get("kl") for e in history) else "rollout_kl"
    out_row = {"seconds": round(time.time() - started, 1),
               "eval_reward_before": result.metrics.get("eval_reward_before"),
               "eval_reward_after": result.metrics.get("eval_reward"),
               "reward": [e["reward"] for e in history],
               "kl": [e.get(kl_key, e.get("kl", 0.0)) for e in history]}
    if greedy:
        out_row["greedy_accuracy_after"] = greedy_accuracy(policy, greedy, str(result.output_dir))
    return out_row


def greedy_accuracy(policy: str, n: int, adapter: str | None = None) -> float:
    """Greedy `exact_answer` accuracy on `n` held-out problems (the task's "test" split)."""
    from rlhf_plugins.data import synth
    from rlhf_plugins.evaluation import evaluate_saved_policy
    from rlhf_plugins.models import resolve_model

    result = evaluate_saved_policy(resolve_model(policy), synth.rl_rows(n, 0, "test"),
                                   adapter_dir=adapter, template="chatml", max_new_tokens=64,
                                   batch_size=25)
    return float(result["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="default", help="starting policy (model dir or 'default')")
    parser.add_argument("--estimators", default="gae,grpo")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (2 prompts x 4 samples)")
    parser.add_argument("--eval", type=int, default=32, help="held-out prompts")
    parser.add_argument("--greedy-eval", type=int, default=0,
                        help="also greedy accuracy on this many held-out problems, before and after")
    parser.add_argument("--plot", help="PNG with the reward and KL curves")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot-from", metavar="JSON", help="only redraw --plot from a saved --json")
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from) as fh:
            plot(json.load(fh), args.plot or "ppo_default_model.png")
        return
    results = {}
    start = greedy_accuracy(args.policy, args.greedy_eval) if args.greedy_eval else None
    if start is not None:
        print(f"start policy: greedy held-out accuracy {start:.3f} ({args.greedy_eval} problems)")
    for est in args.estimators.split(","):
        with tempfile.TemporaryDirectory() as out:
            results[est] = run(est, args.policy, args.steps, args.eval, out, args.greedy_eval)
        r = results[est]
        r["greedy_accuracy_before"] = start
        print(f"{est}: held-out reward {r['eval_reward_before']:.3f} -> {r['eval_reward_after']:.3f}; "
              f"train reward first/last 3 steps {sum(r['reward'][:3]) / 3:.3f} / "
              f"{sum(r['reward'][-3:]) / 3:.3f}; final KL {r['kl'][-1]:.4f}; {r['seconds']:.0f}s",
              flush=True)
    print("| estimator | held-out reward before | after | greedy accuracy before | after | final KL | time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for est, r in results.items():
        g0, g1 = r.get("greedy_accuracy_before"), r.get("greedy_accuracy_after")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {est} | {r['eval_reward_before']:.3f} | {r['eval_reward_after']:.3f} | {fmt(g0)} | "
              f"{fmt(g1)} | {r['kl'][-1]:.4f} | {r['seconds']:.0f}s |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.plot:
        plot(results, args.plot)


def running_mean(values: list[float], window: int = 6) -> list[float]:
    """Mean of the last `window` values at every step (fewer at the start)."""
    return [sum(values[max(0, k - window + 1):k + 1]) / len(values[max(0, k - window + 1):k + 1])
            for k in range(len(values))]


def plot(results: dict, path: str) -> None:
    """Training reward (points, and its 6-step running mean) and KL per step, per estimator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for est, r in results.items():
        steps = range(1, len(r["reward"]) + 1)
        line, = ax1.plot(steps, running_mean(r["reward"]), label=f"{est} (6-step mean)")
        ax1.plot(steps, r["reward"], "o", alpha=0.3, color=line.get_color())
        ax2.plot(steps, r["kl"], marker="o", label=est)
    ax1.set(title="training reward (exact_answer)", xlabel="step")
    ax2.set(title="KL to the reference", xlabel="step")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
