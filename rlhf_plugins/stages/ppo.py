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

import dataclasses
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

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
METRICS_FILE = "ppo_metrics.json"
STAGE_FILE = "rlhf_plugins_stage.json"
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
    #: held-out prompts for TRL's evaluation (synthetic: the "test" split); 0 disables it
    eval_examples: int = 0
    #: evaluate before training too (metrics `eval_reward_before`)
    eval_before: bool = True
    #: chat template plugin whose Jinja becomes the tokenizer's chat_template (None: keep it)
    template: str | None = "chatml"
    #: registered reward function names or {name, weight, **options}
    reward_functions: list[Any] = field(default_factory=list)
    #: a saved reward adapter + head (the reward-model stage's output) on the same base
    reward_adapter: str | None = None
    reward_adapter_weight: float = 1.0
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
        if not self.reward_functions and self.reward_adapter is None:
            raise ConfigError("reward_functions: give at least one reward function (e.g. "
                              "exact_answer) or a reward_adapter")
        if not isinstance(self.estimator_options, Mapping):
            raise ConfigError(f"estimator_options: expected a mapping, got {self.estimator_options!r}")
        for name in ("dataset", "advantage_estimator", "dataset_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
        for name in ("num_examples",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.eval_examples, int) or isinstance(self.eval_examples, bool) \
                or self.eval_examples < 0:
            raise ConfigError(f"eval_examples: expected an integer >= 0, got {self.eval_examples!r}")
        w = self.reward_adapter_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"reward_adapter_weight: expected a finite number, got {w!r}")


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


# --------------------------------------------------------------------------------------------
# Validation (no model loading)
# --------------------------------------------------------------------------------------------

def build_grpo_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike,
                      reward_weights: Sequence[float] | None = None) -> Any:
    """TRL's `GRPOConfig` from the YAML's TRL fields (CPU-friendly defaults; ConfigError on bad values)."""
    from trl import GRPOConfig

    from .trainer_args import device_defaults

    kwargs = dict(trl_kwargs)
    for name, why in _REJECTED_TRL_FIELDS.items():
        if name in kwargs:
            raise ConfigError(f"{name}: not supported here: {why}")
    kwargs.pop("output_dir", None)
    device_defaults(kwargs)
    if reward_weights is not None:
        kwargs["reward_weights"] = list(reward_weights)
    try:
        return GRPOConfig(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"GRPO config: {exc}") from None


def check_ppo_config(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                     output_dir: str | os.PathLike) -> CheckedPPO:
    """Resolve the estimator and reward functions and build the TRL config; all errors, no models."""
    from ..rewarding import resolve_reward_functions
    from .ppo_trainer import check_trainer_options, resolve_estimator

    estimator = resolve_estimator(settings.advantage_estimator, settings.estimator_options)
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
    args = build_grpo_config(trl_kwargs or {}, output_dir, weights)
    if settings.kl_target is not None:
        from .kl import make_kl_controller

        make_kl_controller(float(args.beta), settings.kl_target, settings.kl_horizon)
    return CheckedPPO(estimator, list(funcs), list(weights), args)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_prompt_rows(settings: PPOSettings, split: str | None = None, n: int | None = None) -> tuple[Any, str]:
    """The prompt dataset (an HF Dataset with a `prompt` column) and a label naming its source."""
    from datasets import Dataset

    split = split or settings.dataset_split
    if settings.dataset == SYNTHETIC:
        from ..data import synth

        count = n or settings.num_examples or 256
        return synth.rl_dataset(count, seed=settings.dataset_seed, split=split), f"synthetic[{split}]"
    from .sft import SFTSettings, load_rows

    proxy = SFTSettings(dataset=settings.dataset, dataset_split=split,
                        dataset_config=settings.dataset_config, num_examples=n or settings.num_examples)
    rows, source = load_rows(proxy)
    dataset = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
    if "prompt" not in dataset.column_names:
        raise DataError(f"{source}: rows need a `prompt` column (a string or a list of messages)")
    return dataset, source


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


def reward_adapter_function(scorer: Any, tokenizer: Any, template: Any = None) -> Any:
    """A TRL-style reward function scoring with an attached reward adapter + head.

    The shared model's train/eval mode and active adapter are restored after each call.
    """
    from .reward_model import score

    backbone = scorer.backbone

    def reward_adapter(prompts: list, completions: list, **_: Any) -> list[float]:
        was_training = backbone.training
        try:
            rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
            return score(scorer, rows, tokenizer=tokenizer, template=template, progress=False)
        finally:
            backbone.train(was_training)

    return reward_adapter


