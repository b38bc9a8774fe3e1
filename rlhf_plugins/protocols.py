"""The Protocol each plugin family's components satisfy, and the checks `register` runs.

A component is any object with the family's methods. Every component may also carry:

- ``name``: the default name it registers under (``register(..., name=...)`` overrides it;
  functions default to ``__name__``);
- ``description``: a one-line summary shown by ``rlhf-plugins components`` (defaults to the
  first line of the docstring);
- ``configure(**options)``: returns a configured copy; ``Family.get(name, **options)`` calls it.

Nothing here imports torch: annotations that mention tensors are strings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class ChatTemplate(Protocol):
    """Renders a conversation segment-aware (family ``chat_templates``).

    ``encode`` returns an :class:`rlhf_plugins.conversation.Encoded` whose ``roles``/``turns``
    say, per token, which message it belongs to (``"template"``/-1 for scaffolding); the
    end-of-turn token of a message belongs to that message. ``jinja`` is the equivalent Jinja
    source, saved as the tokenizer's ``chat_template``.
    """

    jinja: str

    def render_text(self, messages: Sequence[dict], *, tokenizer: Any = None,
                    add_generation_prompt: bool = False) -> str: ...

    def encode(self, messages: Sequence[dict], *, tokenizer: Any = None,
               add_generation_prompt: bool = False) -> Any: ...


@runtime_checkable
class MaskingStrategy(Protocol):
    """Chooses which tokens of an encoded conversation are trained (family ``masking_strategies``).

    ``mask(encoded)`` returns a list of 0/1 of the same length as ``encoded.input_ids``.
    """

    def mask(self, encoded: Any) -> list[int]: ...


@runtime_checkable
class RewardHead(Protocol):
    """A reward/value head on a causal-LM backbone (family ``reward_heads``).

    ``build_module(hidden_size)`` makes the ``torch.nn.Module`` applied to hidden states;
    ``collate(rows, tokenizer, template)`` turns data rows into a training batch;
    ``compute_loss(head_outputs, batch)`` is the training loss;
    ``sequence_scores(head_outputs, batch)`` turns outputs into one score per sequence.
    """

    def build_module(self, hidden_size: int) -> Any: ...

    def collate(self, rows: Sequence[dict], *args: Any, **kwargs: Any) -> Any: ...

    def compute_loss(self, head_outputs: Any, batch: Any) -> Any: ...

    def sequence_scores(self, head_outputs: Any, batch: Any) -> Any: ...


@runtime_checkable
class SelectionRule(Protocol):
    """Picks completions for rejection sampling (family ``selection_rules``).

    ``select(rewards, **params)`` takes one list of rewards per prompt and returns sorted
    ``(prompt_index, completion_index)`` pairs.
    """

    def select(self, rewards: Sequence[Sequence[float]], **params: Any) -> list[tuple[int, int]]: ...


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns rewards (and values) into advantages (family ``advantage_estimators``).

    ``est(rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95)``
    returns an object with ``.advantages`` ([B] or [B, T]) and ``.returns`` ([B, T] or None).
    ``needs_values`` says whether a critic must supply ``values``.
    """

    needs_values: bool

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Any: ...


@runtime_checkable
class RewardFunction(Protocol):
    """A reward function with TRL's signature (family ``reward_functions``).

    ``f(prompts, completions, **columns) -> list[float | None]``; ``None`` excludes a sample.
    """

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]: ...


@dataclass(frozen=True)
class FamilySpec:
    """What `register` checks for one family: required methods and attributes."""

    name: str
    hook: str
    protocol: type
    methods: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    callable_component: bool = False


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("chat_templates", "register_chat_templates", ChatTemplate,
                   methods=("render_text", "encode"), attributes=("jinja",)),
        FamilySpec("masking_strategies", "register_masking_strategies", MaskingStrategy,
                   methods=("mask",)),
        FamilySpec("reward_heads", "register_reward_heads", RewardHead,
                   methods=("build_module", "collate", "compute_loss", "sequence_scores")),
        FamilySpec("selection_rules", "register_selection_rules", SelectionRule,
                   methods=("select",)),
        FamilySpec("advantage_estimators", "register_advantage_estimators", AdvantageEstimator,
                   attributes=("needs_values",), callable_component=True),
        FamilySpec("reward_functions", "register_reward_functions", RewardFunction,
                   callable_component=True),
    )
}


def missing_members(component: Any, spec: FamilySpec) -> list[str]:
    """Names of what `component` lacks to satisfy `spec` (empty when it conforms)."""
    missing: list[str] = []
    if spec.callable_component and not callable(component):
        missing.append("__call__ (the component must be callable)")
    for method in spec.methods:
        if not callable(getattr(component, method, None)):
            missing.append(f"{method}()")
    for attribute in spec.attributes:
        if not hasattr(component, attribute):
            missing.append(f"attribute {attribute!r}")
    return missing
