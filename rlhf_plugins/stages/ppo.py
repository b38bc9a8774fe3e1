"""Policy optimisation (PPO with a critic, GRPO, RLOO, ...) on one base model through TRL.

`run_ppo(settings, trl_kwargs, output_dir)` wires :class:`PolicyOptimizationTrainer` (a thin
subclass of TRL's GRPOTrainer, see ``ppo_trainer.py``):

- the advantage estimator is looked up by name in ``registry().advantage_estimators``;
- rewards are registered reward functions (family ``reward_functions``) with weights and/or a
  trained reward adapter + head (``reward_adapter``) attached to the *same* base as a second
  LoRA adapter;
- QLoRA single base: the base is loaded once (4-bit NF4 with ``quantization``), the policy is a
  LoRA adapter, the reference is the adapter-disabled base, the critic is a value head on the
  policy's last hidden state and the reward model is another adapter + head. No second copy of
  the base weights exists. Without ``lora`` the policy is the full model (and TRL builds a
  reference copy when ``beta > 0``).

Every configuration error (unknown estimator or reward names, an estimator needing values
without a critic, batch sizes that do not hold whole prompt groups, ...) is raised by
:func:`check_ppo_config` before any model is loaded.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, DataError
from ..models import LoraSettings, QuantSettings, resolve_adapter_settings
from .resume import check_run_config
from .skeleton import (SYNTHETIC, build_trl_config, finish_stage, keep_float32_adapter_on_cpu,
                       load_dataset_source, load_trainable_model, resume_checkpoint,
                       stage_config)

logger = logging.getLogger(__name__)

METRICS_FILE = "ppo_metrics.json"
#: how a PRM reward model's step outputs become the PPO reward (see PPOSettings.prm_reward)
PRM_REWARDS = ("probability", "sign", "score")
#: TRL fields replaced by our settings
_REJECTED_TRL_FIELDS = {
    "reward_weights": "give weights in `reward_functions` ({name: ..., weight: ...})",
    "scale_rewards": "the advantage estimator decides (e.g. estimator_options: {scale: batch} "
                     "for grpo, or advantage_estimator: dr_grpo for no scaling)",
    "multi_objective_aggregation": "rewards are summed with their weights, then the "
                                   "advantage estimator normalises",
}


@dataclass
class PPOSettings:
    """Our part of a PPO/GRPO config (the rest are TRL `GRPOConfig` fields, e.g. `beta`)."""

    #: HF model directory, hub id, .gguf file, saved LoRA adapter, or None for the embedded SmolLM2
    model: str | None = None
    #: "synthetic" (the verifiable arithmetic task), a JSONL/JSON file or a saved HF dataset
    #: with a `prompt` column (string or message list) plus the columns reward functions read
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    dataset_config: str | None = None
    num_examples: int | None = None
    dataset_seed: int = 0
    #: held-out prompts for TRL's evaluation; 0 disables it unless `eval_split`/`eval_dataset`
    #: is set. They never overlap the training prompts: the synthetic task's "test" split,
    #: `eval_split` of `eval_dataset` (default: `dataset`), or else `eval_examples` rows carved
    #: from the training data (seeded by `dataset_seed`) and removed from training
    eval_examples: int = 0
    #: the split (of `eval_dataset`, default `dataset`) evaluated on; None: see `eval_examples`
    eval_split: str | None = None
    #: where held-out prompts come from (same forms as `dataset`); None: `dataset`
    eval_dataset: str | None = None
    #: evaluate before training too (metrics `eval_reward_before`)
    eval_before: bool = True
    #: chat template plugin whose Jinja becomes the tokenizer's chat_template (None: keep it)
    template: str | None = "chatml"
    #: registered reward function names or {name, weight, **options}
    reward_functions: list[Any] = field(default_factory=list)
    #: a saved reward adapter + head (the reward-model stage's output) on the same base
    reward_adapter: str | None = None
    reward_adapter_weight: float = 1.0
    #: a reward model directory (`rlhf-plugins rm` output or any transformers sequence-classification
    #: RM): attached to the policy's base when it is an adapter on that base with the same
    #: quantization, else loaded as a separate model (as it was trained)
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    #: registered advantage estimator (gae, grpo, dr_grpo, rloo, reinforce, ...)
    advantage_estimator: str = "gae"
    estimator_options: dict[str, Any] = field(default_factory=dict)
    gamma: float = 1.0
    lam: float = 0.95
    #: "value_head" (shared backbone) or "none"; only estimators with needs_values use it
    critic: str = "value_head"
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    #: where the KL to the reference goes: "loss" (TRL's k3, weight beta) or "reward" (per token)
    kl_penalty: str = "loss"
    kl_estimator: str = "k1"
    #: adaptive KL controller: target KL (nats per sequence) and horizon (samples); None = fixed
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    whiten_advantages: bool = False
    #: registered policy loss (ppo_clip, gspo, cispo, ...) replacing TRL's surrogate; None = TRL's
    policy_loss: str | None = None
    policy_loss_options: dict[str, Any] = field(default_factory=dict)
    #: selection rule dropping whole groups from the update (DAPO dynamic sampling: nonzero_variance)
    group_filter: str | None = None
    group_filter_options: dict[str, Any] = field(default_factory=dict)
    #: over-generate to refill dropped groups: not supported on GRPOTrainer (must stay false)
    group_filter_refill: bool = False
    #: a PRM reward model's reward: per-step P(correct) ("probability"), +1/0/-1 by the arg-max
    #: class ("sign"), both as step rewards at the step ends; or its aggregated score ("score")
    prm_reward: str = "probability"
    lora: LoraSettings | None = None
    peft: LoraSettings | None = None
    quantization: QuantSettings | None = None
    resume: bool = True

    def __post_init__(self) -> None:

        self.lora, self.quantization = resolve_adapter_settings(self.lora, self.peft,
                                                                self.quantization)
        self.peft = None
        if self.reward_adapter is not None and self.lora is None:
            raise ConfigError("reward_adapter: attaching a reward adapter to the policy's base needs "
                              "a LoRA policy (`lora`)")
        if isinstance(self.reward_functions, (str, Mapping)):
            self.reward_functions = [self.reward_functions]
        if not isinstance(self.reward_functions, (list, tuple)):
            raise ConfigError(f"reward_functions: expected a list, got {self.reward_functions!r}")
        self.reward_functions = list(self.reward_functions)
        if not self.reward_functions and self.reward_adapter is None and self.reward_model is None:
            raise ConfigError("reward_functions: give at least one reward function (e.g. "
                              "exact_answer), a reward_model or a reward_adapter")
        if self.reward_adapter is not None and self.reward_model is not None:
            raise ConfigError("reward_model: give either `reward_model` or `reward_adapter`, not both")
        for name in ("estimator_options", "policy_loss_options", "group_filter_options"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        for name in ("policy_loss", "group_filter"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name}: expected a registered name or null, got {value!r}")
        if self.prm_reward not in PRM_REWARDS:
            raise ConfigError(f"prm_reward: expected one of {', '.join(PRM_REWARDS)}, got "
                              f"{self.prm_reward!r}")
        for name in ("dataset", "advantage_estimator", "dataset_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
        for name in ("eval_split", "eval_dataset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
        for name in ("num_examples",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.eval_examples, int) or isinstance(self.eval_examples, bool) \
                or self.eval_examples < 0:
            raise ConfigError(f"eval_examples: expected an integer >= 0, got {self.eval_examples!r}")
        for name in ("reward_adapter_weight", "reward_model_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ConfigError(f"{name}: expected a finite number, got {w!r}")


@dataclass
class PPOResult:
    """What `run_ppo` produced."""

    output_dir: Path
    metrics: dict[str, Any]
    adapter: bool


@dataclass
class CheckedPPO:
    """The components and TRL config a PPO run uses, resolved before any model loads."""

    estimator: Any
    reward_funcs: list[Any]
    reward_weights: list[float]
    args: Any  # trl.GRPOConfig
    policy_loss: Any = None
    group_filter: Any = None


# --------------------------------------------------------------------------------------------
# Validation (no model loading)
# --------------------------------------------------------------------------------------------

def build_grpo_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike,
                      reward_weights: Sequence[float] | None = None) -> Any:
    """TRL's `GRPOConfig` from the YAML's TRL fields (CPU-friendly defaults; ConfigError on bad values)."""
    from trl import GRPOConfig

    extra = {} if reward_weights is None else {"reward_weights": list(reward_weights)}
    return build_trl_config(GRPOConfig, trl_kwargs, output_dir, label="GRPO",
                            rejected=_REJECTED_TRL_FIELDS, reject=lambda value: True, **extra)


def check_ppo_config(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                     output_dir: str | os.PathLike) -> CheckedPPO:
    """Resolve the estimator and reward functions and build the TRL config; all errors, no models."""
    from ..rewarding import resolve_reward_functions
    from .ppo_trainer import (check_estimator_args, check_group_filter_refill, check_policy_loss_args,
                              check_trainer_options, resolve_estimator, resolve_group_filter,
                              resolve_policy_loss)

    estimator = resolve_estimator(settings.advantage_estimator, settings.estimator_options)
    policy_loss = resolve_policy_loss(settings.policy_loss, settings.policy_loss_options)
    group_filter = resolve_group_filter(settings.group_filter, settings.group_filter_options)
    check_group_filter_refill(settings.group_filter_refill)
    check_trainer_options(estimator, critic=settings.critic, kl_penalty=settings.kl_penalty,
                          kl_estimator=settings.kl_estimator, vf_coef=settings.vf_coef,
                          value_clip=settings.value_clip, gamma=settings.gamma, lam=settings.lam)
    funcs, weights = resolve_reward_functions(settings.reward_functions) if settings.reward_functions \
        else ([], [])
    if settings.reward_adapter is not None:
        from .reward_model import read_meta

        directory = Path(settings.reward_adapter)
        if not directory.is_dir():
            raise ConfigError(f"reward_adapter: {directory}: no such directory")
        meta = read_meta(directory)  # ConfigError when it is not a reward-model artifact
        if not meta.get("adapter"):
            raise ConfigError(f"reward_adapter: {directory} is a full reward model, not an adapter")
        weights = weights + [float(settings.reward_adapter_weight)]
    if settings.reward_model is not None:
        from .reward_export import check_reward_model_dir

        check_reward_model_dir(settings.reward_model)
        weights = weights + [float(settings.reward_model_weight)]
    args = build_grpo_config(trl_kwargs or {}, output_dir, weights)
    if settings.kl_target is not None:
        from .kl import make_kl_controller

        make_kl_controller(float(args.beta), settings.kl_target, settings.kl_horizon)
    if policy_loss is not None:
        check_policy_loss_args(args)
    check_estimator_args(estimator, args)
    return CheckedPPO(estimator, list(funcs), list(weights), args, policy_loss, group_filter)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_prompt_rows(settings: PPOSettings, split: str | None = None, n: int | None = None,
                     dataset: str | None = None) -> tuple[Any, str]:
    """The prompt dataset (an HF Dataset with a `prompt` column) and a label naming its source."""
    split = split or settings.dataset_split
    dataset = dataset or settings.dataset
    if dataset == SYNTHETIC:
        from ..data import synth

        count = n or settings.num_examples or 256
        return synth.rl_dataset(count, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    rows, source = load_dataset_source(dataset, split=split, config=settings.dataset_config,
                                       num_examples=n or settings.num_examples)
    if "prompt" not in rows.column_names:
        raise DataError(f"{source}: rows need a `prompt` column (a string or a list of messages)")
    check_prompt_column(rows["prompt"], source)
    return rows, source


def check_prompt_column(prompts: Sequence[Any], source: str) -> None:
    """DataError naming the 1-based row of a prompt that is neither a non-empty string nor a valid
    message list (known roles, not ending with an assistant turn), or whose form differs from the
    first row's (TRL treats the whole dataset as conversational or not from one row)."""
    from ..conversation import validate_messages
    from ..guard import row_number

    first: str | None = None
    for i, prompt in enumerate(prompts):
        row = row_number(source, i)
        if isinstance(prompt, str):
            kind = "a string"
            if not prompt.strip():
                raise DataError(f"{source}: row {row}: prompt: empty string")
        elif isinstance(prompt, (list, tuple)):
            kind = "a list of messages"
            try:
                messages = validate_messages(list(prompt), row=row)
            except DataError as exc:
                raise DataError(f"{source}: {exc}") from None
            if messages[-1]["role"] == "assistant":
                raise DataError(f"{source}: row {row}: prompt: ends with an assistant message")
        else:
            raise DataError(f"{source}: row {row}: prompt: expected a string or a list of messages, "
                            f"got {type(prompt).__name__}")
        if first is None:
            first = kind
        elif kind != first:
            raise DataError(f"{source}: row {row}: prompt is {kind} but row "
                            f"{row_number(source, 0)} holds {first}; use one form for every row")


