"""Rejection sampling outputs: result rows, JSONL + saved datasets, reward histogram, summary."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ...cache import atomic_write_dir, atomic_write_figure, atomic_write_jsonl
from ...config import config_hash
from .settings import (ALL, HISTOGRAM_FILE, RESERVED_COLUMNS, SELECTED, SUMMARY_FILE,
                       SamplingResult, SamplingSettings)

if TYPE_CHECKING:  # pragma: no cover
    from .sampler import SamplingRun


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of the non-NaN values, or None when there are none."""
    good = [v for v in values if not math.isnan(v)]
    return math.fsum(good) / len(good) if good else None


def std_or_none(values: Sequence[float]) -> float | None:
    """The (population) standard deviation of the non-NaN values, or None when there are none."""
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return None
    m = math.fsum(good) / len(good)
    return math.sqrt(math.fsum((v - m) ** 2 for v in good) / len(good))


def ranks_of(rewards: Sequence[float]) -> list[int | None]:
    """1 = best within the prompt; ties go to the lower completion index; NaN gets None."""
    order = sorted((j for j, r in enumerate(rewards) if not math.isnan(r)),
                   key=lambda j: (-rewards[j], j))
    ranks: list[int | None] = [None] * len(rewards)
    for rank, j in enumerate(order, 1):
        ranks[j] = rank
    return ranks


