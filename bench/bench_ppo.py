"""Benchmark: QLoRA single-base PPO memory, and PPO step time vs TRL's GRPOTrainer (issue 6 a, b).

Run (repository root):
  python bench/bench_ppo.py memory [--size 1b|small] [--seq 64]
  python bench/bench_ppo.py step [--steps 6] [--completion 32] [--rounds 1] [--model tiny|default]

memory (benchmark a): two child processes on the same random-weight Llama config and the same
  prompt batch. "four bf16 models": policy, reference, critic (causal LM + value head) and
  reward model (causal LM + reward head) each loaded in bfloat16, one forward each.
  "QLoRA single base": the base loaded once in 4-bit NF4 (double quant, bf16 compute), the
  policy LoRA adapter, a second LoRA adapter for the reward model, a value head and a reward
  head; forwards: policy (+ values), reference (adapters disabled), reward adapter. Each child
  reports its peak RSS minus its RSS after imports (the model-attributable peak), via
  getrusage(ru_maxrss). No optimizer state is allocated on either side (it would only widen the
  gap: full fine-tuning of the bf16 policy and critic needs Adam state for two models).
step (benchmark b): seconds per optimizer step (TRL's own `step_time` metric, first step
  dropped as warm-up) of plain TRL GRPOTrainer vs our PolicyOptimizationTrainer with the
  `grpo`, `gae` (value head) and `gae` + per-token KL estimators, same small random model,
  same prompts, same generation settings (completions forced to full length), LoRA policy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {
    # TinyLlama-1.1B's shape: 1.10e9 parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_model_dir(size: str, root: Path) -> Path:
    """A random-weight Llama of the given size saved in bf16 (+ a tiny tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{size}"
    if (out / "config.json").is_file():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers_tokenizers import make_tokenizer

    tok = make_tokenizer("smollm2")
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _child_memory(mode: str, model_dir: str, seq: int) -> dict[str, Any]:
    import torch

    from rlhf_plugins.models import LoraSettings, QuantSettings, apply_lora, load_causal_lm
    from rlhf_plugins.stages.ppo.value_head import ValueHead

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base_rss = _rss_now()
    ids = torch.randint(10, 30000, (2, seq))
    started = time.perf_counter()
    with torch.no_grad():
        if mode == "four_bf16":
            models = [load_causal_lm(model_dir, dtype="bfloat16") for _ in range(4)]
            hidden = models[0].config.hidden_size
            value_head = ValueHead(hidden, dtype=torch.bfloat16)
            reward_head = torch.nn.Linear(hidden, 1, dtype=torch.bfloat16)
            models[0](input_ids=ids)  # policy
            models[1](input_ids=ids)  # reference
            value_head(models[2].model(input_ids=ids).last_hidden_state)  # critic
            reward_head(models[3].model(input_ids=ids).last_hidden_state[:, -1])  # reward model
            n_params = sum(sum(p.numel() for p in m.parameters()) for m in models)
            held = _tensor_bytes(models + [value_head, reward_head])
        else:
            quant = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16")
            model = load_causal_lm(model_dir, quantization=quant)
            model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
            model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0), adapter_name="reward")
            model.set_adapter("default")
            hidden = model.config.hidden_size
            value_head, reward_head = ValueHead(hidden), torch.nn.Linear(hidden, 1)
            out = model(input_ids=ids, output_hidden_states=True)  # policy + values (shared)
            value_head(out.hidden_states[-1])
            with model.disable_adapter():
                model(input_ids=ids)  # reference = adapter-disabled base
            model.set_adapter("reward")
            body = model.get_base_model().model
            reward_head(body(input_ids=ids).last_hidden_state[:, -1].float())
            model.set_adapter("default")
            n_params = sum(p.numel() for p in model.parameters())
            held = _tensor_bytes([model, value_head, reward_head])
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    return {"mode": mode, "peak_bytes": _peak_rss() - base_rss, "params": n_params,
            "held_bytes": held, "steady_bytes": _rss_now() - base_rss,
            "seconds": time.perf_counter() - started}


