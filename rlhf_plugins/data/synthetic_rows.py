"""Which synthetic-task rows a reward head trains on: the head declares a `SyntheticRows`, data/ builds them.

Heads (built-in or third-party) never import the task: :class:`rlhf_plugins.sdk.RewardHead`'s
``synthetic_rows(n, seed, split)`` builds what its ``synthetic_format()`` declares with
:func:`build_rows`.

A light module: the task's builders (:mod:`rlhf_plugins.data.synth`) load on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError

__all__ = ["ROW_KINDS", "SyntheticRows", "build_rows"]

#: row kinds of the synthetic task, by the builder in :mod:`rlhf_plugins.data.synth`
ROW_KINDS = ("preference", "ranked", "outcome", "step")


@dataclass(frozen=True)
class SyntheticRows:
    """The synthetic-task rows a reward head trains on.

    `kind`: ``preference`` (chosen/rejected), ``ranked`` (K completions, best first),
    ``outcome`` (a completion + 0/1 label) or ``step`` (steps + per-step labels). `options`:
    keyword arguments of that kind's builder (``rambling_fraction``, ``per_prompt``, ...).
    `margin`: preference rows get a ``margin`` column, 0 when the rejected answer only rambles
    and 1 when it is wrong.
    """

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)
    margin: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ConfigError(f"synthetic rows: kind must be one of {list(ROW_KINDS)}, got {self.kind!r}")
        if self.margin and self.kind != "preference":
            raise ConfigError(f"synthetic rows: a margin needs preference rows, not {self.kind!r}")


def build_rows(rows: SyntheticRows, n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` rows of the synthetic task as `rows` declares them (``per_prompt`` outcome candidates
    count towards `n`)."""
    from . import synth

    if rows.kind == "outcome":
        per_prompt = rows.options.get("per_prompt", 1)
        groups = -(-n // per_prompt) if isinstance(per_prompt, int) and per_prompt >= 1 else n
        return synth.outcome_rows(groups, seed, split, **rows.options)[:n]
    build = {"preference": synth.preference_rows, "ranked": synth.ranked_rows,
             "step": synth.step_rows}[rows.kind]
    out = build(n, seed, split, **rows.options)
    if rows.margin:
        for r in out:
            r["margin"] = 0.0 if r["rejected_kind"] == "rambling" else 1.0
    return out
