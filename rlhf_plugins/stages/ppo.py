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

from ..config import check_strings
from ..errors import ConfigError
from ..models import LoraSettings, QuantSettings, resolve_adapter_settings
from .ppo_prompts import check_prompt_tokens, held_out_prompts, load_prompt_rows
from .ppo_rewards import (load_reward_scorer, prm_reward_function, reward_adapter_function,  # noqa: F401
                          scorer_function)
from .resume import check_run_config, output_state
from .skeleton import (SYNTHETIC, build_trl_config, finish_stage, finished_stage,
                       keep_float32_adapter_on_cpu, load_trainable_model, resume_checkpoint,
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
    #: replace what the output directory holds (files of another program, a finished run)
    overwrite: bool = False

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
        check_strings(self, ("dataset", "advantage_estimator", "dataset_split"),
                      ("eval_split", "eval_dataset"))
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
    #: the output already held a finished run of this config: nothing was trained
    up_to_date: bool = False


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
                      reward_weights: Sequence[float] | None = None, **options: Any) -> Any:
    """A `PolicyOptimizationConfig` (TRL's `GRPOConfig` + our `options`: estimator, critic, KL,
    policy loss, group filter) from the YAML's TRL fields (CPU-friendly defaults; ConfigError on
    bad values, the options checked once by the config)."""
    from .ppo_config import PolicyOptimizationConfig

    extra = {} if reward_weights is None else {"reward_weights": list(reward_weights)}
    return build_trl_config(PolicyOptimizationConfig, trl_kwargs, output_dir, label="GRPO",
                            rejected=_REJECTED_TRL_FIELDS, reject=lambda value: True, **extra,
                            **options)


def policy_options(settings: PPOSettings) -> dict[str, Any]:
    """The `PolicyOptimizationConfig` options of a PPO section."""
    return {"advantage_estimator": settings.advantage_estimator,
            "estimator_options": dict(settings.estimator_options or {}),
            "gamma": settings.gamma, "lam": settings.lam,
            "critic": settings.critic, "vf_coef": settings.vf_coef,
            "value_clip": settings.value_clip, "kl_penalty": settings.kl_penalty,
            "kl_estimator": settings.kl_estimator, "kl_target": settings.kl_target,
            "kl_horizon": settings.kl_horizon, "whiten_advantages": settings.whiten_advantages,
            "policy_loss": settings.policy_loss,
            "policy_loss_options": dict(settings.policy_loss_options or {}),
            "group_filter": settings.group_filter,
            "group_filter_options": dict(settings.group_filter_options or {}),
            "group_filter_refill": settings.group_filter_refill}


def check_ppo_components(settings: PPOSettings) -> tuple[Any, Any, Any, list, list]:
    """(estimator, policy loss, group filter, reward functions, weights), resolved and checked
    against the trainer options; no TRL import (the pipeline runs it first for every section)."""
    from ..rewarding import resolve_reward_functions
    from .ppo_options import (check_group_filter_refill, check_trainer_options, resolve_estimator,
                              resolve_group_filter, resolve_policy_loss)

    estimator = resolve_estimator(settings.advantage_estimator, settings.estimator_options)
    policy_loss = resolve_policy_loss(settings.policy_loss, settings.policy_loss_options)
    group_filter = resolve_group_filter(settings.group_filter, settings.group_filter_options)
    check_group_filter_refill(settings.group_filter_refill)
    check_trainer_options(estimator, critic=settings.critic, kl_penalty=settings.kl_penalty,
                          kl_estimator=settings.kl_estimator, vf_coef=settings.vf_coef,
                          value_clip=settings.value_clip, gamma=settings.gamma, lam=settings.lam)
    funcs, weights = resolve_reward_functions(settings.reward_functions) if settings.reward_functions \
        else ([], [])
    return estimator, policy_loss, group_filter, list(funcs), list(weights)