def check_prompt_tokens(prompts: Sequence[Any], tokenizer: Any, template: Any, source: str) -> None:
    """DataError naming the row of a prompt whose content spells one of the tokenizer's special
    tokens (TRL renders prompts as text and parses special tokens in it, so the content would
    become that control token) or a turn marker the template rejects (a forged turn)."""
    from ..guard import guarded, located, row_number

    added = sorted(getattr(tokenizer, "added_tokens_encoder", None) or {}, key=len, reverse=True)
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        place = f"{source}: row {row_number(source, i)}"
        for j, message in enumerate(messages):
            content = message.get("content")
            hit = next((t for t in added if isinstance(content, str) and t in content), None)
            if hit is not None:
                raise DataError(f"{place}, message {j}: content contains {hit!r}, a special token "
                                "of the tokenizer; the prompt is rendered as text, so it would "
                                "become that control token: remove it from the data")
        if template is not None and not isinstance(prompt, str):
            try:
                with guarded(template, "chat_templates", "encode()"):
                    template.encode(messages, tokenizer=tokenizer, add_generation_prompt=True)
            except DataError as exc:
                raise located(exc, place) from None


def _prompt_key(prompt: Any) -> str:
    import json

    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return json.dumps(prompt, sort_keys=True, default=str)


def held_out_prompts(settings: PPOSettings, train: Any) -> tuple[Any, Any]:
    """(training rows, held-out rows or None): the eval rows never hold a training prompt.

    Synthetic data evaluates on its "test" split; `eval_split` / `eval_dataset` name the eval
    rows; otherwise `eval_examples` rows are carved from `train` (seeded) and removed from it.
    Eval rows whose prompt is also a training prompt are dropped (logged).
    """
    n = settings.eval_examples or None
    named = settings.eval_split is not None or settings.eval_dataset is not None
    if n is None and not named:
        return train, None
    source = settings.eval_dataset or settings.dataset
    if named or source == SYNTHETIC:
        split = settings.eval_split or ("test" if source == SYNTHETIC else settings.dataset_split)
        if source == settings.dataset and split == settings.dataset_split and source != SYNTHETIC:
            raise ConfigError(f"eval_split: {split!r} is the training split; name another split "
                              "(or leave eval_split unset to carve eval_examples rows out of it)")
        held, _ = load_prompt_rows(settings, split=split, n=n, dataset=source)
    else:
        if n >= len(train):
            raise ConfigError(f"eval_examples: {n} held-out prompts would leave none of the "
                              f"{len(train)} training prompts")
        parts = train.train_test_split(test_size=n, seed=settings.dataset_seed, shuffle=True)
        train, held = parts["train"], parts["test"]
    seen = {_prompt_key(p) for p in train["prompt"]}
    keep = [i for i, p in enumerate(held["prompt"]) if _prompt_key(p) not in seen]
    if len(keep) < len(held):
        logger.warning("held-out prompts: dropped %d that are also training prompts",
                       len(held) - len(keep))
        held = held.select(keep)
    if len(held) == 0:
        raise DataError("held-out prompts: none left that is not a training prompt")
    return train, held


