"""Benchmark: length-sorted vs unsorted right-padded reward-model scoring (issue 4).

Run:  python bench/bench_scoring.py [--model default|tiny|DIR] [--n 256 --batch-size 16]

A mixed-length set of pre-tokenized sequences (lengths uniform in [--min-len, --max-len],
16-512 by default, random token ids ending in the eos token) is scored twice with
``rlhf_plugins.stages.reward_model.scoring.score`` on a Bradley-Terry reward model: once in input order
(``sort_by_length=False``: plain right-padded batches) and once with length-sorted batches
(the default). The script checks that both give the same scores, then prints tokens/s (real
tokens only), padded-token counts and the padding fraction side by side.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def build_model(which: str) -> tuple[object, object]:
    """A Bradley-Terry RewardModel on the default model, a small random Llama, or a model dir."""
    from rlhf_plugins import registry
    from rlhf_plugins.models import default_model_path, load_causal_lm, load_tokenizer
    from rlhf_plugins.stages.reward_model.model import RewardModel

    if which == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers_models import make_tiny_model_dir

        path = make_tiny_model_dir(Path(tempfile.mkdtemp()), hidden_size=256, intermediate_size=688,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    else:
        path = default_model_path() if which == "default" else Path(which)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = RewardModel(load_causal_lm(path), registry().reward_heads.get("bradley_terry"),
                        tokenizer=tokenizer)
    return model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default, tiny, or a model directory")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhf_plugins.stages.reward_model.scoring import score

    model, tokenizer = build_model(args.model)
    rng = random.Random(args.seed)
    vocab = len(tokenizer)
    rows = []
    for _ in range(args.n):
        length = rng.randint(args.min_len, args.max_len)
        rows.append({"input_ids": [rng.randrange(3, vocab) for _ in range(length - 1)]
                     + [tokenizer.eos_token_id]})

    results = {}
    for name, sort in (("unsorted (right-padded)", False), ("length-sorted", True)):
        times, stats, scores = [], None, None
        score(model, rows[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
        for _ in range(args.repeats):
            scores, stats = score(model, rows, batch_size=args.batch_size, sort_by_length=sort,
                                  progress=False, return_stats=True)
            times.append(stats["seconds"])
        med = statistics.median(times)
        results[name] = {"seconds": med, "tokens": stats["tokens"], "padded": stats["padded_tokens"],
                         "padding_fraction": stats["padding_fraction"],
                         "tokens_per_s": stats["tokens"] / med, "scores": scores}
    base, fast = results["unsorted (right-padded)"], results["length-sorted"]
    diff = max(abs(a - b) for a, b in zip(base["scores"], fast["scores"]))
    print(f"model={args.model} n={args.n} lengths {args.min_len}-{args.max_len} "
          f"batch_size={args.batch_size} repeats={args.repeats} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} python {platform.python_version()}")
    print(f"| batching                 | time (median) | real tokens/s | padded tokens | padding |")
    print(f"|--------------------------|--------------:|--------------:|--------------:|--------:|")
    for name, r in results.items():
        print(f"| {name:<24} | {r['seconds']:>12.2f}s | {r['tokens_per_s']:>13.0f} | "
              f"{r['padded']:>13d} | {100 * r['padding_fraction']:>6.1f}% |")
    print(f"speed-up (tokens/s): {fast['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
          f"max |score difference|: {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"scores differ between the two batchings (max diff {diff})")


if __name__ == "__main__":
    main()
