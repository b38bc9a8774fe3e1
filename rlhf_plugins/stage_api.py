"""The `Stage` type: what a pipeline stage declares (family ``stages``), torch-free at import.

A stage is what TRL calls a trainer, plus what a pipeline needs to chain it: a settings class
(our fields), a TRL config class (or none), defaults taken from the pipeline and from earlier
stages (:class:`StageContext`), light and full up-front checks, and `run`, which trains and
returns a :class:`StageResult` whose :class:`StageOutputs` later stages consume. Everything
that is the same for every stage (parsing a section, skipping an unchanged stage, resuming an
interrupted one, evaluating, recording) is the pipeline's, once.

Built-in and third-party stages register the same way::

    @hookimpl
    def register_stages(register):
        register(MyStage())

and a pipeline YAML lists them in ``stages:``, with a section of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

__all__ = ["Stage", "StageContext", "StageOutputs", "StageResult", "flat_metrics",
           "OUTPUT_KINDS"]

#: what a stage can consume from earlier stages and produce for later ones
OUTPUT_KINDS = ("policy", "policy_adapter", "reward_model", "samples")


@dataclass
class StageOutputs:
    """What a stage hands to later stages (each a path; None: it did not produce that)."""

    #: the model directory later stages start from (None: the stage leaves the policy as it was)
    policy: str | None = None
    #: a LoRA adapter on `policy` that the evaluation attaches (the policy is not merged)
    policy_adapter: str | None = None
    #: a reward model directory (our reward-model artifact) later stages score with
    reward_model: str | None = None
    #: every graded sample as JSON lines (prompt, completion, rewards, passed)
    samples: str | None = None
    #: whether the pipeline evaluates this stage's policy on the held-out problems
    evaluate: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The outputs as stored in a stage record: set paths only, `evaluate` when false."""
        out: dict[str, Any] = {k: getattr(self, k) for k in OUTPUT_KINDS if getattr(self, k) is not None}
        if not self.evaluate:
            out["evaluate"] = False
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageOutputs":
        """Outputs read back from a stage record (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StageResult:
    """What `Stage.run` returns: the outputs, scalar metrics, the trainer's log history, and the
    components it used (shown in the report)."""

    outputs: StageOutputs
    metrics: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What the pipeline tells a stage: its inputs from earlier stages and the shared settings."""

    #: the stage's name in the pipeline
    name: str
    #: the policy it starts from (the base model, or the last kept stage's policy)
    policy: str
    #: the reward model of an earlier stage, if one ran
    reward_model: str | None = None
    #: the graded samples of an earlier stage, if one wrote them
    samples: str | None = None
    #: the task's data files by kind (`sft`, `preference`, `preference_eval`, `rl`, `eval`, ...);
    #: a stage's `prepare` may add its own
    data: dict[str, str] = field(default_factory=dict)
    #: settings every training stage inherits unless its section sets them (template, seed,
    #: lora, quantization)
    common: dict[str, Any] = field(default_factory=dict)
    #: the reward functions the pipeline evaluates with
    reward_functions: list[str] = field(default_factory=list)
    #: the user's own section for this stage (before defaults are merged in)
    section: Mapping[str, Any] = field(default_factory=dict)
    #: the stages that run before this one, in order
    earlier: tuple[str, ...] = ()
    #: where the pipeline writes shared data (`<run>/data`)
    data_dir: Path | None = None
    #: True while the pipeline checks every section up front: inputs are placeholders
    validating: bool = False

    @property
    def seed(self) -> int:
        return int(self.common.get("seed", 0))

    @property
    def template(self) -> str | None:
        return self.common.get("template")


class Stage:
    """Base class of a pipeline stage (family ``stages``). Subclass it and set `name`,
    `description`, `settings_class` and `run`; the rest has defaults."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: inputs it reads from earlier stages and outputs it can produce (names in OUTPUT_KINDS)
    consumes: ClassVar[tuple[str, ...]] = ("policy",)
    produces: ClassVar[tuple[str, ...]] = ()

    def settings_class(self) -> type:
        """The dataclass of the stage's own fields (its YAML section)."""
        raise NotImplementedError(f"stage {self.name!r} declares no settings class")

    def config_class(self, static: bool = False) -> type | None:
        """The TRL config class whose fields the section may also set (None: no TRL fields).
        `static`: a light copy of its fields that imports nothing heavy (for the up-front check)."""
        return None

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        """The section's values before the user's section is merged in: by default the policy
        to start from (`model`)."""
        return {"model": ctx.policy}

    def prepare(self, ctx: StageContext) -> None:
        """Before the section is parsed: write data derived from earlier stages into
        `ctx.data` (placeholders while `ctx.validating`)."""

    def quick_check(self, settings: Any) -> None:
        """Checks without heavy imports (plugin names and options); raise ConfigError."""

    def check(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path) -> None:
        """The full check, after every section passed `quick_check` (may import TRL)."""

    def policy_quantization(self, settings: Any) -> tuple[str, Any] | None:
        """(section, quantization) the stage loads the incoming policy with; None: it trains
        no policy. A 4-bit load of a policy an earlier stage trained is warned about."""
        return None

    def run(self, settings: Any, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        """Train (or compute) into `output_dir` and return what later stages consume."""
        raise NotImplementedError(f"stage {self.name!r} has no run()")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars of a metrics dict, nested dicts flattened as `outer.inner` (log history dropped)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "log_history":
            continue
        if isinstance(value, Mapping):
            for k, v in flat_metrics(value).items():
                out[f"{key}.{k}"] = v
        elif isinstance(value, (int, float, str)) or value is None:
            out[key] = value
    return out