# --------------------------------------------------------------------------------------------
# Models and trainer
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedPPO:
    """Everything `run_ppo` trains with (exposed for tests, benchmarks and custom scripts)."""

    trainer: Any
    tokenizer: Any
    model_path: str
    train_dataset: Any
    eval_dataset: Any
    source: str
    reward_scorer: Any = None


def reward_adapter_function(scorer: Any, tokenizer: Any = None, template: Any = None,
                            name: str = "reward_adapter") -> Any:
    """A TRL-style reward function scoring with a reward model (attached adapter or separate).

    The one scorer `sample` and `best-of-n` use too (:func:`~.reward_scoring.reward_model_function`);
    the shared model's train/eval mode and active adapter are restored after each call, and an
    empty completion is unscored (None).
    """
    from .reward_scoring import reward_model_function

    if tokenizer is not None:
        scorer.tokenizer = tokenizer
    if template is not None:
        scorer.template = template
    return reward_model_function(scorer, name=name)


def prm_reward_function(scorer: Any, mode: str = "probability", tokenizer: Any = None,
                        template: Any = None, name: str = "reward_adapter",
                        batch_size: int = 16) -> Any:
    """A TRL-style reward function giving a PRM's **step rewards** for each completion.

    The completion is split into steps on the head's ``delimiter`` (as the PRM was trained);
    each step's reward sits at its end offset: P(correct) (``mode="probability"``) or +1/0/-1
    by the arg-max class (``mode="sign"``). A completion with no non-blank step is unscored.
    """
    from ..rewarding import completion_text
    from ..step_rewards import PRM_MODES, prm_step_rewards, step_end_offsets
    from .reward_scoring import step_outputs

    if mode not in PRM_MODES:
        raise ConfigError(f"prm_reward: expected one of {', '.join(PRM_MODES)}, got {mode!r}")
    if tokenizer is not None:
        scorer.tokenizer = tokenizer
    if template is not None:
        scorer.template = template
    delimiter = getattr(scorer.head, "delimiter", "\n\n")
    backbone = getattr(scorer, "backbone", scorer)

    def prm_reward(prompts: list, completions: list, **_: Any) -> list[Any]:
        texts = [completion_text(c) for c in completions]
        ends = [step_end_offsets(t, delimiter) for t in texts]
        keep = [i for i, e in enumerate(ends) if e]
        out: list[Any] = [None] * len(texts)
        if not keep:
            return out
        was_training = backbone.training
        try:
            rows = [{"prompt": prompts[i], "completion": texts[i]} for i in keep]
            results = step_outputs(scorer, rows, batch_size=batch_size)
        finally:
            backbone.train(was_training)
        if mode == "probability":
            probs = [r["p_correct"] for r in results]
        else:  # one-hot of the predicted class (labels -1/0/+1 -> classes 0/1/2)
            probs = [[[float(c == label + 1) for c in range(3)] for label in r["predicted"]]
                     for r in results]
        for i, steps in zip(keep, prm_step_rewards(probs, [ends[i] for i in keep], mode)):
            out[i] = steps
        return out

    prm_reward.__name__ = prm_reward.__qualname__ = name
    return prm_reward