def build_rows(run: "SamplingRun", completions: list[list[dict[str, Any]]],
               scored: dict[str, Any], selected: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """One output row per completion: prompt, completion, rewards, rank, selected, provenance."""
    from ...generation import sample_seed

    s = run.s
    provenance = {
        "policy": str(run.policy_ref), "template": s.template, "source": run.source,
        "sampler": run.sampler_params(),
        "scorer": {**run.scorer_params(), "reward_functions": [
            spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
            for spec in run.c.function_specs]},
        "rule": s.selection, "rule_params": json.dumps(s.selection_params, sort_keys=True),
    }
    out = []
    for i, row in enumerate(run.rows):
        ranks = ranks_of(scored["totals"][i])
        extra = {k: v for k, v in row.items() if k not in RESERVED_COLUMNS}
        for j, comp in enumerate(completions[i]):
            total = scored["totals"][i][j]
            out.append({
                "prompt_index": i, "completion_index": j,
                "prompt": row["prompt"],
                "completion": [{"role": "assistant", "content": comp["text"]}],
                "reward": None if math.isnan(total) else total,
                "rewards": scored["per_scorer"][i][j],
                "rank": ranks[j], "selected": (i, j) in selected,
                "num_tokens": comp["num_tokens"], "finish_reason": comp["finish_reason"],
                **extra,
                "provenance": {**provenance,
                               "sample_seed": sample_seed(s.seed, i, j)
                               if s.temperature > 0 else None},
            })
    return out


def write_outputs(run: "SamplingRun", rows: list[dict[str, Any]], pairs: list[tuple[int, int]],
          summary: dict[str, Any]) -> dict[str, str]:
    """Write the selected (and all) rows as JSONL + saved datasets, and the histogram."""
    import datasets

    n = run.s.num_samples
    index = {(r["prompt_index"], r["completion_index"]): k for k, r in enumerate(rows)}
    sel_idx = [index[p] for p in pairs]
    full = datasets.Dataset.from_list(rows)
    files: dict[str, str] = {}
    if run.s.save_all:
        atomic_write_jsonl(run.out / f"{ALL}.jsonl", rows)
        atomic_write_dir(run.out / ALL, lambda d: full.save_to_disk(str(d)))
        files.update({"all_jsonl": f"{ALL}.jsonl", "all_dataset": ALL})
    atomic_write_jsonl(run.out / f"{SELECTED}.jsonl", [rows[k] for k in sel_idx])
    chosen = full.select(sel_idx)
    atomic_write_dir(run.out / SELECTED, lambda d: chosen.save_to_disk(str(d)))
    files.update({"selected_jsonl": f"{SELECTED}.jsonl", "selected_dataset": SELECTED})
    if plot_histogram(run.out / HISTOGRAM_FILE,
                      [r["reward"] for r in rows if r["reward"] is not None],
                      [rows[k]["reward"] for k in sel_idx], rule=run.s.selection, n=n):
        files["histogram"] = HISTOGRAM_FILE
    return files


def plot_histogram(path: Path, before: Sequence[float], after: Sequence[float], *,
                   rule: str = "", n: int | None = None) -> bool:
    """PNG histogram of rewards before (all scored) and after selection; False if nothing to plot."""
    if not before:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = min(before), max(before)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * k / 20 for k in range(21)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    mean_b = math.fsum(before) / len(before)
    ax.hist(before, bins=bins, alpha=0.55, label=f"all completions (n={len(before)}, "
                                                 f"mean {mean_b:.3f})")
    if after:
        mean_a = math.fsum(after) / len(after)
        ax.hist(after, bins=bins, alpha=0.55, label=f"selected (n={len(after)}, mean {mean_a:.3f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("completions")
    ax.set_title(f"Rewards before/after selection ({rule}{f', N={n}' if n else ''})")
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(path, fig)
    return True


def summarize(settings: SamplingSettings, run: "SamplingRun", rows: list[dict[str, Any]],
             pairs: list[tuple[int, int]], totals: list[list[float]]) -> dict[str, Any]:
    """The run's `summary.json`: counts, reward statistics before/after selection, settings."""
    flat = [r for row in totals for r in row]
    chosen = [totals[i][j] for i, j in pairs]
    all_nan = sum(1 for row in totals if row and all(math.isnan(r) for r in row))
    names = sorted({k for r in rows for k in r["rewards"]})

    def per_name(subset: list[dict[str, Any]]) -> dict[str, float | None]:
        return {name: mean_or_none([math.nan if r["rewards"].get(name) is None
                                    else r["rewards"][name] for r in subset])
                for name in names}

    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    selected_rows = [r for r in rows if r["selected"]]
    return {
        "complete": True,
        "config_hash": config_hash(dataclasses.asdict(settings), len(totals)),
        "policy": str(run.policy_ref), "source": run.source,
        "prompts": len(totals), "num_samples": settings.num_samples, "completions": len(flat),
        "scored": sum(1 for r in flat if not math.isnan(r)),
        "unscored": sum(1 for r in flat if math.isnan(r)),
        "all_nan_prompts": all_nan,
        "selected": len(pairs), "selected_prompts": len({i for i, _ in pairs}),
        "reward_mean_all": mean_or_none(flat), "reward_mean_selected": mean_or_none(chosen),
        "reward_std_all": std_or_none(flat), "reward_std_selected": std_or_none(chosen),
        "per_scorer_mean_all": per_name(rows), "per_scorer_mean_selected": per_name(selected_rows),
        "finish_reasons": reasons,
        "mean_completion_tokens": mean_or_none([float(r["num_tokens"]) for r in rows]),
        "rule": settings.selection, "rule_params": dict(settings.selection_params),
        "sampler": run.sampler_params(), "scorer": run.scorer_params(),
        "generation": run.stats.get("generation"), "scoring": run.stats.get("scoring"),
    }


def finished_outputs(output_dir: Path) -> SamplingResult:
    """The result the finished sampling run in `output_dir` wrote (nothing is generated)."""
    from ...cache import read_json
    from ..sft.train import finished_sft

    def rows(name: str) -> list[dict[str, Any]]:
        path = output_dir / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()] if path.is_file() else []

    summary = read_json(output_dir / SUMMARY_FILE) or {}
    sft_dir = (summary.get("sft") or {}).get("output_dir")
    selected = rows(SELECTED)
    return SamplingResult(output_dir, summary, selected, rows(ALL) or selected,
                          finished_sft(sft_dir) if sft_dir else None, up_to_date=True)
