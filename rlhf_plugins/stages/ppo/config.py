"""`PolicyOptimizationConfig`: TRL's `GRPOConfig` plus the options of our policy optimisation.

One config class holds every option that changes the algorithm - the advantage estimator, the
critic, where the KL goes, whitening, the policy loss and the group filter - with their checks
in `__post_init__`, run once; `PolicyOptimizationTrainer(model, reward_funcs, args)` reads them
from `args` and takes no loose option. The components are resolved once, here, by name (family
``advantage_estimators``, ``policy_losses``, ``selection_rules``) or taken as given objects.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from .options import (check_estimator_args, check_group_filter_refill, check_policy_loss_args,
                          check_trainer_options, resolve_estimator, resolve_group_filter,
                          resolve_policy_loss)

#: fields that name a component (or hold one); stored by name wherever the config is serialised
COMPONENT_FIELDS = ("advantage_estimator", "policy_loss", "group_filter")


@dataclass
class PolicyOptimizationConfig(GRPOConfig):
    """`GRPOConfig` + the policy-optimisation options of :class:`PolicyOptimizationTrainer`."""

    advantage_estimator: Any = field(default="gae", metadata={
        "help": "advantage estimator: a registered name (family advantage_estimators) or a component"})
    estimator_options: dict | None = field(default=None, metadata={
        "help": "options passed to the estimator's configure()"})
    gamma: float = field(default=1.0, metadata={"help": "discount passed to the estimator"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda passed to the estimator"})
    critic: str = field(default="value_head", metadata={
        "help": "'value_head' (a linear head on the policy's last hidden state) or 'none'; used "
                "only by estimators that need values"})
    vf_coef: float = field(default=0.1, metadata={"help": "value-loss weight"})
    value_clip: float | None = field(default=0.2, metadata={
        "help": "PPO value clipping range (None: unclipped)"})
    kl_penalty: str = field(default="loss", metadata={
        "help": "'loss' (TRL's k3 term, weight beta) or 'reward' (-beta * KL_t added to every "
                "token's reward)"})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator of kl_penalty: reward"})
    kl_target: float | None = field(default=None, metadata={
        "help": "adaptive KL controller target (None: beta stays fixed)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "adaptive KL controller horizon"})
    whiten_advantages: bool = field(default=False, metadata={
        "help": "normalise advantages to zero mean / unit std over the batch's real tokens"})
    validate_rewards: bool = field(default=True, metadata={
        "help": "wrap reward callables to validate their outputs (needed for step rewards)"})
    policy_loss: Any = field(default=None, metadata={
        "help": "a registered policy loss (family policy_losses) or a component; None: TRL's loss"})
    policy_loss_options: dict | None = field(default=None, metadata={
        "help": "options passed to the policy loss's configure()"})
    group_filter: Any = field(default=None, metadata={
        "help": "a selection rule dropping whole groups from the update (e.g. nonzero_variance)"})
    group_filter_options: dict | None = field(default=None, metadata={
        "help": "options passed to the group filter's configure()"})
    group_filter_refill: bool = field(default=False, metadata={"help": "must stay False"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from .kl import make_kl_controller

        estimator, policy_loss, _ = self.components()
        check_group_filter_refill(self.group_filter_refill)
        check_trainer_options(estimator, critic=self.critic,
                              kl_penalty=self.kl_penalty, kl_estimator=self.kl_estimator,
                              vf_coef=self.vf_coef, value_clip=self.value_clip, gamma=self.gamma,
                              lam=self.lam)
        if policy_loss is not None:
            check_policy_loss_args(self)
        check_estimator_args(estimator, self)
        make_kl_controller(float(self.beta), self.kl_target, self.kl_horizon)  # checks the target

    def components(self) -> tuple[Any, Any, Any]:
        """(estimator, policy loss or None, group filter or None): configured components,
        resolved once per config object."""
        resolved = self.__dict__.get("_components")
        if resolved is None:
            resolved = (resolve_estimator(self.advantage_estimator, self.estimator_options),
                        resolve_policy_loss(self.policy_loss, self.policy_loss_options),
                        resolve_group_filter(self.group_filter, self.group_filter_options))
            self.__dict__["_components"] = resolved
        return resolved

    def to_dict(self) -> dict[str, Any]:
        """TRL's serialisation, with components as their names (JSON-able)."""
        out = super().to_dict()
        for key in COMPONENT_FIELDS:
            out[key] = _component_name(out.get(key))
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Trainer saves `training_args.bin`) with components by name: a component
        defined in a script need not be importable to save a checkpoint."""
        state = dict(self.__dict__)
        for key in COMPONENT_FIELDS:
            state[key] = _component_name(state.get(key))
        state.pop("_components", None)  # resolved again by name when needed
        return state


def _component_name(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else getattr(value, "name", repr(value))


@functools.cache
def option_fields() -> tuple[str, ...]:
    """The fields `PolicyOptimizationConfig` adds to TRL's `GRPOConfig` (our options)."""
    trl = {f.name for f in fields(GRPOConfig)}
    return tuple(f.name for f in fields(PolicyOptimizationConfig) if f.name not in trl)