def _scorer_function(scorer: Any, settings: PPOSettings, name: str, tokenizer: Any = None,
                     template: Any = None) -> Any:
    """The reward function of a reward-model scorer: step rewards for a PRM (``prm_reward``)."""
    from ..protocols import member

    head = scorer.head
    if settings.prm_reward != "score" and member(head, "reward_heads", "label_kind") == "step" \
            and member(head, "reward_heads", "has_step_outputs"):
        return prm_reward_function(scorer, settings.prm_reward, tokenizer, template, name=name)
    return reward_adapter_function(scorer, tokenizer, template, name=name)


def _same_base(meta: Mapping[str, Any], model_path: str) -> bool:
    from ..models import base_model_of, resolve_model

    base = meta.get("base_model")
    if not base:
        return False
    try:
        return Path(resolve_model(base)).resolve() == Path(base_model_of(model_path)).resolve()
    except Exception:  # noqa: BLE001 - an unresolvable reference is simply not the same base
        return False


def load_reward_scorer(settings: PPOSettings, policy: Any, model_path: str) -> tuple[Any, bool]:
    """The `reward_model` scorer and whether it shares the policy's base.

    A reward adapter trained on the policy's base with the policy's quantization is attached
    to the policy (a second adapter, no second base); anything else (another base, another
    quantization, a full or transformers reward model) loads as a separate model, as trained.
    """
    from .reward_export import quant_settings
    from .reward_model import META_FILE, attach_reward_adapter, load_reward_model, read_meta

    directory = Path(settings.reward_model)
    meta = read_meta(directory) if (directory / META_FILE).is_file() else {}
    if meta.get("adapter") and hasattr(policy, "peft_config") and _same_base(meta, model_path) \
            and quant_settings(meta.get("quantization")) == settings.quantization:
        return attach_reward_adapter(policy, directory, "reward"), True
    if meta.get("adapter"):
        logger.info("reward_model %s: trained on %s (quantization %s); loading it as a separate "
                    "model, as it was trained", directory, meta.get("base_model"),
                    meta.get("quantization"))
    scorer = load_reward_model(directory)
    import torch

    from ..models import is_quantized

    if torch.cuda.is_available() and not is_quantized(scorer.backbone):
        scorer = scorer.to("cuda")
    for p in scorer.parameters():
        p.requires_grad_(False)
    return scorer, False


