"""The pipeline report: `report.md` plus PNG plots in the run directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .cache import atomic_write_text

CURVE_KEYS = ("loss", "eval_loss", "reward", "kl", "value_loss", "accuracy", "eval_accuracy")


def _curves(log_history: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per metric key (loss, reward, kl, ...): (steps, values) from a Trainer log history."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            base = key.split("/")[-1]
            if isinstance(value, (int, float)) and (base in CURVE_KEYS or key.startswith("rewards/")
                                                    or key in CURVE_KEYS):
                steps, values = out.setdefault(key, ([], []))
                steps.append(float(step))
                values.append(float(value))
    return out


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


#: a series with fewer logged points is drawn as labelled points: a line through 2-4 points (PPO
#: logs its rollout metrics only on generation steps) would read as a trend
MIN_LINE_POINTS = 5


def draw_series(ax: Any, steps: list[float], values: list[float]) -> None:
    """One curve on `ax`: a line with its running mean, or (fewer than MIN_LINE_POINTS points)
    unconnected points, each annotated with its value."""
    if len(values) < MIN_LINE_POINTS:
        ax.plot(steps, values, linestyle="none", marker="o", color="#1f4e96", ms=4,
                label=f"{len(values)} logged point{'s' if len(values) != 1 else ''} (no line)")
        for x, y in zip(steps, values):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
        ax.margins(x=0.25, y=0.3)
        ax.legend(fontsize=6, loc="best", frameon=False)
        return
    ax.plot(steps, values, color="#9db4d6", marker="." if len(steps) < 30 else None, lw=1)
    window = max(2, len(values) // 5)
    ax.plot(steps, running_mean(values, window), color="#1f4e96", lw=1.8,
            label=f"running mean ({window})")
    ax.legend(fontsize=6, loc="best", frameon=False)


def curves_figure(stage: str, log_history: list[dict]) -> Any:
    """A grid of small multiples, one panel per logged curve (`draw_series`); None when none."""
    curves = _curves(log_history)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(curves)[:12]
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        draw_series(ax, *curves[key])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(stage, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(stage: str, log_history: list[dict], out_dir: Path) -> str | None:
    """The stage's curves (`curves_figure`) saved as a PNG in `out_dir`; its file name."""
    fig = curves_figure(stage, log_history)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    name = f"curves_{stage}.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    return name


def _not_kept(result: Mapping[str, Any]) -> bool:
    """Whether a validation gate did not keep the stage's model (its numbers are the incumbent's)."""
    return not (result.get("gate") or {}).get("kept", True)


def accuracy_caption(evals: Mapping[str, Mapping[str, Any]]) -> str:
    """What the accuracy chart's bars, whiskers and hatching mean."""
    ns = sorted({int(e.get("n") or 0) for e in evals.values()})
    problems = f"the same {ns[0]} held-out problems" if len(ns) == 1 else "each stage's held-out problems"
    text = f"bars: accuracy on {problems}; whiskers: 95% Wilson interval"
    if any(_not_kept(e) for e in evals.values()):
        text += ("; hatched: a stage the validation gate did not keep (its bar is the model the "
                 "pipeline went on with)")
    return text