def _tensor_bytes(modules: list[Any]) -> int:
    """Bytes of distinct storages held by the modules' parameters, buffers and 4-bit quant states."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if t is None or not hasattr(t, "untyped_storage"):
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            add(t)
            state = getattr(t, "quant_state", None)
            if state is not None:
                add(state.absmax)
                nested = getattr(state, "state2", None)
                if nested is not None:
                    add(nested.absmax)
                    add(getattr(nested, "code", None))
                add(getattr(state, "code", None))
    return sum(seen.values())


def bench_memory(size: str, seq: int, root: Path) -> list[dict[str, Any]]:
    """Run both memory children on the same model dir; return their reports."""
    model_dir = make_model_dir(size, root)
    results = []
    for mode in ("four_bf16", "qlora_single_base"):
        proc = subprocess.run([sys.executable, __file__, "_child", mode, str(model_dir), str(seq)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


# --------------------------------------------------------------------------------------------
# step time
# --------------------------------------------------------------------------------------------

def _never_stop(prompts: list, completions: list, **_: Any) -> list[float]:
    from rlhf_plugins.rewarding import completion_text

    return [float(sum(ch in "aeiou" for ch in completion_text(c)) % 4) for c in completions]


#: the quickstart's PPO rollouts: 32 per generation (steps_per_generation 4), each used twice
REUSED = "ours: gae + value head (beta=0.05, k1 in reward, 32 rollouts reused x2)"


def _recompute_rollout_statistics(trainer: Any) -> None:
    """The rollout statistics as computed before TRL's rollout log-probs and the generation
    values were reused: one full no-grad policy forward for log-probs and values."""
    statistics_of = trainer._rollout_statistics

    def full_forward(output: dict[str, Any], need_logps: bool, values: Any = None) -> dict[str, Any]:
        return statistics_of({k: v for k, v in output.items() if k != "old_per_token_logps"},
                             need_logps, None)

    trainer._rollout_statistics = full_forward


def bench_step(steps: int, completion: int, root: Path, model: str = "tiny",
               only: str | None = None, rounds: int = 1) -> list[dict[str, Any]]:
    """Seconds per step of TRL's GRPOTrainer and our trainer with several estimators.

    With ``rounds`` > 1 the variants run round-robin that many times (so a slow phase of a
    shared machine hits all of them) and each median is over all rounds' steps.
    """
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_plugins import registry
    from rlhf_plugins.data import synth
    from rlhf_plugins.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers_models import make_tiny_model_dir

    if model == "default":  # the embedded SmolLM2-135M-Instruct
        from rlhf_plugins.models import default_model_path
        model_dir = default_model_path()
    else:
        model_dir = make_tiny_model_dir(root, hidden_size=256, intermediate_size=688,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, name="bench-step")
    rows = synth.rl_dataset(64, seed=0)
    common = dict(max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=completion, gradient_checkpointing=False, logging_steps=1,
                  save_strategy="no", learning_rate=1e-4, seed=0, report_to="none", bf16=False,
                  dataloader_pin_memory=False,
                  generation_kwargs={"min_new_tokens": completion})  # same length every run

    def tokenizer():
        tok = load_tokenizer(model_dir)
        tok.chat_template = registry().chat_templates.get("chatml").jinja
        return tok

    def policy():
        return apply_lora(load_causal_lm(model_dir), LoraSettings(r=16, alpha=32, dropout=0.0))

    variants = [
        ("TRL GRPOTrainer (beta=0)", None, {}, 0.0),
        ("ours: grpo (beta=0)", "grpo", {}, 0.0),
        ("TRL GRPOTrainer (beta=0.05, k3 in loss)", None, {}, 0.05),
        ("ours: grpo (beta=0.05, k3 in loss)", "grpo", {}, 0.05),
        ("ours: gae + value head (beta=0.05, k3 in loss)", "gae", {}, 0.05),
        ("ours: gae + value head (beta=0.05, k1 in reward)", "gae", {"kl_penalty": "reward"}, 0.05),
        # the quickstart's PPO: rollouts used for two updates (TRL computes the old log-probs)
        (REUSED, "gae", {"kl_penalty": "reward"}, 0.05),
        (REUSED + ", our own policy forward", "gae", {"kl_penalty": "reward"}, 0.05),
    ]
    if only:  # e.g. "0.05": the variants whose label contains one of the comma-separated parts
        variants = [v for v in variants if any(part in v[0] for part in only.split(","))]
    times_of: dict[str, list[float]] = {label: [] for label, *_ in variants}
    for _round, (label, estimator, extra, beta) in ((r, v) for r in range(rounds) for v in variants):
        torch.manual_seed(0)
        out = tempfile.mkdtemp(dir=root)
        if estimator is None:
            args = GRPOConfig(output_dir=out, beta=beta, **common)
            trainer = GRPOTrainer(policy(), [_never_stop], args, train_dataset=rows,
                                  processing_class=tokenizer())
        else:
            kwargs = dict(common, beta=beta)
            kwargs.pop("report_to"), kwargs.pop("bf16"), kwargs.pop("dataloader_pin_memory")
            if label.startswith(REUSED):
                kwargs.update(num_iterations=2, steps_per_generation=4)
            args = build_grpo_config(kwargs, out, advantage_estimator=estimator, **extra)
            trainer = PolicyOptimizationTrainer(policy(), [_never_stop], args, train_dataset=rows,
                                                processing_class=tokenizer())
            if label.endswith("our own policy forward"):  # as before: ignore what the rollout had
                _recompute_rollout_statistics(trainer)
        trainer.train()
        times_of[label] += [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]
        del trainer
    return [{"variant": label, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
             "steps": len(times)} for label, times in times_of.items()]


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--size", choices=sorted(SIZES), default="1b")
    mem.add_argument("--seq", type=int, default=64)
    mem.add_argument("--root", default=None, help="where the random model is saved (default: a temp dir)")
    step = sub.add_parser("step")
    step.add_argument("--steps", type=int, default=6)
    step.add_argument("--completion", type=int, default=32)
    step.add_argument("--model", choices=("tiny", "default"), default="tiny",
                      help="tiny: random 4-layer Llama; default: the embedded SmolLM2-135M")
    step.add_argument("--variants", help="comma-separated label parts to keep (e.g. 0.05)")
    step.add_argument("--rounds", type=int, default=1, help="run the variants round-robin this often")
    child = sub.add_parser("_child")
    child.add_argument("mode")
    child.add_argument("model_dir")
    child.add_argument("seq", type=int)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    if args.cmd == "_child":
        print(json.dumps(_child_memory(args.mode, args.model_dir, args.seq)))
        return
    import torch

    print(f"# {platform.node()} torch {torch.__version__} python {platform.python_version()} "
          f"cpus={os.cpu_count()} cuda={torch.cuda.is_available()}")
    if args.cmd == "memory":
        root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
        results = bench_memory(args.size, args.seq, root)
        four = results[0]["peak_bytes"]
        print(f"size={args.size} seq={args.seq}")
        held4, steady4 = results[0]["held_bytes"], results[0]["steady_bytes"]
        print("| setup | weight tensors held | ratio | RSS after forwards | ratio | peak RSS | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['mode']} | {r['held_bytes'] / 2**30:.2f} GiB | {r['held_bytes'] / held4:.3f}x | "
                  f"{r['steady_bytes'] / 2**30:.2f} GiB | {r['steady_bytes'] / steady4:.3f}x | "
                  f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['peak_bytes'] / four:.3f}x |")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
            results = bench_step(args.steps, args.completion, Path(tmp), args.model, args.variants,
                                 args.rounds)
        base = results[0]["median_s"]
        print(f"model={args.model} steps={args.steps} (first dropped) x {args.rounds} round(s) "
              f"completion={args.completion} tokens, batch 8 (2 prompts x 4 generations)")
        print(f"| trainer | median s/step | vs {results[0]['variant']} |")
        print("|---|---:|---:|")
        for r in results:
            print(f"| {r['variant']} | {r['median_s']:.3f} | {r['median_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
