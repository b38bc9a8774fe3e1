"""The pipeline report: `report.md` plus PNG plots in the run directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .cache import atomic_write_text  # noqa: F401 - re-exported (pipeline, tests)

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


def plot_curves(stage: str, log_history: list[dict], out_dir: Path) -> str | None:
    """One PNG with a panel per logged curve of a stage; returns its file name (or None)."""
    curves = _curves(log_history)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(curves)[:8]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = curves[key]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(stage)
    fig.tight_layout()
    name = f"curves_{stage}.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    return name


def plot_accuracy(evals: Mapping[str, Mapping[str, float]], out_dir: Path) -> str | None:
    """Bar chart of held-out accuracy after each stage; returns its file name."""
    if not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    acc = [float(evals[n].get("accuracy", 0.0)) for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3))
    bars = ax.bar(names, acc, color="#4c72b0")
    for bar, value in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    fig.tight_layout()
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

    parts.append("## Held-out verifiable accuracy after each stage\n")
    parts.append(_table([[name, e.get("accuracy", float("nan")), e.get("mean_reward", float("nan")),
                          e.get("n", "")] for name, e in evals.items()],
                        ["after", "accuracy", "mean reward", "problems"]))
    chart = plot_accuracy(evals, run_dir)
    if chart:
        parts.append(f"\n![accuracy]({chart})\n")

    parts.append("## Stages\n")
    parts.append(_table([[name, s.get("wall_time_s", 0.0), s.get("peak_memory_mb", ""),
                          "skipped (output up to date)" if s.get("skipped") else "ran",
                          ", ".join(f"{k}={v}" for k, v in (s.get("components") or {}).items())]
                         for name, s in stages.items()],
                        ["stage", "wall time (s)", "peak memory (MB)", "status", "plugins"]))
    for name, stage in stages.items():
        parts.append(f"\n### {name}\n")
        metrics = stage.get("metrics") or {}
        if metrics:
            parts.append(_table([[k, v] for k, v in sorted(metrics.items())
                                 if isinstance(v, (int, float, str))], ["metric", "value"]))
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
            parts.append(f"- *{first}* ({'correct' if b.get('correct') else 'wrong'}): "
                         f"`{str(b.get('completion', '')).strip()[:300]}`")
            parts.append(f"- *{last}* ({'correct' if a.get('correct') else 'wrong'}): "
                         f"`{str(a.get('completion', '')).strip()[:300]}`\n")

    parts.append("## Plugin versions\n")
    parts.append(_table([[p.get("name"), p.get("distribution") or "", p.get("version") or "",
                          p.get("status", "ok")] for p in summary.get("plugins", [])],
                        ["plugin", "distribution", "version", "status"]))
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    return report