def load_policy(model_path: str, settings: PPOSettings, gradient_checkpointing: bool = False) -> Any:
    """The policy: the base (4-bit or not) loaded once, with a fresh LoRA adapter when `lora` is set."""
    return load_trainable_model(model_path, settings.lora, settings.quantization,
                                gradient_checkpointing=gradient_checkpointing)


def prepare_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike, *, checked: CheckedPPO | None = None,
                train_dataset: Any = None, eval_dataset: Any = None) -> PreparedPPO:
    """Validate (before loading anything), load the base once, attach adapters/heads, build the trainer."""
    from .. import registry
    from ..models import load_tokenizer, resolve_model
    from .ppo_trainer import PolicyOptimizationTrainer

    checked = checked or check_ppo_config(settings, trl_kwargs, output_dir)
    args = checked.args
    template = registry().chat_templates.get(settings.template) if settings.template else None
    if train_dataset is None:
        train_dataset, source = load_prompt_rows(settings)
        if eval_dataset is None:
            train_dataset, eval_dataset = held_out_prompts(settings, train_dataset)
    else:
        source = "given dataset"
    if eval_dataset is not None and args.eval_strategy == "no":
        args.do_eval = True

    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    for rows, label in ((train_dataset, source), (eval_dataset, f"{source} (eval)")):
        if rows is not None and "prompt" in getattr(rows, "column_names", ()):
            check_prompt_tokens(rows["prompt"], tokenizer, template, label)  # before the model loads
    if template is not None:
        tokenizer.chat_template = template.jinja
    policy = load_policy(model_path, settings, bool(args.gradient_checkpointing))

    funcs = list(checked.reward_funcs)
    scorer = None
    if settings.reward_adapter is not None:
        from .reward_model import attach_reward_adapter

        from .reward_export import quant_settings
        from .reward_model import read_meta

        recorded = quant_settings(read_meta(settings.reward_adapter).get("quantization"))
        if recorded != settings.quantization:
            logger.warning("reward_adapter %s was trained with quantization %s but is attached to "
                           "a base loaded with %s: its scores differ from training (use "
                           "`reward_model` to load it as trained)", settings.reward_adapter,
                           recorded, settings.quantization)
        scorer = attach_reward_adapter(policy, settings.reward_adapter, "reward", tokenizer=None)
        funcs.append(_scorer_function(scorer, settings, "reward_adapter",
                                      scorer.tokenizer or tokenizer, scorer.template))
    if settings.reward_model is not None:
        scorer, _ = load_reward_scorer(settings, policy, model_path)
        funcs.append(_scorer_function(scorer, settings, "reward_model"))
    trainer = PolicyOptimizationTrainer(
        policy, funcs, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, advantage_estimator=checked.estimator, gamma=settings.gamma,
        lam=settings.lam, critic=settings.critic, vf_coef=settings.vf_coef,
        value_clip=settings.value_clip, kl_penalty=settings.kl_penalty,
        kl_estimator=settings.kl_estimator, kl_target=settings.kl_target,
        kl_horizon=settings.kl_horizon, whiten_advantages=settings.whiten_advantages,
        policy_loss=checked.policy_loss, group_filter=checked.group_filter,
        group_filter_refill=settings.group_filter_refill)
    keep_float32_adapter_on_cpu(trainer.model, settings.quantization)
    return PreparedPPO(trainer, tokenizer, model_path, train_dataset, eval_dataset, source, scorer)


