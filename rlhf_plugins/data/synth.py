"""The built-in synthetic verifiable task: short arithmetic and percentage word problems.

Deterministic by seed, no downloads. One :class:`Problem` is the source of truth for every
dataset the pipeline needs; a worked solution is a list of steps joined by a blank line
(``STEP_SEPARATOR``), and its last step is always ``The answer is N.`` (``ANSWER_TEMPLATE``),
which the ``exact_answer`` reward function parses. Example (the course notes' PRM example)::

    What is 15% of 80?

    15% = 0.15.

    0.15 * 80 = 12.

    The answer is 12.

Errors are injected at a known computation step: that step's result is off by a small amount
and later steps compute correctly from the wrong value, so the final answer is wrong and the
first wrong step is known exactly.

Splits: every problem's arithmetic (kind + numbers) is hashed into a bucket; ``train``,
``validation`` and ``test`` own disjoint buckets, so no problem of one split ever appears in
another, whatever the seeds.

Dataset builders return Hugging Face ``datasets.Dataset`` objects (imported lazily); prompts
and completions are conversational (TRL's format): ``prompt = [{"role": "user", ...}]``,
completions ``[{"role": "assistant", ...}]``. The ``*_rows`` functions return plain lists of
dicts (what the CLI writes as JSONL). The problems themselves (`Problem`, `generate_problems`,
the splits and the answer format) live in :mod:`rlhf_plugins.data.problems`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..cache import atomic_write_lines, atomic_write_text
from ..errors import ConfigError
from .problems import (ANSWER_TEMPLATE, STEP_SEPARATOR, Problem, check_n, check_split,
                       generate_problems, inject_error, rng_for)


def _assistant(steps: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": STEP_SEPARATOR.join(steps)}]


def _base(problem: Problem) -> dict[str, Any]:
    return {"uid": problem.uid, "kind": problem.kind, "answer": str(problem.answer)}


# --- rows ---------------------------------------------------------------------------------

def problem_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: uid, kind, split, question, prompt, answer, steps, solution."""
    return [p.to_dict() for p in generate_problems(n, seed, split)]


