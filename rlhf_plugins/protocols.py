"""The Protocol each plugin family's components satisfy, and the checks `register` runs.

A component is any object with the family's required members; the optional ones have the
documented defaults (:func:`member` applies them, :mod:`rlhf_plugins.sdk` base classes supply
them). Every component may also carry:

- ``name``: the default name it registers under (``register(..., name=...)`` overrides it;
  functions default to ``__name__``);
- ``description``: a one-line summary shown by ``rlhf-plugins components`` (defaults to the
  first line of the docstring);
- ``configure(**options)``: returns a configured copy; ``Family.get(name, **options)`` calls it.

Nothing here imports torch: annotations that mention tensors are strings.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from .stage_api import Stage as _Stage


@runtime_checkable
class ChatTemplateProtocol(Protocol):
    """Renders a conversation segment-aware (family ``chat_templates``).

    Required:

    - ``render_text(messages, *, tokenizer=None, add_generation_prompt=False) -> str``;
    - ``encode(messages, *, tokenizer=None, add_generation_prompt=False)`` -> an
      :class:`rlhf_plugins.conversation.Encoded` whose ``roles``/``turns`` say, per token, which
      message it belongs to (``"template"``/-1 for scaffolding); the end-of-turn token of a
      message belongs to that message;
    - ``jinja``: the equivalent Jinja source, saved as the tokenizer's ``chat_template``
      (``""``: keep the tokenizer's own).

    Optional (default in brackets):

    - ``validate(messages, *, row=None, for_training=False) -> list[dict]``
      [:func:`~rlhf_plugins.messages.validate_messages` limited to ``roles``];
    - ``roles``: the roles it renders [any of system/user/assistant/tool];
    - ``stop_strings(tokenizer=None) -> list[str]``: strings that end an assistant turn
      [the tokenizer's eos token];
    - ``stop_token_ids(tokenizer=None) -> list[int]``: further ids that end a turn [none];
    - ``decode(ids, tokenizer=None) -> str`` [``tokenizer.decode``, special tokens kept];
    - ``needs_tokenizer``: False when the template brings its own vocabulary [True].
    """

    jinja: str

    def render_text(self, messages: Sequence[dict], *, tokenizer: Any = None,
                    add_generation_prompt: bool = False) -> str: ...

    def encode(self, messages: Sequence[dict], *, tokenizer: Any = None,
               add_generation_prompt: bool = False) -> Any: ...


@runtime_checkable
class MaskingStrategyProtocol(Protocol):
    """Chooses which tokens of an encoded conversation are trained (family ``masking_strategies``).

    Required: ``mask(encoded) -> list[int]``, 0/1, one per ``encoded.input_ids`` token (the
    stages reject another length or other values).
    """

    def mask(self, encoded: Any) -> list[int]: ...


@runtime_checkable
class RewardHeadProtocol(Protocol):
    """A reward/value head on a causal-LM backbone (family ``reward_heads``).

    Required:

    - ``build_module(hidden_size)``: the ``torch.nn.Module`` applied to hidden states;
    - ``encode(row, *, tokenizer, template, max_length=None) -> dict``: one training row ->
      features (DataError for a bad row);
    - ``collate(rows_or_features, tokenizer=None, template=None, *, pad_token_id=0, ...)``: a
      training batch;
    - ``compute_loss(head_outputs, batch)``: the training loss;
    - ``sequence_scores(head_outputs, batch)``: one score per sequence.

    Optional (default in brackets):

    - ``label_kind``: ``preference``, ``outcome``, ``step`` or ``value`` (which rows it trains on
      and which held-out metrics apply) [``outcome``];
    - ``encode_for_scoring(row, *, tokenizer=None, template=None, max_length=None)`` [``encode``];
    - ``collate_for_scoring(features, *, pad_token_id=0, padding_side="right")`` [``collate``];
    - ``batch_metrics(head_outputs, batch) -> {name: (sum, count)}`` [none];
    - ``synthetic_rows(n, seed, split)``: rows of the built-in task [none: a dataset is needed];
    - ``supports_normalize``: its module has an additive ``offset`` [False];
    - ``has_step_outputs``: it has ``step_probabilities``/``step_predictions`` [False];
    - ``options``: a dict of its option values, recorded with the model [{}].
    """

    def build_module(self, hidden_size: int) -> Any: ...

    def encode(self, row: Any, *, tokenizer: Any, template: Any, max_length: int | None = None) -> Any: ...

    def collate(self, rows: Sequence[dict], *args: Any, **kwargs: Any) -> Any: ...

    def compute_loss(self, head_outputs: Any, batch: Any) -> Any: ...

    def sequence_scores(self, head_outputs: Any, batch: Any) -> Any: ...


@runtime_checkable
class SelectionRuleProtocol(Protocol):
    """Picks completions for rejection sampling (family ``selection_rules``).

    Required: ``select(rewards, **options)`` takes one list of rewards per prompt (None/NaN:
    unscored, never selected) and returns sorted ``(prompt_index, completion_index)`` pairs.
    """

    def select(self, rewards: Sequence[Sequence[float]], **params: Any) -> list[tuple[int, int]]: ...


@runtime_checkable
class AdvantageEstimatorProtocol(Protocol):
    """Turns rewards (and values) into advantages (family ``advantage_estimators``).

    Required: callable as ``est(rewards, *, num_generations=1, mask=None, values=None,
    gamma=1.0, lam=0.95, **extra)``, returning an object with ``.advantages`` ([B] or [B, T])
    and ``.returns`` ([B, T] or None); ``extra`` holds what the capabilities below ask for.
    The trainer checks those shapes at every call (:mod:`rlhf_plugins.advantage_contract`):
    anything else is a ComponentError naming the plugin.

    Optional (default in brackets): ``needs_values``: a critic must supply ``values`` [False];
    ``needs_reward_components``: the trainer passes ``reward_components`` ([B, F]) and
    ``reward_weights`` ([F]) [False]; ``needs_greedy_baseline``: the trainer passes
    ``baseline_rewards`` ([B], the reward of a greedy completion per prompt) [False];
    ``uses_token_rewards``: the estimator gets [B, T] token rewards (dense step rewards, KL
    shaping) as they are and credits them at their own tokens, as GAE and REINFORCE++ do; an
    estimator without it always gets [B] rewards (each row's token rewards summed over its real
    tokens) [False].
    """

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95, **extra: Any) -> Any: ...


@runtime_checkable
class RewardFunctionProtocol(Protocol):
    """A reward function with TRL's signature (family ``reward_functions``).

    Required: ``f(prompts, completions, **columns) -> list[float | None]``; ``None`` excludes a
    sample.

    Optional (default in brackets): ``check_requirements()``: raise ConfigError when something
    the function needs (an optional package) is missing; called when a config names it, before
    any model loads [nothing to check].
    """

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]: ...


@runtime_checkable
class PreferenceLossFunction(Protocol):
    """A direct-alignment (DPO-style) loss on paired completions (family ``preference_losses``).

    Required: callable as ``loss(chosen_logps, rejected_logps, ref_chosen_logps=None,
    ref_rejected_logps=None, *, chosen_lengths=None, rejected_lengths=None)`` on summed
    completion log-probs ``[B]`` (lengths: completion token counts ``[B]``) -> an object with
    ``.losses`` (the per-pair loss ``[B]``, differentiable in the policy log-probs),
    ``.chosen_rewards`` and ``.rejected_rewards`` (``[B]``, detached) and ``.metrics`` (a dict of
    floats).

    Optional (default in brackets): ``reference_free``: the loss never reads the reference
    log-probs, so a stage computes none [False]; ``needs_lengths``: the caller must pass
    ``chosen_lengths``/``rejected_lengths`` [False].
    """

    def __call__(self, chosen_logps: Any, rejected_logps: Any, ref_chosen_logps: Any = None,
                 ref_rejected_logps: Any = None, *, chosen_lengths: Any = None,
                 rejected_lengths: Any = None) -> Any: ...


@runtime_checkable
class PolicyLossFunction(Protocol):
    """A policy objective (family ``policy_losses``).

    Required: callable as ``loss(log_probs, old_log_probs, advantages, mask, *,
    ref_log_probs=None)`` -> an object with ``.loss`` (a scalar differentiable in
    ``log_probs``) and ``.metrics`` (a dict of floats).

    Optional (default in brackets): ``agg``: the aggregation mode the loss uses [None: it
    aggregates on its own]. With ``token_mean`` or ``seq_mean_token_sum_norm`` the trainer
    passes ``norm_constant=`` (TRL's token normaliser of the generation batch, or the maximum
    completion length) unless the loss's own ``norm_constant`` is set.
    """

    def __call__(self, log_probs: Any, old_log_probs: Any, advantages: Any, mask: Any, *,
                 ref_log_probs: Any = None) -> Any: ...


@runtime_checkable
class PipelineStage(Protocol):
    """A pipeline stage (family ``stages``); the SDK base is :class:`rlhf_plugins.sdk.Stage`.

    Required: ``name``, ``settings_class() -> type`` and ``run(settings, trl_kwargs,
    output_dir, ctx) -> StageResult``. Optional (defaults from ``Stage``): ``description``,
    ``consumes`` / ``produces`` (names in ``stage_api.OUTPUT_KINDS``), ``config_class(static)``,
    ``defaults(ctx)``, ``prepare(ctx)``, ``quick_check(settings)``,
    ``check(settings, trl_kwargs, output_dir)``, ``policy_quantization(settings)``.
    """

    name: str

    def settings_class(self) -> type: ...

    def run(self, settings: Any, trl_kwargs: Any, output_dir: Any, ctx: Any, **extra: Any) -> Any: ...


@dataclass(frozen=True)
class FamilySpec:
    """What `register` checks for one family: required members; optional ones have defaults."""

    name: str
    hook: str
    protocol: type
    methods: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    callable_component: bool = False
    #: optional members and their documented default values (callables get the component first)
    optional: tuple[str, ...] = ()
    #: attributes whose value must be one of the given choices
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: how messages name one component ("chat template")
    label: str = ""
    #: the script decorator registering one (`rlhf_plugins.chat_template`)
    decorator: str = ""
    #: whether the decorator instantiates a decorated class with its default options
    instantiate: bool = True


LABEL_KINDS = ("preference", "outcome", "step", "value")


def label_kind_names() -> tuple[str, ...]:
    """The label kinds a reward head may declare."""
    return LABEL_KINDS


# --- defaults of the optional members (used by `member` and by the SDK base classes) ----------

def _template_validate(component: Any, messages: Any, *, row: Any = None,
                       for_training: bool = False) -> list[dict]:
    from .messages import validate_messages

    return validate_messages(messages, row=row, for_training=for_training,
                             allowed_roles=getattr(component, "roles", None) or None,
                             template=getattr(component, "name", None))


def _template_stop_strings(component: Any, tokenizer: Any = None) -> list[str]:
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return [eos] if isinstance(eos, str) and eos else []


def _template_stop_token_ids(component: Any, tokenizer: Any = None) -> list[int]:
    return []


def _template_decode(component: Any, ids: Sequence[int], tokenizer: Any = None) -> str:
    if tokenizer is None:
        from .errors import ConfigError

        raise ConfigError(f"template {getattr(component, 'name', component)!r}: decoding needs a tokenizer")
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _head_encode_for_scoring(component: Any, row: Any, *, tokenizer: Any = None, template: Any = None,
                             max_length: int | None = None) -> Any:
    return component.encode(row, tokenizer=tokenizer, template=template, max_length=max_length)


def _head_collate_for_scoring(component: Any, features: Any, *, pad_token_id: int = 0,
                              padding_side: str = "right") -> Any:
    return component.collate(features, pad_token_id=pad_token_id)


def _head_batch_metrics(component: Any, head_outputs: Any, batch: Any) -> dict:
    return {}


def _head_synthetic_rows(component: Any, n: int, seed: int, split: str) -> list:
    from .errors import ConfigError

    raise ConfigError(f"reward head {getattr(component, 'name', component)!r} has no built-in "
                      "synthetic rows: set `dataset` (and `eval_dataset`)")


def _reward_check_requirements(component: Any) -> None:
    return None


#: family -> optional member -> default (a value, or a function taking the component first)
DEFAULTS: dict[str, dict[str, Any]] = {
    "chat_templates": {"validate": _template_validate, "stop_strings": _template_stop_strings,
                       "stop_token_ids": _template_stop_token_ids, "decode": _template_decode,
                       "needs_tokenizer": True, "roles": None},
    "masking_strategies": {},
    "reward_heads": {"encode_for_scoring": _head_encode_for_scoring,
                     "collate_for_scoring": _head_collate_for_scoring,
                     "batch_metrics": _head_batch_metrics, "synthetic_rows": _head_synthetic_rows,
                     "label_kind": "outcome", "supports_normalize": False,
                     "has_step_outputs": False, "options": {}},
    "selection_rules": {},
    "advantage_estimators": {"needs_values": False, "needs_reward_components": False,
                             "needs_greedy_baseline": False, "uses_token_rewards": False},
    "reward_functions": {"check_requirements": _reward_check_requirements},
    "preference_losses": {"reference_free": False, "needs_lengths": False},
    "policy_losses": {"agg": None},
    "stages": {"consumes": _Stage.consumes, "produces": _Stage.produces,
               **{name: getattr(_Stage, name) for name in (
                   "config_class", "defaults", "prepare", "quick_check", "check",
                   "policy_quantization")}},
}


def member(component: Any, family: str, name: str) -> Any:
    """`component.name`, or the family's documented default for that optional member."""
    value = getattr(component, name, _ABSENT)
    if value is not _ABSENT:
        return value
    try:
        default = DEFAULTS[family][name]
    except KeyError:
        raise AttributeError(f"{family} component {getattr(component, 'name', component)!r} has no "
                             f"member {name!r} and the family declares no default for it") from None
    if callable(default):
        return functools.partial(default, component)
    return default


_ABSENT = object()


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("chat_templates", "register_chat_templates", ChatTemplateProtocol,
                   methods=("render_text", "encode"), attributes=("jinja",),
                   optional=tuple(DEFAULTS["chat_templates"]),
                   label="chat template", decorator="chat_template"),
        FamilySpec("masking_strategies", "register_masking_strategies", MaskingStrategyProtocol,
                   methods=("mask",), label="masking strategy", decorator="masking_strategy"),
        FamilySpec("reward_heads", "register_reward_heads", RewardHeadProtocol,
                   methods=("build_module", "encode", "collate", "compute_loss", "sequence_scores"),
                   optional=tuple(DEFAULTS["reward_heads"]),
                   choices=(("label_kind", LABEL_KINDS),),
                   label="reward head", decorator="reward_head"),
        FamilySpec("selection_rules", "register_selection_rules", SelectionRuleProtocol,
                   methods=("select",), label="selection rule", decorator="selection_rule"),
        FamilySpec("advantage_estimators", "register_advantage_estimators",
                   AdvantageEstimatorProtocol, callable_component=True,
                   optional=tuple(DEFAULTS["advantage_estimators"]),
                   label="advantage estimator", decorator="advantage_estimator"),
        FamilySpec("reward_functions", "register_reward_functions", RewardFunctionProtocol,
                   callable_component=True, label="reward function", decorator="reward_function",
                   instantiate=False),
        FamilySpec("preference_losses", "register_preference_losses", PreferenceLossFunction,
                   callable_component=True, optional=tuple(DEFAULTS["preference_losses"]),
                   label="preference loss", decorator="preference_loss"),
        FamilySpec("policy_losses", "register_policy_losses", PolicyLossFunction,
                   callable_component=True, label="policy loss", decorator="policy_loss",
                   instantiate=False),
        FamilySpec("stages", "register_stages", PipelineStage,
                   methods=("settings_class", "run"), attributes=("name",),
                   optional=tuple(DEFAULTS["stages"]), label="stage", decorator="stage"),
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
        try:
            present = hasattr(component, attribute)
        except Exception:  # noqa: BLE001 - a property that raises counts as missing
            present = False
        if not present:
            missing.append(f"attribute {attribute!r}")
    for attribute, allowed in spec.choices:
        value = member(component, spec.name, attribute)
        if value not in allowed:
            missing.append(f"{attribute} in {allowed} (got {value!r})")
    return missing