def check_ppo_config(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                     output_dir: str | os.PathLike) -> CheckedPPO:
    """Resolve the estimator and reward functions and build the trainer's config; all errors, no models."""
    from ..rewarding import resolve_reward_functions

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
    args = build_grpo_config(trl_kwargs or {}, output_dir, weights, **policy_options(settings))
    estimator, policy_loss, group_filter = args.components()  # resolved once, by the config
    return CheckedPPO(estimator, list(funcs), list(weights), args, policy_loss, group_filter)


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


def load_policy(model_path: str, settings: PPOSettings, gradient_checkpointing: bool = False,
                seed: int | None = None) -> Any:
    """The policy: the base (4-bit or not) loaded once, with a fresh LoRA adapter when `lora` is set."""
    return load_trainable_model(model_path, settings.lora, settings.quantization,
                                gradient_checkpointing=gradient_checkpointing, seed=seed)


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
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)

    def check(rows: Any, where: str, label: str | None = None) -> None:  # before the model loads
        if rows is not None and "prompt" in getattr(rows, "column_names", ()):
            check_prompt_tokens(rows["prompt"], tokenizer, template, where, label)

    if train_dataset is None:
        train_dataset, source = load_prompt_rows(settings)
        check(train_dataset, source)  # before the split: errors name the file's lines
        if eval_dataset is None:
            train_dataset, eval_dataset = held_out_prompts(settings, train_dataset, check=check)
        else:
            check(eval_dataset, "given eval dataset")
    else:
        source = "given dataset"
        check(train_dataset, source)
        check(eval_dataset, "given eval dataset")
    if eval_dataset is not None and args.eval_strategy == "no":
        args.do_eval = True
    if template is not None:
        tokenizer.chat_template = template.jinja
    policy = load_policy(model_path, settings, bool(args.gradient_checkpointing), args.seed)

    funcs = list(checked.reward_funcs)
    scorer = None
    if settings.reward_adapter is not None:
        from .reward_model import attach_reward_adapter

        from ..models import quant_settings
        from .reward_model import read_meta

        recorded = quant_settings(read_meta(settings.reward_adapter).get("quantization"))
        if recorded != settings.quantization:
            logger.warning("reward_adapter %s was trained with quantization %s but is attached to "
                           "a base loaded with %s: its scores differ from training (use "
                           "`reward_model` to load it as trained)", settings.reward_adapter,
                           recorded, settings.quantization)
        scorer = attach_reward_adapter(policy, settings.reward_adapter, "reward", tokenizer=None)
        funcs.append(scorer_function(scorer, settings, "reward_adapter",
                                      scorer.tokenizer or tokenizer, scorer.template))
    if settings.reward_model is not None:
        scorer, _ = load_reward_scorer(settings, policy, model_path)
        funcs.append(scorer_function(scorer, settings, "reward_model"))
    trainer = PolicyOptimizationTrainer(policy, funcs, args, train_dataset=train_dataset,
                                        eval_dataset=eval_dataset, processing_class=tokenizer)
    keep_float32_adapter_on_cpu(trainer.model, settings.quantization)
    return PreparedPPO(trainer, tokenizer, model_path, train_dataset, eval_dataset, source, scorer)


def run_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/ppo") -> PPOResult:
    """Train the policy with the configured estimator; save adapter/model, value head, metrics."""
    out = Path(output_dir)
    started = time.time()
    if output_state(out, "ppo", settings, trl_kwargs).finished:  # before any model loads
        metrics, record = finished_stage(out, "ppo", METRICS_FILE)
        return PPOResult(out, metrics, bool(record.get("adapter")), up_to_date=True)
    prepared = prepare_ppo(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_prompts": len(prepared.train_dataset),
                               "eval_prompts": 0 if prepared.eval_dataset is None
                               else len(prepared.eval_dataset),
                               "advantage_estimator": settings.advantage_estimator,
                               "policy_loss": settings.policy_loss or f"trl:{trainer.loss_type}",
                               "policy_loss_options": dict(settings.policy_loss_options),
                               "group_filter": settings.group_filter}
    check_run_config(out, "ppo", settings, trl_kwargs)  # another config's files: cleared
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