def run_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/ppo") -> PPOResult:
    """Train the policy with the configured estimator; save adapter/model, value head, metrics."""
    out = Path(output_dir)
    started = time.time()
    prepared = prepare_ppo(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_prompts": len(prepared.train_dataset),
                               "eval_prompts": 0 if prepared.eval_dataset is None
                               else len(prepared.eval_dataset),
                               "advantage_estimator": settings.advantage_estimator,
                               "policy_loss": settings.policy_loss or f"trl:{trainer.loss_type}",
                               "policy_loss_options": dict(settings.policy_loss_options),
                               "group_filter": settings.group_filter}
    check_run_config(out, "ppo", settings, trl_kwargs)  # another config's checkpoints: start clean
    resume = resume_checkpoint(out, settings.resume, "PPO")
    if prepared.eval_dataset is not None and settings.eval_before and resume is None:
        before = trainer.evaluate()
        metrics["eval_reward_before"] = before.get("eval_reward")
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics.update(train_output.metrics)
    metrics["global_step"] = train_output.global_step
    if prepared.eval_dataset is not None:
        after = trainer.evaluate()
        metrics["eval_reward"] = after.get("eval_reward")
    trainer.save_model(str(out))
    prepared.tokenizer.save_pretrained(str(out))
    metrics["kl_coef_final"] = float(trainer.kl_controller.value)
    adapter = settings.lora is not None or hasattr(trainer.model, "peft_config")
    finish_stage(trainer, out, metrics, metrics_file=METRICS_FILE, started=started, stage="ppo",
                 settings=settings, base_model=prepared.model_path, adapter=adapter,
                 value_head=trainer.value_head is not None, dataset=prepared.source)
    return PPOResult(out, metrics, adapter)


