"""Base classes for plugin components: one per family, with the optional members and safe paths.

Subclass one, decorate it with ``@dataclass(frozen=True)``, declare your options as dataclass
fields (typed, defaulted, with ``option(help=...)``) and implement the family's required
members. The base supplies:

- ``name``/``description`` (class attributes; the description defaults to the docstring);
- ``configure(**options)``: a validated copy (unknown or ill-typed options are one-line
  :class:`~rlhf_plugins.errors.ConfigError`\\ s naming the component and the option);
  ``validate_options()`` is where range checks go (raise ``ValueError`` or ``ConfigError``);
- ``options`` (the current values as a dict) and ``options_schema()`` (name/type/default/help,
  what ``rlhf-plugins components --json`` lists);
- every optional member of the family's Protocol (:mod:`rlhf_plugins.protocols`) with its
  documented default.

:class:`ChatTemplate` also supplies the segment-aware, injection-safe encoder: implement
``segments()`` and ``jinja`` and message content can never produce a control token.

Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from .advantage_types import Advantages
from .conversation import Encoded
from .data.synthetic_rows import SyntheticRows, build_rows
from .errors import ConfigError, DataError
from .messages import DEFAULT_ROLES, validate_messages
from .options import coerce, field_hints, option, options_schema
from .protocols import DEFAULTS, label_kind_names
from .rewarding import completion_text
from .segments import TEMPLATE_ROLE, Segment, encode_segments, scaffold
from .stage_api import Stage, StageContext, StageOutputs, StageResult, flat_metrics

__all__ = ["Component", "ChatTemplate", "MaskingStrategy", "RewardHead", "SelectionRule",
           "PreferenceLoss", "PreferenceObjective",
           "AdvantageEstimator", "Advantages", "RewardFunction", "PolicyLoss", "option",
           "Segment", "Encoded", "scaffold", "TEMPLATE_ROLE", "DEFAULT_ROLES", "SyntheticRows",
           "completion_text", "Stage", "StageContext", "StageOutputs", "StageResult", "flat_metrics"]


@dataclass(frozen=True)
class Component:
    """Options as dataclass fields, `configure`, `options_schema` and a description."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    family: ClassVar[str] = "component"

    def __post_init__(self) -> None:
        try:
            self.validate_options()
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self._label()}: {exc}") from None

    def _label(self) -> str:
        return f"{self.family} component {self.name or type(self).__name__!r}"

    def validate_options(self) -> None:
        """Check option values (ranges, choices); raise ValueError/ConfigError when invalid."""

    @property
    def options(self) -> dict[str, Any]:
        """The current option values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and not f.name.startswith("_")}

    @classmethod
    def options_schema(cls) -> list[dict[str, Any]]:
        """name/type/default/help of every option."""
        return options_schema(cls)

    def configure(self, **options: Any) -> Any:
        """A copy with `options` set: unknown or ill-typed ones are ConfigErrors."""
        known = list(self.options)
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{self._label()}: unknown option {key!r}{hint}; "
                                  f"options: {', '.join(known) or 'none'}")
        hints = field_hints(type(self))
        values = {key: coerce(hints.get(key, Any), value, f"{self._label()}: option {key!r}")
                  for key, value in options.items()}
        return dataclasses.replace(self, **values)

    @property
    def __name__(self) -> str:  # TRL names reward functions by __name__
        return self.name or type(self).__name__


def _eos(tokenizer: Any, template: str) -> str:
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if not isinstance(eos, str) or not eos:
        raise ConfigError(f"template {template!r} needs a tokenizer with an eos_token")
    return eos


# --- conversation formatting -------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate(Component):
    """A chat template rendered from owned segments (implement `segments` and `jinja`).

    ``encode`` tokenizes each segment on its own, so content can never merge with scaffolding
    into a control token, and every token knows its message (``roles``/``turns``).
    """

    family: ClassVar[str] = "chat_templates"
    #: the message roles this template renders
    roles: ClassVar[tuple[str, ...]] = ("system", "user", "assistant")
    #: whether `encode`/`render_text` need a tokenizer (False: the template brings its own)
    needs_tokenizer: ClassVar[bool] = True

    @property
    def jinja(self) -> str:
        """The equivalent Jinja source, saved as the tokenizer's chat_template ('' = keep it)."""
        raise NotImplementedError(f"template {self.name!r} declares no jinja source")

    def segments(self, messages: Sequence[dict], *, tokenizer: Any = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as owned segments."""
        raise NotImplementedError(f"template {self.name!r} implements no segments()")

    def validate(self, messages: Any, *, row: Any = None, for_training: bool = False) -> list[dict]:
        """Normalised messages, or DataError naming the row/message (roles limited to `roles`)."""
        return validate_messages(messages, row=row, for_training=for_training,
                                 allowed_roles=self.roles, template=self.name)

    def render_text(self, messages: Sequence[dict], *, tokenizer: Any = None,
                    add_generation_prompt: bool = False) -> str:
        """The rendered conversation text."""
        msgs = self.validate(messages)
        return "".join(s.text for s in self.segments(msgs, tokenizer=tokenizer,
                                                     add_generation_prompt=add_generation_prompt))

    def encode(self, messages: Sequence[dict], *, tokenizer: Any = None,
               add_generation_prompt: bool = False) -> Encoded:
        """Token ids with per-token roles/turns (scaffolding: "template"/-1)."""
        if tokenizer is None and self.needs_tokenizer:
            raise ConfigError(f"template {self.name!r}: encode() needs a tokenizer")
        msgs = self.validate(messages)
        segs = self.segments(msgs, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt)
        return encode_segments(segs, tokenizer, messages=msgs)

    def stop_strings(self, tokenizer: Any = None) -> list[str]:
        """Strings that end an assistant turn (default: the tokenizer's eos)."""
        return [_eos(tokenizer, self.name)]

    def stop_token_ids(self, tokenizer: Any = None) -> list[int]:
        """Token ids that end an assistant turn beyond `stop_strings` (default: none)."""
        return DEFAULTS["chat_templates"]["stop_token_ids"](self, tokenizer)

    def decode(self, ids: Sequence[int], tokenizer: Any = None) -> str:
        """Text of token ids, special tokens kept."""
        return DEFAULTS["chat_templates"]["decode"](self, ids, tokenizer)


@dataclass(frozen=True)
class MaskingStrategy(Component):
    """Chooses trained tokens: implement `mask(encoded) -> list[int]` (0/1, one per token)."""

    family: ClassVar[str] = "masking_strategies"

    def mask(self, encoded: Any) -> list[int]:
        """1 for tokens in the loss, 0 elsewhere."""
        raise NotImplementedError


# --- reward modelling ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardHead(Component):
    """A reward/value head: implement build_module, encode, collate, compute_loss, sequence_scores.

    ``label_kind`` says what rows it trains on: ``preference`` (chosen/rejected or ranked
    completions), ``outcome`` (completion + label), ``step`` (steps + per-step labels) or
    ``value`` (per-token returns); held-out metrics follow it.
    """

    family: ClassVar[str] = "reward_heads"
    label_kind: ClassVar[str] = "outcome"
    #: whether the head's module has an additive `offset` the stage may shift (normalize)
    supports_normalize: ClassVar[bool] = False
    #: whether the head has per-step outputs (`step_probabilities`/`step_predictions`)
    has_step_outputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.label_kind not in label_kind_names():
            raise TypeError(f"{cls.__name__}.label_kind must be one of {label_kind_names()}, "
                            f"got {cls.label_kind!r}")

    def encode_for_scoring(self, row: Mapping[str, Any], *, tokenizer: Any = None, template: Any = None,
                           max_length: int | None = None) -> dict[str, Any]:
        """A (prompt, completion) row -> features for `collate_for_scoring` (default: `encode`)."""
        return DEFAULTS["reward_heads"]["encode_for_scoring"](self, row, tokenizer=tokenizer,
                                                              template=template, max_length=max_length)

    def collate_for_scoring(self, features: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0,
                            padding_side: str = "right") -> dict[str, Any]:
        """Scoring features -> a batch for `sequence_scores` (default: `collate`)."""
        return DEFAULTS["reward_heads"]["collate_for_scoring"](
            self, features, pad_token_id=pad_token_id, padding_side=padding_side)

    def batch_metrics(self, head_outputs: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Per-batch metrics as ``name -> (sum, count)`` (default: none)."""
        return {}

    def synthetic_format(self) -> SyntheticRows | None:
        """Which rows of the built-in synthetic task this head trains on (default: none)."""
        return None

    def synthetic_rows(self, n: int, seed: int, split: str) -> list[dict[str, Any]]:
        """Rows of the built-in synthetic task, as `synthetic_format()` declares them (default:
        none; set a dataset)."""
        rows = self.synthetic_format()
        if rows is None:
            return DEFAULTS["reward_heads"]["synthetic_rows"](self, n, seed, split)
        return build_rows(rows, n, seed, split)


@dataclass(frozen=True)
class RewardFunction(Component):
    """A reward function with TRL's signature: implement `__call__` (None excludes a sample)."""

    family: ClassVar[str] = "reward_functions"

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        raise NotImplementedError

    def check_requirements(self) -> None:
        """Raise ConfigError when an optional package this function needs is missing (default: none)."""
        return DEFAULTS["reward_functions"]["check_requirements"](self)


# --- selection and policy optimisation ------------------------------------------------------------

@dataclass(frozen=True)
class SelectionRule(Component):
    """A rejection-sampling selection rule: implement `choose(rewards)` on clean rewards.

    `select(rewards, **options)` validates the ragged reward lists (None/NaN = unscored, never
    selected; -inf is never selected; +inf is an error), applies call-time options and returns
    sorted, de-duplicated ``(prompt, completion)`` pairs.
    """

    family: ClassVar[str] = "selection_rules"
    #: options that must be set (by configure or at call time) before `select`
    required_options: ClassVar[tuple[str, ...]] = ()

    def select(self, rewards: Sequence[Sequence[float]], **options: Any) -> list[tuple[int, int]]:
        """Selected (prompt, completion) pairs, sorted by prompt then completion."""
        rule = self.configure(**options) if options else self
        for key in rule.required_options:
            if getattr(rule, key) is None:
                raise ConfigError(f"{rule._label()}: missing required option {key!r}")
        clean = clean_rewards(self.name, rewards)
        return sorted(set(rule.choose(clean)))

    def choose(self, rewards: list[list[float]]) -> list[tuple[int, int]]:
        """Pairs to keep, from rewards with NaN for unscored entries (never select a NaN)."""
        raise NotImplementedError


def clean_rewards(rule: str, rewards: Any) -> list[list[float]]:
    """Ragged rewards as floats (None -> NaN; -inf -> NaN, never selected); DataError when malformed."""
    if isinstance(rewards, (str, bytes, Mapping)) or not hasattr(rewards, "__iter__"):
        raise DataError(f"selection rule {rule!r}: rewards must be a list of lists of numbers "
                        f"(one list per prompt), got {type(rewards).__name__}")
    out: list[list[float]] = []
    for i, row in enumerate(rewards):
        if hasattr(row, "tolist") and not isinstance(row, (list, tuple)):
            row = row.tolist()  # numpy arrays / tensors, without importing either
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise DataError(f"selection rule {rule!r}: rewards[{i}] must be a list of numbers "
                            f"(the rewards of prompt {i}), got {type(row).__name__}")
        out.append([reward_value(value, f"selection rule {rule!r}: rewards[{i}][{j}]")
                    for j, value in enumerate(row)])
    return out


def reward_value(value: Any, where: str) -> float:
    """One reward as a float for selection: None and -inf -> NaN (never selected); +inf or a
    non-number is a DataError naming `where`."""
    import numbers

    if value is None:
        return math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        if value == math.inf:
            raise DataError(f"{where} is +inf; a reward function or reward model returned an "
                            "infinite score")
        return math.nan if value == -math.inf else value
    raise DataError(f"{where} is not a number ({value!r})")


@dataclass(frozen=True)
class AdvantageEstimator(Component):
    """Turns rewards (and values) into advantages: implement `__call__` (see the Protocol)."""

    family: ClassVar[str] = "advantage_estimators"
    #: whether the trainer must supply critic values
    needs_values: ClassVar[bool] = False
    #: whether the trainer passes ``reward_components`` [B, F] and ``reward_weights`` [F]
    needs_reward_components: ClassVar[bool] = False
    #: whether the trainer passes ``baseline_rewards`` [B] (a greedy completion's reward)
    needs_greedy_baseline: ClassVar[bool] = False
    #: whether the estimator gets [B, T] token rewards as they are; False: [B] row sums
    uses_token_rewards: ClassVar[bool] = False

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95,
                 **extra: Any) -> Advantages:
        raise NotImplementedError


@dataclass(frozen=True)
class PolicyLoss:
    """What a policy loss returns: a scalar ``loss`` (differentiable in log_probs) and float metrics."""

    loss: Any
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


# --- direct alignment ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreferenceLoss:
    """What a preference loss returns: per-pair ``losses`` [B], detached ``chosen_rewards`` and
    ``rejected_rewards`` [B], and float ``metrics``."""

    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class PreferenceObjective(Component):
    """A preference loss: implement ``pair_losses(chosen, rejected, *, chosen_lengths,
    rejected_lengths)`` on the per-pair log-ratios (policy minus reference; the policy log-probs
    themselves when ``reference_free``).

    ``__call__`` checks the inputs, forms the log-ratios, and returns :class:`PreferenceLoss`
    with the rewards of :meth:`rewards` (``beta`` times the log-ratio, as TRL's DPOTrainer logs
    them) and TRL's reward metrics (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``: batch means).
    """

    family: ClassVar[str] = "preference_losses"
    #: the loss never reads reference log-probs (a stage then computes none)
    reference_free: ClassVar[bool] = False
    #: the caller must pass chosen_lengths/rejected_lengths (completion token counts)
    needs_lengths: ClassVar[bool] = False

    beta: float = option(0.1, help="temperature of the implicit reward beta * log-ratio (> 0; "
                                    "TRL's DPOConfig.beta)")

    def validate_options(self) -> None:
        """`beta` is a finite number > 0."""
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float))
                                               and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")

    def pair_losses(self, chosen: Any, rejected: Any, *, chosen_lengths: Any = None,
                    rejected_lengths: Any = None) -> Any:
        """The per-pair loss [B] from the chosen and rejected log-ratios [B]."""
        raise NotImplementedError(f"preference loss {self.name!r} implements no pair_losses()")

    def rewards(self, chosen: Any, rejected: Any, *, chosen_lengths: Any = None,
                rejected_lengths: Any = None) -> tuple[Any, Any]:
        """The detached implicit rewards of the chosen and rejected completions (beta * log-ratio)."""
        return self.beta * chosen.detach(), self.beta * rejected.detach()

    def __call__(self, chosen_logps: Any, rejected_logps: Any, ref_chosen_logps: Any = None,
                 ref_rejected_logps: Any = None, *, chosen_lengths: Any = None,
                 rejected_lengths: Any = None) -> PreferenceLoss:
        """Per-pair losses, rewards and metrics for summed completion log-probs [B]."""
        _check_pair_inputs(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           chosen_lengths, rejected_lengths)
        if self.reference_free:
            chosen, rejected = chosen_logps, rejected_logps
        else:
            chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        losses = self.pair_losses(chosen, rejected, **lengths)
        chosen_rewards, rejected_rewards = self.rewards(chosen, rejected, **lengths)
        metrics = {"rewards/chosen": chosen_rewards.mean().item(),
                   "rewards/rejected": rejected_rewards.mean().item(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, metrics)


def _check_pair_inputs(loss: PreferenceObjective, *tensors: Any) -> None:
    """ConfigError naming `loss` when a needed input is missing or the shapes are not all [B]."""
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
             "chosen_lengths", "rejected_lengths")
    needed = names[:2] + (() if loss.reference_free else names[2:4]) \
        + (names[4:] if loss.needs_lengths else ())
    given = dict(zip(names, tensors))
    missing = [n for n in needed if given[n] is None]
    if missing:
        why = "" if not set(missing) & set(names[2:4]) else " (it is not reference_free)"
        raise ConfigError(f"{loss._label()}: needs {', '.join(missing)}{why}")
    shape = getattr(given["chosen_logps"], "shape", None)
    for n in needed:
        got = getattr(given[n], "shape", None)
        if got is None or len(got) != 1 or got != shape:
            seen = tuple(got) if got is not None else type(given[n]).__name__
            raise ConfigError(f"{loss._label()}: {n} must be a tensor of shape [B] matching "
                              f"chosen_logps, got {seen}")