def accuracy_figure(evals: Mapping[str, Mapping[str, Any]]) -> Any:
    """Bar chart of held-out accuracy after each stage, Wilson 95% whiskers from the counts; a
    stage the gate did not keep is hatched and labelled with the model it stands for."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .stats import wilson_interval

    names = list(evals)
    acc = [float(evals[n].get("accuracy", 0.0)) for n in names]
    errs: list[list[float]] = [[], []]
    for name, a in zip(names, acc):
        n = int(evals[name].get("n") or 0)
        lo, hi = wilson_interval(correct_count(evals[name]), n) if n else (a, a)
        errs[0].append(max(0.0, a - lo))
        errs[1].append(max(0.0, hi - a))
    labels = [model_label(n, evals[n]).replace("; ", ";\n") for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    bars = ax.bar(range(len(names)), acc, color="#4c72b0", yerr=errs, capsize=4, ecolor="#333333")
    for bar, value, name, up in zip(bars, acc, names, errs[1]):
        if _not_kept(evals[name]):
            bar.set_facecolor("#c5d0e3")
            bar.set_hatch("//")
        ax.text(bar.get_x() + bar.get_width() / 2, value + up + 0.01, f"{value:.2f}", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    if any(_not_kept(evals[n]) for n in names):
        ax.legend(handles=[Patch(facecolor="#c5d0e3", hatch="//", label="not kept by the gate")],
                  fontsize=7, loc="upper left", frameon=False)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out accuracy")
    ax.set_xlabel(textwrap.fill(accuracy_caption(evals), 70), fontsize=7)
    fig.tight_layout()
    return fig


def plot_accuracy(evals: Mapping[str, Mapping[str, float]], out_dir: Path) -> str | None:
    """The accuracy chart (`accuracy_figure`) saved as `accuracy.png`; its file name."""
    if not evals:
        return None
    import matplotlib.pyplot as plt

    fig = accuracy_figure(evals)
    fig.savefig(out_dir / "accuracy.png", dpi=90)
    plt.close(fig)
    return "accuracy.png"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


#: Trainer bookkeeping that goes to the report's appendix rather than its stage tables
RAW_TRAINER_METRICS = ("total_flos", "epoch", "train_runtime", "train_samples_per_second",
                       "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
                       "eval_steps_per_second", "grad_norm", "learning_rate", "num_tokens",
                       "step_time")


def _raw_trainer_metric(key: str) -> bool:
    return key.split(".")[-1] in RAW_TRAINER_METRICS


#: what a stage's rows and plots say when the gate did not keep its model: the model they are of
NOT_KEPT_LABEL = "{incumbent}'s model; {name} not kept"


def model_label(name: str, result: Mapping[str, Any]) -> str:
    """The model a stage's held-out result is of: `name`, or (not kept by the gate) the incumbent's."""
    gate = result.get("gate") or {}
    return name if gate.get("kept", True) else NOT_KEPT_LABEL.format(name=name, incumbent=gate.get("incumbent"))


def correct_count(result: Mapping[str, Any]) -> float:
    """Problems answered right: the per-problem `correct` list summed when there is one, else
    accuracy x n as it is (never rounded: an interval is computed from counts, not from a mean)."""
    correct, n = result.get("correct"), int(result.get("n") or 0)
    if isinstance(correct, list) and len(correct) == n:
        return float(sum(map(bool, correct)))
    return float(result.get("accuracy", 0.0)) * n


def accuracy_table(evals: Mapping[str, Mapping[str, Any]], stages: Mapping[str, Any] | None = None) -> str:
    """Accuracy per stage with a Wilson 95% interval, and the paired change (bootstrap 95% CI,
    McNemar p) against the previous stage and, for the last stage, against SFT."""
    from .stats import compare, wilson_interval

    stages = stages or {}
    names = list(evals)
    rows = []
    for i, name in enumerate(names):
        e = evals[name]
        n = int(e.get("n") or 0)
        acc = float(e.get("accuracy", float("nan")))
        lo, hi = wilson_interval(correct_count(e), n) if n else (float("nan"),) * 2
        change = ""
        prev = evals[names[i - 1]] if i else None
        if prev is not None and e.get("correct") and prev.get("correct") \
                and len(e["correct"]) == len(prev["correct"]):
            c = compare(prev["correct"], e["correct"])
            change = (f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                      f"p={c['mcnemar_p']:.3g}")
        rows.append([model_label(name, e), acc, f"[{lo:.3f}, {hi:.3f}]", n, change,
                     (stages.get(name) or {}).get("wall_time_s", "")])
    out = _table(rows, ["after", "accuracy", "95% interval (Wilson)", "problems",
                        "paired change vs previous (bootstrap 95% CI, McNemar p)", "stage wall time (s)"])
    if "sft" in evals and names and names[-1] != "sft":
        a, b = evals["sft"].get("correct"), evals[names[-1]].get("correct")
        if a and b and len(a) == len(b):
            c = compare(a, b)
            verdict = "excludes zero" if c["excludes_zero"] else "includes zero"
            final = model_label(names[-1], evals[names[-1]])
            out += (f"\n\nFinal ({final}) vs SFT on the same {len(a)} problems: "
                    f"{c['difference']:+.3f}, paired bootstrap 95% CI [{c['ci_low']:+.3f}, "
                    f"{c['ci_high']:+.3f}] ({verdict}); {c['gained']} gained, {c['lost']} lost, "
                    f"McNemar exact p = {c['mcnemar_p']:.3g}.")
    gates = [gate_line(name, evals[name]["gate"]) for name in names if evals[name].get("gate")]
    if gates:
        out += "\n\n" + "\n\n".join(gates)
    return out


def gate_line(stage: str, gate: Mapping[str, Any]) -> str:
    """One report line: the gate's validation numbers and what the pipeline did."""
    rule = {"better": "more right", "not_worse": "at least as many right",
            "significant": "more right with the interval above zero"}[gate["rule"]]
    verdict = ("kept" if gate["kept"] else
               f"not kept, so the pipeline goes on with the {gate['incumbent']} model (the {stage} row "
               "repeats its test answers)")
    return (f"Validation gate after {stage}: {gate['candidate_accuracy']:.3f} vs {gate['incumbent']}'s "
            f"{gate['incumbent_accuracy']:.3f} on {gate['n']} validation problems, paired change "
            f"{gate['difference']:+.3f} [{gate['ci_low']:+.3f}, {gate['ci_high']:+.3f}] "
            f"({gate['gained']} gained, {gate['lost']} lost; kept when it gets {rule}): {verdict}.")


