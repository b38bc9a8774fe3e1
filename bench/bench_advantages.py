"""Benchmark: built-in advantage estimators vs Python-loop references (issue 6, benchmark c).

Run:  python bench/bench_advantages.py [--batch 64 --length 1024 --num-generations 8]

For each estimator it times, in one run on the same random inputs (ragged right-padded masks):
- ``loop``: a direct Python-loop reference (per row, per token / per group, plain floats);
- ``ours``: the registered component (looked up through ``rlhf_plugins.registry()``);
- for GAE also ``ours chunk=1``: the same component with its chunked scan reduced to a
  plain backward loop over T (vectorised over the batch) - the usual tensor implementation.
and checks that the outputs agree. Prints a table with medians and speed-up ratios.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Any, Callable

import torch

import rlhf_plugins


def loop_gae(rewards: list[float], values: list[list[float]], mask: list[list[int]],
             gamma: float, lam: float) -> list[list[float]]:
    """Textbook reverse GAE recursion per row over its real tokens (reward on the last one)."""
    out = []
    for r, v_row, m_row in zip(rewards, values, mask):
        real = [t for t, m in enumerate(m_row) if m]
        adv = [0.0] * len(m_row)
        last_gae = 0.0
        for j in range(len(real) - 1, -1, -1):
            t = real[j]
            next_v = v_row[real[j + 1]] if j + 1 < len(real) else 0.0
            reward = r if j == len(real) - 1 else 0.0
            last_gae = reward + gamma * next_v - v_row[t] + gamma * lam * last_gae
            adv[t] = last_gae
        out.append(adv)
    return out


def loop_sequence(name: str, rewards: list[float], k: int, eps: float = 1e-4) -> list[float]:
    """Per-group Python loops for the sequence-level estimators."""
    out = []
    batch_mean = sum(rewards) / len(rewards)
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        mean = sum(group) / k
        std = statistics.stdev(group) if k > 1 else 0.0
        for i, r in enumerate(group):
            if name == "grpo":
                out.append(0.0 if max(group) == min(group) else (r - mean) / (std + eps))
            elif name == "dr_grpo":
                out.append(r - mean)
            elif name == "rloo":
                out.append(r - (sum(group) - r) / (k - 1))
            elif name == "reinforce":
                out.append(r)
            else:  # reinforce_baseline
                out.append(r - batch_mean)
    return out


def timed(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.2) -> tuple[float, Any]:
    """Median wall time of `fn` over `repeats` runs (at least `min_seconds` of runs), and its result."""
    result = fn()  # warm-up
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:8.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    b, t, k = args.batch, args.length, args.num_generations
    lengths = torch.randint(t // 8, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    values = torch.randn(b, t, generator=g) * mask
    rewards = (torch.rand(b, generator=g) > 0.5).float() + 0.1 * torch.randn(b, generator=g)
    rewards_l, values_l, mask_l = rewards.tolist(), values.tolist(), mask.int().tolist()
    r_dev, v_dev, m_dev = rewards.to(device), values.to(device), mask.to(device)

    family = rlhf_plugins.registry().advantage_estimators
    print(f"advantage estimators, B={b} T={t} num_generations={k} gamma={args.gamma} "
          f"lam={args.lam}; device={device} torch={torch.__version__} threads={args.threads} "
          f"python={platform.python_version()}")
    header = f"{'estimator':<20}{'python loop':>14}{'ours':>14}{'speed-up':>11}   max |diff|"
    print(header)
    print("-" * len(header))

    # GAE: the loop reference, the chunk=1 tensor loop, the default chunked scan.
    loop_s, loop_adv = timed(lambda: loop_gae(rewards_l, values_l, mask_l, args.gamma, args.lam),
                             max(1, args.repeats // 2))
    reference = torch.tensor(loop_adv)
    for label, component in (("gae (chunk=1)", family.get("gae", chunk=1)),
                             ("gae", family.get("gae"))):
        def call(c=component):
            out = c(r_dev, mask=m_dev, values=v_dev, gamma=args.gamma, lam=args.lam)
            sync()
            return out
        ours_s, out = timed(call, args.repeats)
        diff = float((out.advantages.cpu() - reference).abs().max())
        print(f"{label:<20}{fmt(loop_s):>14}{fmt(ours_s):>14}{loop_s / ours_s:>10.1f}x   {diff:.2e}")

    for name in ("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline"):
        component = family.get(name)
        loop_s, loop_adv = timed(lambda n=name: loop_sequence(n, rewards_l, k), args.repeats)

        def call(c=component):
            out = c(r_dev, num_generations=k)
            sync()
            return out
        ours_s, out = timed(call, args.repeats)
        diff = float((out.advantages.cpu() - torch.tensor(loop_adv)).abs().max())
        print(f"{name:<20}{fmt(loop_s):>14}{fmt(ours_s):>14}{loop_s / ours_s:>10.1f}x   {diff:.2e}")

    # Sequence-level estimators fed per-token rewards [B, T] (summed under the mask).
    token_rewards = torch.zeros(b, t)
    token_rewards[torch.arange(b), lengths - 1] = rewards
    token_rewards = token_rewards - 0.01 * mask  # e.g. a per-token penalty
    seq_l = (token_rewards * mask).sum(1).tolist()
    tok_l, tr_dev = token_rewards.tolist(), token_rewards.to(device)

    def loop_token_grpo():
        sums = [sum(r for r, m in zip(row, m_row) if m) for row, m_row in zip(tok_l, mask_l)]
        adv = loop_sequence("grpo", sums, k)
        return [[a if m else 0.0 for m in m_row] for a, m_row in zip(adv, mask_l)]
    loop_s, loop_adv = timed(loop_token_grpo, max(1, args.repeats // 2))
    grpo = family.get("grpo")

    def call_tok():
        out = grpo(tr_dev, num_generations=k, mask=m_dev)
        sync()
        return out
    ours_s, out = timed(call_tok, args.repeats)
    diff = float((out.advantages.cpu() - torch.tensor(loop_adv)).abs().max())
    print(f"{'grpo [B,T] rewards':<20}{fmt(loop_s):>14}{fmt(ours_s):>14}{loop_s / ours_s:>10.1f}x   {diff:.2e}")
    assert math.isfinite(diff) and seq_l


if __name__ == "__main__":
    main()