def load_policy(model_path: str, settings: PPOSettings, gradient_checkpointing: bool = False) -> Any:
    """The policy: the base (4-bit or not) loaded once, with a fresh LoRA adapter when `lora` is set."""
    from ..models import apply_lora, is_adapter_dir, load_causal_lm, load_peft_model

    if is_adapter_dir(model_path):
        if settings.lora is not None:
            raise ConfigError(f"model: {model_path} is a LoRA adapter; drop `lora` to keep training "
                              "it, or give its merged model")
        return load_peft_model(model_path, quantization=settings.quantization, trainable=True,
                               gradient_checkpointing=gradient_checkpointing)
    model = load_causal_lm(model_path, quantization=settings.quantization)
    if settings.lora is not None:
        model = apply_lora(model, settings.lora, gradient_checkpointing=gradient_checkpointing)
    return model


def prepare_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None,
                output_dir: str | os.PathLike, *, checked: CheckedPPO | None = None,
                train_dataset: Any = None, eval_dataset: Any = None) -> PreparedPPO:
    """Validate (before loading anything), load the base once, attach adapters/heads, build the trainer."""
    from .. import registry
    from ..models import load_tokenizer, resolve_model
    from .ppo_trainer import PolicyOptimizationTrainer
    from .sft import _keep_float32_adapter_on_cpu

    checked = checked or check_ppo_config(settings, trl_kwargs, output_dir)
    args = checked.args
    template = registry().chat_templates.get(settings.template) if settings.template else None
    if train_dataset is None:
        train_dataset, source = load_prompt_rows(settings)
    else:
        source = "given dataset"
    if eval_dataset is None and settings.eval_examples:
        eval_split = "test" if settings.dataset == SYNTHETIC else settings.dataset_split
        eval_dataset, _ = load_prompt_rows(settings, split=eval_split, n=settings.eval_examples)
    if eval_dataset is not None and args.eval_strategy == "no":
        args.do_eval = True

    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    if template is not None:
        tokenizer.chat_template = template.jinja
    policy = load_policy(model_path, settings, bool(args.gradient_checkpointing))

    funcs = list(checked.reward_funcs)
    scorer = None
    if settings.reward_adapter is not None:
        from .reward_model import attach_reward_adapter

        scorer = attach_reward_adapter(policy, settings.reward_adapter, "reward", tokenizer=None)
        funcs.append(reward_adapter_function(scorer, scorer.tokenizer or tokenizer, scorer.template))
    trainer = PolicyOptimizationTrainer(
        policy, funcs, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, advantage_estimator=checked.estimator, gamma=settings.gamma,
        lam=settings.lam, critic=settings.critic, vf_coef=settings.vf_coef,
        value_clip=settings.value_clip, kl_penalty=settings.kl_penalty,
        kl_estimator=settings.kl_estimator, kl_target=settings.kl_target,
        kl_horizon=settings.kl_horizon, whiten_advantages=settings.whiten_advantages)
    _keep_float32_adapter_on_cpu(trainer.model, settings)
    return PreparedPPO(trainer, tokenizer, model_path, train_dataset, eval_dataset, source, scorer)


def run_ppo(settings: PPOSettings, trl_kwargs: Mapping[str, Any] | None = None,
            output_dir: str | os.PathLike = "outputs/ppo") -> PPOResult:
    """Train the policy with the configured estimator; save adapter/model, value head, metrics."""
    from ..cache import atomic_write_json
    from .sft import _last_checkpoint

    out = Path(output_dir)
    started = time.time()
    prepared = prepare_ppo(settings, trl_kwargs, out)
    trainer = prepared.trainer
    metrics: dict[str, Any] = {"train_prompts": len(prepared.train_dataset),
                               "advantage_estimator": settings.advantage_estimator}
    resume = _last_checkpoint(out) if settings.resume else None
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
    metrics["wall_time_s"] = round(time.time() - started, 3)
    metrics["kl_coef_final"] = float(trainer.kl_controller.value)
    metrics["log_history"] = trainer.state.log_history
    adapter = settings.lora is not None or hasattr(trainer.model, "peft_config")
    if trainer.is_world_process_zero():
        atomic_write_json(out / METRICS_FILE, metrics)
        atomic_write_json(out / STAGE_FILE, {
            "stage": "ppo", "base_model": prepared.model_path, "adapter": adapter,
            "value_head": trainer.value_head is not None, "dataset": prepared.source,
            "settings": dataclasses.asdict(settings),
        })
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

    from ..config import load_stage_config
    from .sft import read_stage_source

    data, where, out = read_stage_source(source, overrides, output_dir)
    settings, trl_kwargs = load_stage_config(data, PPOSettings, GRPOConfig, where=where)
    return settings, trl_kwargs, out


__all__ = ["PPOSettings", "PPOResult", "PreparedPPO", "CheckedPPO", "build_grpo_config",
           "check_ppo_config", "load_policy", "load_ppo_config", "load_prompt_rows",
           "ppo_from_config", "prepare_ppo", "reward_adapter_function", "run_ppo"]


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