def pair_counts(metrics: Mapping[str, Any], prefix: str) -> str:
    """` (R right, T tied)`: a reward model's held-out pairs ranked right and tied, from its
    `prefix.pairwise_accuracy` (ties count half), `.pairs` and `.tied_pairs`; '' without ties' count."""
    n, tied = int(metrics.get(f"{prefix}.pairs") or 0), metrics.get(f"{prefix}.tied_pairs")
    if not n or not isinstance(tied, int) or isinstance(tied, bool):
        return ""
    right = float(metrics[f"{prefix}.pairwise_accuracy"]) * n - tied / 2
    if abs(right - round(right)) > 1e-6:  # inconsistent metrics: say nothing rather than guess
        return ""
    return f" ({round(right)} right, {tied} tied)"


def reward_model_line(stages: Mapping[str, Any]) -> str:
    """The reward model's held-out pairwise accuracy before and after training (Wilson 95%
    intervals), from a stage whose metrics hold `heldout[_before].pairwise_accuracy`; or ''."""
    from .stats import wilson_interval

    for name, stage in stages.items():
        m = stage.get("metrics") or {}
        after, before = m.get("heldout.pairwise_accuracy"), m.get("heldout_before.pairwise_accuracy")
        n = int(m.get("heldout.pairs") or 0)
        if after is None or before is None or not n:
            continue
        lo_b, hi_b = wilson_interval(float(before) * n, n)  # the pair counts, ties as half
        lo_a, hi_a = wilson_interval(float(after) * n, n)
        verdict = "above" if after > before else "not above"
        tied = " (the untrained head ties every pair)" if m.get("heldout_before.tied_pairs") == n else ""
        return (f"Reward model ({name}) held-out pairwise accuracy on {n} pairs: {float(before):.3f} "
                f"[{lo_b:.3f}, {hi_b:.3f}]{pair_counts(m, 'heldout_before')} before training{tied} -> "
                f"{float(after):.3f} [{lo_a:.3f}, {hi_a:.3f}]{pair_counts(m, 'heldout')} after "
                f"({verdict} its pre-training value). Wilson 95% intervals; a tied pair counts half.")
    return ""


#: count metrics (the last part of a dotted key) that measure what a stage hands on: 0 of any
#: means the stage produced nothing usable (e.g. rejection sampling's `selected`)
PRODUCED_COUNTS = {"selected": "selected samples", "pairs": "pairs", "train_pairs": "training pairs",
                   "train_rows": "training rows"}


def produced_nothing(stage: Mapping[str, Any]) -> list[str]:
    """What a stage's count metrics say it produced none of (`0 selected samples`); [] when fine."""
    metrics = stage.get("metrics") or {}
    return [f"0 {PRODUCED_COUNTS[key.rsplit('.', 1)[-1]]} (`{key}`)" for key, value in metrics.items()
            if key.rsplit(".", 1)[-1] in PRODUCED_COUNTS and value == 0 and not isinstance(value, bool)]


def empty_stage_warnings(stages: Mapping[str, Any]) -> list[str]:
    """One line per stage that produced nothing usable, for the top of the report."""
    return [f"{name} produced nothing usable: {', '.join(empty)}."
            for name, stage in stages.items() if (empty := produced_nothing(stage))]


def dropped_line(metrics: Mapping[str, Any]) -> str:
    """``**Dropped rows:** 4 (empty_answer 1, invalid 2, truncated 1)`` from a stage's (flat)
    metrics, eval rows after a `;`; '' when the stage dropped none."""
    parts = []
    for prefix, label in (("", ""), ("eval_", "eval ")):
        total = metrics.get(f"{prefix}dropped_rows")
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            continue
        head = f"{prefix}dropped."
        reasons = sorted((k[len(head):], v) for k, v in metrics.items() if k.startswith(head))
        detail = f" ({', '.join(f'{k} {v}' for k, v in reasons)})" if reasons else ""
        parts.append(f"{label}{total}{detail}")
    return f"**Dropped rows:** {'; '.join(parts)}" if parts else ""


def stage_status(name: str, stage: Mapping[str, Any], evals: Mapping[str, Mapping[str, Any]]) -> str:
    """A stage's status cell: ran or skipped, its model not kept, a warning when it produced nothing."""
    status = "skipped (output up to date)" if stage.get("skipped") else "ran"
    result = evals.get(name) or {}
    if _not_kept(result):
        status += f"; model not kept (the pipeline went on with {result['gate'].get('incumbent')}'s model)"
    empty = produced_nothing(stage)
    return f"**warning:** {status}, produced nothing usable: {', '.join(empty)}" if empty else status