def sft_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: ``messages`` (user question, assistant worked solution), uid, kind, answer."""
    return [{"messages": p.prompt + _assistant(p.steps), **_base(p)}
            for p in generate_problems(n, seed, split)]


def _check_fractions(**fractions: float) -> None:
    """ConfigError unless every named value is a fraction in [0, 1]."""
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def preference_rows(n: int, seed: int = 0, split: str = "train", rambling_fraction: float = 0.25,
                    unsupported_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Rows: prompt, chosen (correct), rejected, rejected_kind, error_step.

    Rejected kinds: ``rambling`` (correct, with filler sentences), ``unsupported`` (correct
    steps, but the final answer line states another number; error_step = the answer line) and
    ``error`` (an arithmetic error carried to the answer) for the rest.
    """
    _check_fractions(rambling_fraction=rambling_fraction, unsupported_fraction=unsupported_fraction)
    if rambling_fraction + unsupported_fraction > 1.0 + 1e-9:  # they split one draw
        raise ConfigError(f"rambling_fraction + unsupported_fraction must be at most 1, got "
                          f"{rambling_fraction + unsupported_fraction!r}")
    rng = rng_for("preference", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        draw = rng.random()
        if draw < rambling_fraction:
            rejected, kind, error_step = p.rambling(rng), "rambling", -1
        elif draw < rambling_fraction + unsupported_fraction:
            rejected, kind, error_step = p.unsupported(rng), "unsupported", len(p.steps) - 1
        else:
            error_step, delta = inject_error(p, rng)
            rejected, kind = p.corrupted(error_step, delta), "error"
        rows.append({"prompt": p.prompt, "chosen": _assistant(p.steps),
                     "rejected": _assistant(rejected), "rejected_kind": kind,
                     "error_step": error_step, **_base(p)})
    return rows


RANKED_KINDS = {2: ("correct", "error"), 3: ("correct", "rambling", "error"),
                4: ("correct", "rambling", "error", "no_answer")}


def ranked_rows(n: int, seed: int = 0, split: str = "train", k: int = 4) -> list[dict[str, Any]]:
    """Rows: prompt, completions best->worst (correct, rambling, wrong, wrong without answer), completion_kinds."""
    if k not in RANKED_KINDS:
        raise ConfigError(f"ranked dataset: k must be 2, 3 or 4, got {k!r}")
    rng = rng_for("ranked", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        error_step, delta = inject_error(p, rng)
        wrong = p.corrupted(error_step, delta)
        candidates = {"correct": p.steps, "rambling": p.rambling(rng), "error": wrong,
                      "no_answer": wrong[:-1]}
        kinds = RANKED_KINDS[k]
        rows.append({"prompt": p.prompt, "completions": [_assistant(candidates[c]) for c in kinds],
                     "completion_kinds": list(kinds), **_base(p)})
    return rows


def outcome_rows(n: int, seed: int = 0, split: str = "train", correct_fraction: float = 0.5,
                 unsupported_fraction: float = 0.0, per_prompt: int = 1) -> list[dict[str, Any]]:
    """Rows: prompt, completion, label (1 correct final answer, 0 wrong), error_step (-1 if none).

    ``per_prompt`` candidates per problem (consecutive rows, same prompt: best-of-N metrics);
    a wrong candidate is ``unsupported`` (correct steps, another final number) with probability
    ``unsupported_fraction``, else an arithmetic error (column ``completion_kind``).
    """
    _check_fractions(correct_fraction=correct_fraction, unsupported_fraction=unsupported_fraction)
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ConfigError(f"per_prompt must be an integer >= 1, got {per_prompt!r}")
    rng = rng_for("outcome", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        for _ in range(per_prompt):
            if rng.random() < correct_fraction:
                steps, label, error_step, kind = p.steps, 1, -1, "correct"
            elif unsupported_fraction and rng.random() < unsupported_fraction:
                steps, label, kind = p.unsupported(rng), 0, "unsupported"
                error_step = len(steps) - 1
            else:
                error_step, delta = inject_error(p, rng)
                steps, label, kind = p.corrupted(error_step, delta), 0, "error"
            rows.append({"prompt": p.prompt, "completion": _assistant(steps), "label": label,
                         "error_step": error_step, "completion_kind": kind, **_base(p)})
    return rows


def step_rows(n: int, seed: int = 0, split: str = "train",
              error_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Rows: prompt, steps, labels (+1/0/-1 per step; -1 from the injected error on), error_step."""
    if not 0.0 <= error_fraction <= 1.0:
        raise ConfigError(f"error_fraction must be in [0, 1], got {error_fraction!r}")
    rng = rng_for("step", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        if rng.random() < error_fraction:
            error_step, delta = inject_error(p, rng)
            steps = p.corrupted(error_step, delta)
        else:
            error_step, steps = -1, p.steps
        labels = p.step_labels(None if error_step < 0 else error_step)
        rows.append({"prompt": p.prompt, "steps": list(steps), "labels": labels,
                     "error_step": error_step, **_base(p)})
    return rows


def rl_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: prompt (conversational, TRL format), answer (string), uid, kind."""
    return [{"prompt": p.prompt, **_base(p)} for p in generate_problems(n, seed, split)]


# --- datasets -----------------------------------------------------------------------------

def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def problems(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of problems: uid, kind, split, question, prompt, answer, steps, solution."""
    return _dataset(problem_rows(n, seed, split))


def sft_dataset(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of SFT conversations (``messages``) with worked solutions."""
    return _dataset(sft_rows(n, seed, split))


def preference_dataset(n: int, seed: int = 0, split: str = "train",
                       rambling_fraction: float = 0.25) -> Any:
    """`datasets.Dataset` of preference pairs: prompt, chosen (correct), rejected (wrong or rambling)."""
    return _dataset(preference_rows(n, seed, split, rambling_fraction))


def ranked_dataset(n: int, seed: int = 0, split: str = "train", k: int = 4) -> Any:
    """`datasets.Dataset` of rankings: prompt, completions ordered best to worst (k = 2..4)."""
    return _dataset(ranked_rows(n, seed, split, k))


def outcome_dataset(n: int, seed: int = 0, split: str = "train",
                    correct_fraction: float = 0.5) -> Any:
    """`datasets.Dataset` of outcome-labelled completions: prompt, completion, label (0/1)."""
    return _dataset(outcome_rows(n, seed, split, correct_fraction))


def step_dataset(n: int, seed: int = 0, split: str = "train", error_fraction: float = 0.5) -> Any:
    """`datasets.Dataset` of step-labelled solutions: prompt, steps, labels (+1/0/-1)."""
    return _dataset(step_rows(n, seed, split, error_fraction))


def rl_dataset(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of RL prompts (TRL conversational ``prompt``) with their ``answer``."""
    return _dataset(rl_rows(n, seed, split))


ROW_BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "problems": problem_rows,
    "sft": sft_rows,
    "preference": preference_rows,
    "ranked": ranked_rows,
    "outcome": outcome_rows,
    "step": step_rows,
    "rl": rl_rows,
}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write `rows` as JSON lines atomically (temp file + ``os.replace``); returns the row count."""
    return atomic_write_lines(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_synth(out_dir: str | os.PathLike, n: int = 1000, seed: int = 0,
                n_test: int | None = None,
                splits: Sequence[str] = ("train", "test")) -> dict[str, dict[str, Any]]:
    """Write every synthetic dataset as ``DIR/<name>_<split>.jsonl`` plus ``manifest.json``.

    ``n`` rows per dataset for ``train`` (and ``validation``), ``n_test`` (default
    ``max(1, n // 5)``) for ``test``. Returns ``{file name: {"dataset", "split", "rows", "path"}}``.
    """
    n = check_n(n)
    n_test = max(1, n // 5) if n_test is None else check_n(n_test)
    for split in splits:  # every split checked before the first file is written
        check_split(split)
    out_dir = Path(out_dir)
    summary: dict[str, dict[str, Any]] = {}
    for split in splits:
        count = n_test if split == "test" else n
        for name, build in ROW_BUILDERS.items():
            path = out_dir / f"{name}_{split}.jsonl"
            rows = write_jsonl(path, build(count, seed, split))
            summary[path.name] = {"dataset": name, "split": split, "rows": rows, "path": str(path)}
    manifest = {"task": "rlhf_plugins.data.synth", "seed": seed, "n": n, "n_test": n_test,
                "answer_template": ANSWER_TEMPLATE, "step_separator": STEP_SEPARATOR,
                "files": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                          for k, v in summary.items()}}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return summary
