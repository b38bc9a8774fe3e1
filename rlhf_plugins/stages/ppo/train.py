"""Policy optimisation (PPO with a critic, GRPO, RLOO, ...) on one base model through TRL.

`run_ppo(settings, trl_kwargs, output_dir)` wires :class:`PolicyOptimizationTrainer` (a thin
subclass of TRL's GRPOTrainer, see :mod:`.trainer`):

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import ConfigError
from ..resume import check_run_config, output_state
from ..skeleton import (build_trl_config, finish_stage, finished_stage, keep_float32_adapter_on_cpu,
                        load_trainable_model, resume_checkpoint, stage_config)
from .prompts import check_prompt_tokens, checked_prompts, held_out_prompts, load_prompt_rows
from .rewards import load_reward_scorer, scorer_function
from .settings import PPOSettings

logger = logging.getLogger(__name__)

METRICS_FILE = "ppo_metrics.json"
#: TRL fields replaced by our settings
_REJECTED_TRL_FIELDS = {
    "reward_weights": "give weights in `reward_functions` ({name: ..., weight: ...})",
    "scale_rewards": "the advantage estimator decides (e.g. estimator_options: {scale: batch} "
                     "for grpo, or advantage_estimator: dr_grpo for no scaling)",
    "multi_objective_aggregation": "rewards are summed with their weights, then the "
                                   "advantage estimator normalises",
}


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
    from .config import PolicyOptimizationConfig

    extra = {} if reward_weights is None else {"reward_weights": list(reward_weights)}
    return build_trl_config(PolicyOptimizationConfig, trl_kwargs, output_dir, label="GRPO",
                            rejected=_REJECTED_TRL_FIELDS, reject=lambda value: True, **extra,
                            **options)


def policy_options(settings: PPOSettings) -> dict[str, Any]:
    """The `PolicyOptimizationConfig` options a PPO section sets: its fields of the same names
    (options mappings copied)."""
    from .config import option_fields

    return {name: dict(value) if isinstance(value, Mapping) else value
            for name in option_fields() if hasattr(settings, name)
            for value in (getattr(settings, name),)}


def check_ppo_components(settings: PPOSettings) -> tuple[Any, Any, Any, list, list]:
    """(estimator, policy loss, group filter, reward functions, weights), resolved and checked
    against the trainer options; no TRL import (the pipeline runs it first for every section)."""
    from ...rewarding import resolve_reward_functions
    from .options import (check_group_filter_refill, check_trainer_options, resolve_estimator,
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
    from ...rewarding import resolve_reward_functions

    funcs, weights = resolve_reward_functions(settings.reward_functions) if settings.reward_functions \
        else ([], [])
    if settings.reward_adapter is not None:
        from ..reward_model.artifact import read_meta

        directory = Path(settings.reward_adapter)
        if not directory.is_dir():
            raise ConfigError(f"reward_adapter: {directory}: no such directory")
        meta = read_meta(directory)  # ConfigError when it is not a reward-model artifact
        if not meta.get("adapter"):
            raise ConfigError(f"reward_adapter: {directory} is a full reward model, not an adapter")
        weights = weights + [float(settings.reward_adapter_weight)]
    if settings.reward_model is not None:
        from ..reward_model.hf_export import check_reward_model_dir

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
    #: the prompt rows dropped (`bad_rows: skip`): the training source's, then the eval source's
    drops: list[Any] = field(default_factory=list)


def load_policy(model_path: str, settings: PPOSettings, gradient_checkpointing: bool = False,
                seed: int | None = None) -> Any:
    """The policy: the base (4-bit or not) loaded once, with a fresh LoRA adapter when `lora` is set."""
    return load_trainable_model(model_path, settings.lora, settings.quantization,
                                gradient_checkpointing=gradient_checkpointing, seed=seed)


def prepare_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike, *, checked: CheckedPPO | None = None,
                train_dataset: Any = None, eval_dataset: Any = None) -> PreparedPPO:
    """Validate (before loading anything), load the base once, attach adapters/heads, build the trainer."""
    from ... import registry
    from ...models import load_tokenizer, resolve_model
    from .trainer import PolicyOptimizationTrainer

    checked = checked or check_ppo_config(settings, trl_kwargs, output_dir)
    args = checked.args
    template = registry().chat_templates.get(settings.template) if settings.template else None
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)

    drops: list[Any] = []

    def check(rows: Any, where: str, label: str | None = None) -> Any:  # before the model loads
        if rows is None or "prompt" not in getattr(rows, "column_names", ()):
            return rows
        if settings.bad_rows == "error":
            check_prompt_tokens(rows["prompt"], tokenizer, template, where, label)
            return rows
        rows, dropped = checked_prompts(rows, tokenizer, template, where, label,
                                        settings.max_bad_fraction)
        drops.append(dropped)
        return rows

    if train_dataset is None:
        train_dataset, source = load_prompt_rows(settings)
        train_dataset = check(train_dataset, source)  # before the split: the file's lines
        if eval_dataset is None:
            train_dataset, eval_dataset = held_out_prompts(settings, train_dataset, check=check)
        else:
            eval_dataset = check(eval_dataset, "given eval dataset")
    else:
        source = "given dataset"
        train_dataset = check(train_dataset, source)
        eval_dataset = check(eval_dataset, "given eval dataset")
    if eval_dataset is not None and args.eval_strategy == "no":
        args.do_eval = True
    if template is not None:
        tokenizer.chat_template = template.jinja
    policy = load_policy(model_path, settings, bool(args.gradient_checkpointing), args.seed)

    funcs = list(checked.reward_funcs)
    scorer = None
    if settings.reward_adapter is not None:
        from ..reward_model.artifact import attach_reward_adapter

        from ...models import quant_settings
        from ..reward_model.artifact import read_meta

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
    return PreparedPPO(trainer, tokenizer, model_path, train_dataset, eval_dataset, source, scorer,
                       drops)


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
    for prefix, dropped in zip(("", "eval_"), prepared.drops):
        metrics.update(dropped.metrics(prefix))
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
    if trainer.is_world_process_zero():  # once, like the model (each process holds the same)
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