def write_report(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write `report.md` and its plots from a pipeline summary; returns the report path.

    `summary` keys: `config` (path), `evals` ({stage: {accuracy, mean_reward, samples}}),
    `stages` ({stage: {metrics, log_history, wall_time_s, peak_memory_mb, skipped}}),
    `plugins` ([{name, distribution, version, components}]), `components` ({stage: {...}}).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = summary.get("evals", {})
    stages = summary.get("stages", {})
    parts = [f"# rlhf-plugins pipeline report\n\nConfig: `{summary.get('config', '')}`"
             + (" (smoke)" if summary.get("smoke") else "") + "\n"]
    parts += [f"> **Warning:** {line}\n" for line in empty_stage_warnings(stages)]

    parts.append("## Key numbers\n")
    parts.append(accuracy_table(evals, stages))
    rm_line = reward_model_line(stages)
    if rm_line:
        parts.append("\n" + rm_line)
    chart = plot_accuracy(evals, run_dir)
    if chart:
        parts.append(f"\n![accuracy]({chart})\n\n*{accuracy_caption(evals)}.*\n")
    kinds = sorted({k for e in evals.values() for k in (e.get("accuracy_by_kind") or {})})
    if kinds:
        parts.append("\nAccuracy by problem kind:\n")
        parts.append(_table([[model_label(name, e)]
                             + [(e.get("accuracy_by_kind") or {}).get(k, "") for k in kinds]
                             for name, e in evals.items()], ["after"] + kinds))
        parts.append("")
    parts.append(_table([[name, s.get("wall_time_s", 0.0), s.get("peak_memory_mb", ""),
                          stage_status(name, s, evals),
                          ", ".join(f"{k}={v}" for k, v in (s.get("components") or {}).items())]
                         for name, s in stages.items()],
                        ["stage", "wall time (s)", "peak memory (MB)", "status", "plugins"]))
    total = sum(float(s.get("wall_time_s") or 0.0) for s in stages.values())
    peak = max([float(s.get("peak_memory_mb") or 0.0) for s in stages.values()] or [0.0])
    parts.append(f"\nStages' wall time {total:.0f} s; peak memory {peak:.0f} MB.\n")

    parts.append("## Stages\n")
    appendix = []
    for name, stage in stages.items():
        parts.append(f"\n### {name}\n")
        metrics = {k: v for k, v in (stage.get("metrics") or {}).items()
                   if isinstance(v, (int, float, str))}
        main = {k: v for k, v in metrics.items() if not _raw_trainer_metric(k)}
        dropped = dropped_line(metrics)
        if dropped:
            parts.append(dropped + "\n")
        if main:
            parts.append(_table([[k, v] for k, v in sorted(main.items())], ["metric", "value"]))
        raw = {k: v for k, v in metrics.items() if _raw_trainer_metric(k)}
        if raw:
            appendix.append((name, raw))
        plot = plot_curves(name, stage.get("log_history") or [], run_dir)
        if plot:
            parts.append(f"\n![{name} curves]({plot})\n")

    parts.append("\n## Sample completions\n")
    names = list(evals)
    if names:
        first, last = names[0], names[-1]
        before = evals[first].get("samples") or []
        after = evals[last].get("samples") or []
        for b, a in list(zip(before, after))[:3]:
            parts.append(f"**Prompt:** {b.get('prompt', '')}  (answer: {b.get('answer', '')})\n")
            parts.append(f"- *{model_label(first, evals[first])}* "
                         f"({'correct' if b.get('correct') else 'wrong'}): "
                         f"`{str(b.get('completion', '')).strip()[:300]}`")
            parts.append(f"- *{model_label(last, evals[last])}* "
                         f"({'correct' if a.get('correct') else 'wrong'}): "
                         f"`{str(a.get('completion', '')).strip()[:300]}`\n")

    parts.append("## Plugin versions\n")
    parts.append(_table([[p.get("name"), p.get("distribution") or "", p.get("version") or "",
                          p.get("status", "ok")] for p in summary.get("plugins", [])],
                        ["plugin", "distribution", "version", "status"]))
    if appendix:
        parts.append("\n<details><summary>Appendix: the trainers' raw metrics</summary>\n")
        for name, raw in appendix:
            parts.append(f"\n**{name}**\n")
            parts.append(_table([[k, v] for k, v in sorted(raw.items())], ["metric", "value"]))
        parts.append("\n</details>\n")
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    return report