def ppo_from_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None) -> PPOResult:
    """Run PPO from a YAML path or mapping (the Python twin of `rlhf-plugins ppo --config`)."""
    settings, trl_kwargs, out = load_ppo_config(source, output_dir, overrides)
    return run_ppo(settings, trl_kwargs, out)


def load_ppo_config(source: str | os.PathLike | Mapping[str, Any],
                    output_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] | None = None,
                    ) -> tuple[PPOSettings, dict[str, Any], str | os.PathLike]:
    """Parse a PPO config into (settings, TRL GRPOConfig kwargs, output_dir)."""
    from trl import GRPOConfig

    return stage_config(source, overrides, output_dir, PPOSettings, GRPOConfig)


__all__ = ["PPOSettings", "PPOResult", "PreparedPPO", "CheckedPPO", "build_grpo_config",
           "check_ppo_config", "held_out_prompts", "load_policy", "load_ppo_config", "load_prompt_rows",
           "load_reward_scorer", "ppo_from_config", "prepare_ppo", "prm_reward_function",
           "reward_adapter_function", "run_ppo", "PRM_REWARDS"]


def __getattr__(name: str) -> Any:  # lazy re-exports of the trainer pieces (they import TRL)
    if name in ("PolicyOptimizationTrainer", "validated_reward_function", "resolve_estimator"):
        from . import ppo_trainer

        return getattr(ppo_trainer, name)
    if name in ("AdaptiveKLController", "FixedKLController", "make_kl_controller"):
        from . import kl

        return getattr(kl, name)
    if name == "ValueHead":
        from .value_head import ValueHead

        return ValueHead
    raise AttributeError(name)
