"""The pipeline's validation gate: a stage's model is kept only when it earns it on validation problems.

A stage named in `gate.stages` trains as usual; then its model (the candidate) and the model it
started from (the incumbent: the last kept stage's, or the base) answer the same `n_problems`
problems of the synthetic task's *validation* split, greedily, as the held-out eval does. The
candidate is kept when it answers more of them (`rule: better`), at least as many
(`rule: not_worse`), or more with a paired 95% interval above zero (`rule: significant`); otherwise the pipeline goes on with the incumbent, and the stage's row in
the report says so. The decision never looks at the test problems the report states, so the
test accuracies stay an honest measure of what the pipeline hands over (model selection on a
validation split, as `load_best_model_at_end` does for a Trainer's checkpoints).

A light module: no torch. The evaluation itself is the pipeline's (`Pipeline.evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

RULES = ("better", "not_worse", "significant")


@dataclass
class GateSettings:
    """Which stages must beat the model they started from on validation problems to be kept."""

    #: stages whose model is kept only when it passes (none by default: every model is kept)
    stages: list[str] = field(default_factory=list)
    #: validation problems both models answer (the task's `validation` split, never `test`)
    n_problems: int = 200
    #: better: strictly more validation problems right; not_worse: at least as many;
    #: significant: more, with a paired bootstrap 95% interval of the change above zero
    rule: str = "better"
    #: seed of the draw of validation problems
    seed: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.stages, list) or not all(isinstance(s, str) for s in self.stages):
            raise ConfigError(f"gate.stages: expected a list of stage names, got {self.stages!r}")
        if not isinstance(self.n_problems, int) or isinstance(self.n_problems, bool) or self.n_problems < 1:
            raise ConfigError(f"gate.n_problems: expected a positive integer, got {self.n_problems!r}")
        if self.rule not in RULES:
            raise ConfigError(f"gate.rule: expected one of {list(RULES)}, got {self.rule!r}")


def check_gate(gate: GateSettings, known: Sequence[str], policy_stages: Sequence[str],
               eval_split: str) -> None:
    """Config errors: an unknown stage, one that trains no policy, a gate on the eval's problems.

    A gated stage the run leaves out (`--stages`) is fine: there is nothing to gate.
    """
    for name in gate.stages:
        if name not in known:
            raise ConfigError(f"gate.stages: unknown stage {name!r}; available: {list(known)}")
        if name not in policy_stages:
            raise ConfigError(f"gate.stages: {name!r} trains no policy, so there is no model to keep or drop")
    if gate.stages and eval_split != "test":
        raise ConfigError("gate.stages: the gate decides on validation problems, so the held-out eval "
                          f"must be the test split (task.eval_split is {eval_split!r})")


def decide(incumbent: Sequence[bool], candidate: Sequence[bool], rule: str) -> dict[str, Any]:
    """The gate's verdict from per-problem correctness of both models on the same problems."""
    from ..stats import compare

    if len(incumbent) != len(candidate) or not incumbent:
        raise ValueError(f"the gate needs both models' answers to the same problems "
                         f"(got {len(incumbent)} and {len(candidate)})")
    right_before, right_after = sum(map(bool, incumbent)), sum(map(bool, candidate))
    c = compare(incumbent, candidate)
    kept = {"better": right_after > right_before, "not_worse": right_after >= right_before,
            "significant": right_after > right_before and c["ci_low"] > 0}[rule]
    return {"kept": kept, "rule": rule, "n": len(candidate),
            "incumbent_accuracy": right_before / len(incumbent),
            "candidate_accuracy": right_after / len(candidate),
            "difference": c["difference"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
            "gained": c["gained"], "lost": c["lost"], "mcnemar_p": c["mcnemar_p"]}


def carried_eval(incumbent_eval: Mapping[str, Any], verdict: Mapping[str, Any],
                 incumbent: str) -> dict[str, Any]:
    """The held-out result after a stage whose model was not kept: the incumbent's, marked so."""
    return {**incumbent_eval, "gate": {**verdict, "incumbent": incumbent}}

