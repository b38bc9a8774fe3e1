"""The settings of a PPO/GRPO stage (our fields; the rest of the section are TRL `GRPOConfig` fields)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...config import check_strings
from ...errors import ConfigError
from ..training_settings import TrainingSettings

#: how a PRM reward model's step outputs become the PPO reward (see PPOSettings.prm_reward)
PRM_REWARDS = ("probability", "sign", "score")


@dataclass
class PPOSettings(TrainingSettings):
    """Our part of a PPO/GRPO config (the rest are TRL `GRPOConfig` fields, e.g. `beta`); the shared
    fields (model, dataset, eval_*, lora, quantization, ...) are :class:`TrainingSettings`'.
    `dataset` rows have a `prompt` (string or message list) plus the columns reward functions
    read; `eval_split` / `eval_dataset`: see `eval_examples`."""

    #: held-out prompts for TRL's evaluation; 0 disables it unless `eval_split`/`eval_dataset`
    #: is set. They never overlap the training prompts: the synthetic task's "test" split,
    #: `eval_split` of `eval_dataset` (default: `dataset`), or else `eval_examples` rows carved
    #: from the training data (seeded by `dataset_seed`) and removed from training
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        check_strings(self, ("advantage_estimator",), ("template",))
        if not isinstance(self.eval_examples, int) or isinstance(self.eval_examples, bool) \
                or self.eval_examples < 0:
            raise ConfigError(f"eval_examples: expected an integer >= 0, got {self.eval_examples!r}")
        for name in ("reward_adapter_weight", "reward_model_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ConfigError(f"{name}: expected a finite number, got {w!r}")
