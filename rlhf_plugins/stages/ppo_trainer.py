"""A policy-optimisation trainer on TRL's GRPOTrainer whose advantage estimator is a plugin.

Why ``GRPOTrainer`` and not ``RLOOTrainer``: TRL 1.16's GRPOTrainer keeps the PPO objective per
token - its ``_compute_loss`` takes the clipped surrogate ``min(rho_t A_t, clip(rho_t) A_t)``
with token-level ratios and explicitly accepts ``[B, T]`` advantages from subclasses (it only
unsqueezes ``[B]`` ones) - which is what GAE needs. RLOOTrainer sums the log-probabilities into
one sequence-level ratio before the clip, so per-token advantages cannot be expressed there.
GRPOTrainer also brings the reference handling we rely on (a PEFT policy's reference is the
adapter-disabled base, no second model) and TRL's k3 KL term (``beta``) in the loss.

What this subclass changes, and nothing else (no TRL code is copied):

- ``_calculate_rewards``: unchanged; the subclass only remembers the gathered per-function
  rewards and each wrapped function's raw outputs. Reward callables are wrapped to be
  validated by :func:`rlhf_plugins.rewarding.call_reward_functions` (wrong length,
  non-number, NaN/inf -> an error naming the function; None allowed; step rewards
  ``[(end_char_offset, value), ...]`` allowed, TRL sees their sum).
- ``_generate_and_score_completions``: TRL's rollout runs unchanged; afterwards the
  advantages TRL computed are replaced by those of the configured estimator, called with the
  weighted rewards (TRL's ``nansum`` rule, unscorable rows NaN), the completion mask and what
  the estimator's capabilities ask for: the value head's predictions at rollout time
  (``needs_values``), the per-function rewards and weights (``needs_reward_components``), the
  reward of one greedy completion per prompt (``needs_greedy_baseline``). Step rewards become
  [B, T] token rewards (:func:`rlhf_plugins.step_rewards.batch_token_rewards`); with
  ``kl_penalty="reward"`` the per-token ``-beta * KL`` (InstructGPT) is added to the rewards.
  A group filter (any selection rule) drops whole groups: the estimator sees the kept ones,
  the dropped ones get advantage 0 and leave the loss mask and TRL's token count.
- ``_generate_single_turn``: TRL's generation, unchanged; while it runs, a hook reads the
  rollout's values from the sampler's own forwards (one per new token), so PPO costs no extra
  pass over the batch. Where that cannot work (vLLM, continuous batching, tool loops, a
  chunked prefill) or log-probs are needed anyway (KL in the reward), one no-grad policy
  forward computes them instead.
- ``_compute_loss``: TRL's loss - or, with ``policy_loss``, the plugin loss on the per-token
  log-probs of TRL's own forward (``_get_per_token_logps_and_entropies``), TRL's normaliser
  passed as ``norm_constant`` and TRL's KL term added - plus ``vf_coef * value_loss``
  (PPO-clipped) when the batch has value targets; the values come from the same forward pass
  (a hook on the backbone).
- ``_save`` / ``_load_from_checkpoint``: the value head travels with checkpoints.

The trainer never looks at a component's name: it asks the estimator's capabilities
(:func:`rlhf_plugins.protocols.member`) and the loss's ``agg``, and calls them.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from ..errors import ConfigError
from ..guard import guarded
from ..losses import KL_KINDS, kl_estimate, masked_mean, value_loss
from ..protocols import member
from .kl import AdaptiveKLController, make_kl_controller
from .value_head import (GenerationValueCapture, ValueHead, capture_generation_values,
                         capture_values, hidden_size_of, unwrap)

logger = logging.getLogger(__name__)

__all__ = ["PolicyOptimizationTrainer", "resolve_estimator", "resolve_group_filter",
           "resolve_policy_loss", "validated_reward_function", "KL_PENALTIES", "CRITICS"]

KL_PENALTIES = ("loss", "reward")
CRITICS = ("value_head", "none")
#: batch keys TRL forwards to the model besides ids/masks (multimodal inputs)
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                 "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                 "mm_token_type_ids", "image_position_ids")


def resolve_estimator(estimator: Any, options: Mapping[str, Any] | None = None) -> Any:
    """An advantage estimator component: a registered name (looked up, configured) or a component."""
    if isinstance(estimator, str):
        from .. import registry

        return registry().advantage_estimators.get(estimator, **dict(options or {}))
    if options:
        configure = getattr(estimator, "configure", None)
        if configure is None:
            raise ConfigError("estimator_options given but the estimator has no configure()")
        estimator = configure(**dict(options))
    if not callable(estimator):
        raise ConfigError(f"advantage estimator must be a registered name or a callable, got "
                          f"{type(estimator).__name__}")
    return estimator


def validated_reward_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a TRL-style reward function so its outputs are checked (errors name the function).

    A completion's reward may be a float, None or step rewards (a list of ``(end_char_offset,
    value)`` pairs): TRL gets one number per completion (the sum of the steps), and the raw
    outputs of the last call stay on the wrapper (``last_outputs``, with the completion texts
    the offsets index in ``last_texts``) for the trainer to place on tokens.
    """
    from ..rewarding import (call_reward_functions, completion_text, reward_function_name,
                             reward_value_total)

    name = reward_function_name(func)

    def checked(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        checked.last_outputs = checked.last_texts = None  # type: ignore[attr-defined]
        _, per_function = call_reward_functions([func], None, prompts, completions,
                                                allow_step_rewards=True, **columns)
        outputs = next(iter(per_function.values()))
        checked.last_outputs = outputs  # type: ignore[attr-defined]
        checked.last_texts = [completion_text(c) for c in completions]  # type: ignore[attr-defined]
        return [reward_value_total(v) for v in outputs]

    checked.__name__ = checked.__qualname__ = name  # TRL logs rewards/<__name__>/mean
    checked.__doc__ = getattr(func, "__doc__", None)
    checked.__wrapped_reward_function__ = func  # type: ignore[attr-defined]
    checked.last_outputs = checked.last_texts = None  # type: ignore[attr-defined]
    return checked


def resolve_policy_loss(loss: Any, options: Mapping[str, Any] | None = None) -> Any:
    """A policy loss component (registered name, looked up and configured, or a callable), or None."""
    if loss is None:
        if options:
            raise ConfigError("policy_loss_options given but no policy_loss")
        return None
    if isinstance(loss, str):
        from .. import registry

        return registry().policy_losses.get(loss, **dict(options or {}))
    if options:
        configure = getattr(loss, "configure", None)
        if configure is None:
            raise ConfigError("policy_loss_options given but the policy loss has no configure()")
        loss = configure(**dict(options))
    if not callable(loss):
        raise ConfigError(f"policy loss must be a registered name or a callable, got {type(loss).__name__}")
    return loss


def resolve_group_filter(rule: Any, options: Mapping[str, Any] | None = None) -> Any:
    """A selection rule used as a group filter (registered name or component), or None."""
    if rule is None:
        if options:
            raise ConfigError("group_filter_options given but no group_filter")
        return None
    if isinstance(rule, str):
        from .. import registry

        return registry().selection_rules.get(rule, **dict(options or {}))
    if options:
        configure = getattr(rule, "configure", None)
        if configure is None:
            raise ConfigError("group_filter_options given but the rule has no configure()")
        rule = configure(**dict(options))
    if not callable(getattr(rule, "select", None)):
        raise ConfigError(f"group_filter must be a selection rule name or a rule with select(), got "
                          f"{type(rule).__name__}")
    return rule


#: TRL GRPOConfig options of TRL's own loss, with their defaults; `policy_loss` replaces that
#: loss, so a non-default value would be silently ignored: an error says what to use instead.
_TRL_LOSS_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("loss_type", "dapo", "the loss's `agg` option sets the aggregation "
                          "(policy_loss_options: {agg: seq_mean_token_mean} is TRL's grpo)"),
    ("epsilon", 0.2, "set the loss's clip options (ppo_clip: clip_low)"),
    ("epsilon_high", None, "set the loss's clip options (ppo_clip: clip_high)"),
    ("delta", None, "set the loss's options (ppo_clip: delta)"),
    ("importance_sampling_level", "token", "use a sequence-level loss (policy_loss: gspo)"),
    ("top_entropy_quantile", 1.0, "not supported with policy_loss"),
    ("off_policy_mask_threshold", None, "not supported with policy_loss"),
    ("entropy_coef", 0.0, "not supported with policy_loss"),
    ("use_adaptive_entropy", False, "not supported with policy_loss"),
)


def check_policy_loss_args(args: Any) -> None:
    """ConfigError for TRL loss options that a plugin policy loss would silently ignore."""
    for name, default, instead in _TRL_LOSS_OPTIONS:
        value = getattr(args, name, default)
        if value != default:
            raise ConfigError(f"{name}: {value!r} configures TRL's own loss, which policy_loss "
                              f"replaces: {instead}")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        raise ConfigError("use_vllm with vllm_importance_sampling_correction: not supported with "
                          "policy_loss (set vllm_importance_sampling_correction: false)")


def check_estimator_args(estimator: Any, args: Any) -> None:
    """ConfigError when the estimator's capabilities cannot be honoured with these TRL options."""
    greedy = member(estimator, "advantage_estimators", "needs_greedy_baseline")
    if greedy and getattr(args, "use_vllm", False):
        raise ConfigError(f"advantage estimator {getattr(estimator, 'name', estimator)!r} needs a "
                          "greedy baseline, generated on the transformers path: set use_vllm: false")


def check_group_filter_refill(refill: Any) -> None:
    """ConfigError for group_filter_refill: true (see docs/concepts/dense_rewards.md for why)."""
    if not isinstance(refill, bool):
        raise ConfigError(f"group_filter_refill: expected true or false, got {refill!r}")
    if refill:
        raise ConfigError(
            "group_filter_refill: true is not supported on TRL's GRPOTrainer: its generation batch "
            "is one fixed draw of the trainer's dataloader (RepeatSampler, sharded per process), and "
            "merging a second rollout would re-implement TRL's rollout assembly (left/right padding "
            "of ids, masks, old/ref/sampling log-probs, multimodal fields). Dropped groups leave "
            "the batch smaller instead: raise num_generations or the batch size to compensate")


def _adapter_is_fresh(model: nn.Module) -> bool:
    """True for a PEFT model whose active LoRA adapter is freshly initialised (all lora_B == 0).

    Then the policy equals the adapter-disabled base, which can serve as the reference with no
    copy at all; a pretrained adapter (e.g. an SFT stage) instead needs TRL's "ref" adapter copy.
    """
    active = getattr(model, "active_adapter", None)
    if active is None or not hasattr(model, "peft_config"):
        return False
    found = False
    for name, param in model.named_parameters():
        if ".lora_B." in name and f".{active}." in name:
            found = True
            if bool(param.detach().ne(0).any()):
                return False
    return found


class PolicyOptimizationTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with a pluggable advantage estimator, a value head and KL shaping.

    Extra keyword arguments (everything else is TRL's GRPOTrainer):

    - ``advantage_estimator``: a registered name (family ``advantage_estimators``) or a
      component; ``estimator_options`` go to its ``configure``.
    - ``gamma``, ``lam``: discount and GAE lambda passed to the estimator.
    - ``critic``: ``"value_head"`` (a linear head on the policy's last hidden state, shared
      backbone) or ``"none"``; used only by estimators with ``needs_values``.
    - ``vf_coef``, ``value_clip``: value-loss weight and PPO value clipping (None: unclipped).
    - ``kl_penalty``: ``"loss"`` (TRL's k3 term, weight ``args.beta``) or ``"reward"``
      (``-beta * KL_t`` added to every token's reward; estimator ``kl_estimator``, k1 default).
    - ``kl_target``, ``kl_horizon``: adaptive KL controller (None: ``beta`` stays fixed).
    - ``whiten_advantages``: normalise advantages to zero mean / unit std over the batch's real
      tokens (PPO practice); off by default.
    - ``validate_rewards``: wrap reward callables with :func:`validated_reward_function`
      (needed for step rewards).
    - ``policy_loss``: a registered name (family ``policy_losses``) or a component replacing
      TRL's surrogate; ``policy_loss_options`` go to its ``configure``. None: TRL's loss.
    - ``group_filter``: a selection rule name (or rule) dropping whole groups from the update
      (DAPO dynamic sampling, e.g. ``nonzero_variance``); ``group_filter_options`` configure it;
      ``group_filter_refill`` must stay False (see :func:`check_group_filter_refill`).
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: GRPOConfig | None = None, *,
                 advantage_estimator: Any = "grpo", estimator_options: Mapping[str, Any] | None = None,
                 gamma: float = 1.0, lam: float = 0.95, critic: str = "value_head",
                 vf_coef: float = 0.1, value_clip: float | None = 0.2, kl_penalty: str = "loss",
                 kl_estimator: str = "k1", kl_target: float | None = None,
                 kl_horizon: float = 10000.0, whiten_advantages: bool = False,
                 validate_rewards: bool = True, policy_loss: Any = None,
                 policy_loss_options: Mapping[str, Any] | None = None, group_filter: Any = None,
                 group_filter_options: Mapping[str, Any] | None = None,
                 group_filter_refill: bool = False, **kwargs: Any) -> None:
        self.estimator = resolve_estimator(advantage_estimator, estimator_options)
        self.needs_values = bool(member(self.estimator, "advantage_estimators", "needs_values"))
        check_trainer_options(self.estimator, critic=critic, kl_penalty=kl_penalty,
                              kl_estimator=kl_estimator, vf_coef=vf_coef, value_clip=value_clip,
                              gamma=gamma, lam=lam)
        if args is None:
            raise ConfigError("PolicyOptimizationTrainer needs `args` (a trl.GRPOConfig)")
        self.policy_objective = resolve_policy_loss(policy_loss, policy_loss_options)
        if self.policy_objective is not None:
            check_policy_loss_args(args)
        self.group_filter_rule = resolve_group_filter(group_filter, group_filter_options)
        check_group_filter_refill(group_filter_refill)
        check_estimator_args(self.estimator, args)
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ConfigError("multi_objective_aggregation: only 'sum_then_normalize' is supported "
                              "(the advantage estimator normalises the summed reward)")
        if self.needs_values:
            # The value head runs on the backbone's output *outside* DDP's forward. With
            # find_unused_parameters, DDP would mark its parameters unused (ready) at the end of
            # the forward and then again when their gradients arrive ("marked ready twice").
            if args.ddp_find_unused_parameters:
                raise ConfigError("ddp_find_unused_parameters: must be false with a value head "
                                  "(its parameters are used outside the model's forward)")
            args.ddp_find_unused_parameters = False
        self.gamma, self.lam = float(gamma), float(lam)
        self.vf_coef = float(vf_coef)
        self.value_clip = None if value_clip is None else float(value_clip)
        self.kl_penalty, self.kl_estimator = kl_penalty, kl_estimator
        self.whiten_advantages = bool(whiten_advantages)
        self.kl_controller = make_kl_controller(float(args.beta), kl_target, kl_horizon)

        if reward_funcs is not None and validate_rewards:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [validated_reward_function(f) if callable(f) and not isinstance(f, nn.Module)
                            else f for f in funcs]

        # The reference: TRL builds it from `args.beta`. For a freshly initialised LoRA policy the
        # adapter-disabled base *is* the initial policy, so TRL is told beta=0 while it sets up
        # (no "ref" adapter copy) and the reference log-probs come from disabling the adapter.
        # Otherwise TRL's own choice stands (a "ref" adapter copy, or a reference model).
        beta = float(args.beta)
        init_beta = 0.0 if (beta == 0.0 or _adapter_is_fresh(model)) else beta
        args.beta = init_beta
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            args.beta = beta
        # TRL's loss adds beta * k3 only in "loss" mode; in "reward" mode the KL is in the rewards.
        self.beta = self.kl_controller.value if kl_penalty == "loss" else 0.0
        if beta != 0.0 and self.ref_model is None and not hasattr(unwrap(self.model), "peft_config"):
            raise ConfigError("no reference model could be set up for the KL penalty")  # pragma: no cover

        self.value_head: ValueHead | None = None
        if self.needs_values:
            device = next(p.device for p in self.model.parameters())
            self.value_head = ValueHead(hidden_size_of(self.model)).to(device)
            # A submodule of the policy: the optimizer and DDP see its parameters like any other.
            self.model.add_module("v_head", self.value_head)
        self._last_rewards_per_func: torch.Tensor | None = None
        #: per reward function: (raw outputs, completion texts) of the last rollout's scoring
        self._last_reward_outputs: list[tuple[list | None, list | None]] = []
        self._said_dense_sum = False
        #: generation captures of the current rollout (None: not collecting)
        self._generation_captures: list[tuple[GenerationValueCapture, list]] | None = None

    # -- rewards ------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        self._last_reward_outputs = [(getattr(f, "last_outputs", None), getattr(f, "last_texts", None))
                                     for f in self.reward_funcs]
        return rewards_per_func

    def _dense_token_rewards(self, output: dict[str, Any], process_slice: slice) -> torch.Tensor | None:
        """This process's [b, T] weighted token rewards when a reward function gave step rewards.

        Step rewards sit on the tokens that end their steps (:func:`batch_token_rewards`), scalar
        rewards on the last real token; None is left out of the weighted sum (TRL's rule) and a
        completion no function scored gets NaN on its last token (unscorable). None when every
        reward this rollout was a scalar.
        """
        from ..step_rewards import batch_token_rewards, is_step_rewards

        outputs = self._last_reward_outputs
        if not any(out is not None and any(is_step_rewards(v) for v in out) for out, _ in outputs):
            return None
        ids, real = output["completion_ids"], output["completion_mask"]
        per_func = self._last_rewards_per_func[process_slice].to(ids.device)  # [b, F]
        weights = self.reward_weights.to(ids.device)
        local_rows, length = ids.shape
        last = length - 1 - real.flip(1).to(torch.int8).argmax(dim=1)
        rows = torch.nonzero(real.sum(dim=1) > 0).squeeze(1)
        total = torch.zeros(local_rows, length, dtype=torch.float32, device=ids.device)
        for f, (raw, texts) in enumerate(outputs):
            if raw is not None and any(is_step_rewards(v) for v in raw):
                tokens, _ = batch_token_rewards(raw, ids, real, self._tokenizer, texts)
                tokens = torch.nan_to_num(tokens.to(ids.device), nan=0.0)
            else:  # a scalar function (or a model TRL scored): its reward on the last real token
                tokens = torch.zeros_like(total)
                tokens[rows, last[rows]] = torch.nan_to_num(per_func[rows, f].float(), nan=0.0)
            total = total + weights[f] * tokens
        unscorable = torch.isnan(per_func).all(dim=1) & (real.sum(dim=1) > 0)
        total[unscorable, last[unscorable]] = torch.nan
        if not self._said_dense_sum and not member(self.estimator, "advantage_estimators",
                                                   "uses_token_rewards"):
            logger.info("advantage estimator %r is sequence-level: it gets the sum of each "
                        "completion's step rewards (token-level estimators such as gae or "
                        "reinforce_plus_plus credit each step at its token)",
                        getattr(self.estimator, "name", type(self.estimator).__name__))
            self._said_dense_sum = True
        return total

    def _greedy_baseline_rewards(self, inputs: list[dict[str, Any]]) -> torch.Tensor:
        """[B_global] reward of a greedy completion of each row's prompt (one generation per prompt).

        Consecutive rows with the same prompt (a group) share one greedy generation; it is
        scored by the same reward functions and weights as the rollout (TRL's nansum rule).
        """
        import copy

        from transformers import GenerationConfig
        from trl.data_utils import is_conversational

        prompts = [x["prompt"] for x in inputs]
        firsts = [i for i in range(len(prompts)) if i == 0 or prompts[i] != prompts[i - 1]]
        owner, k = [], -1
        for i in range(len(prompts)):
            k += 1 if k + 1 < len(firsts) and firsts[k + 1] == i else 0
            owner.append(k)
        prompt_ids, images, multimodal = self._tokenize_prompts([prompts[i] for i in firsts])
        greedy = {**self.generation_kwargs, "do_sample": False, "temperature": None, "top_p": None,
                  "top_k": None, "min_p": None}
        saved = (self.generation_config, self.generation_kwargs)
        self.generation_config = GenerationConfig(**greedy, disable_compile=True)
        self.generation_kwargs = greedy
        try:
            completion_ids, _ = self._generate_single_turn(prompt_ids, images, multimodal, 1)
        finally:
            self.generation_config, self.generation_kwargs = saved
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = list(texts)
        # Scoring must not leak into the rollout's logs (reward functions may log columns/metrics).
        pending = (copy.deepcopy(self._pending_extra_logs), copy.deepcopy(self._pending_metrics))
        try:
            per_func = GRPOTrainer._calculate_rewards(
                self, inputs, prompts, [completions[owner[i]] for i in range(len(prompts))],
                [list(completion_ids[owner[i]]) for i in range(len(prompts))])
        finally:
            self._pending_extra_logs.clear()
            self._pending_extra_logs.update(pending[0])
            self._pending_metrics.clear()
            self._pending_metrics.update(pending[1])
        weights = self.reward_weights.to(per_func.device).unsqueeze(0)
        baseline = (per_func * weights).nansum(dim=1)
        baseline[torch.isnan(per_func).all(dim=1)] = torch.nan
        return baseline

    def _group_keep(self, rewards: torch.Tensor, num_generations: int, mode: str) -> torch.Tensor | None:
        """[B_global] bool: the completions of the groups the group filter keeps (None: no filter)."""
        if self.group_filter_rule is None:
            return None
        from ..group_filters import completion_keep_mask, group_filter_metrics, group_keep_mask

        keep = group_keep_mask(self.group_filter_rule, rewards.detach().cpu().tolist(), num_generations)
        for key, value in group_filter_metrics(keep).items():
            self._metrics[mode][f"group_filter/{key}"].append(value)
        return torch.tensor(completion_keep_mask(keep, num_generations), dtype=torch.bool,
                            device=rewards.device)

    def _total_rewards(self) -> torch.Tensor:
        """Weighted rewards of the whole (gathered) batch, TRL's rule; unscorable rows NaN."""
        per_func = self._last_rewards_per_func
        weights = self.reward_weights.to(per_func.device).unsqueeze(0)
        rewards = (per_func * weights).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        return rewards

    # -- rollout-time statistics --------------------------------------------------------------
    def _gather_rows(self, tensor: torch.Tensor, pad: float = 0) -> torch.Tensor:
        """All processes' rows of a local [b, T] tensor (T padded to the longest)."""
        if self.accelerator.num_processes == 1:
            return tensor
        tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad)
        return self.accelerator.gather(tensor)

    def _reference_logps(self, ids: torch.Tensor, attention: torch.Tensor, keep: int,
                         batch_size: int, forward: dict[str, Any]) -> torch.Tensor:
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(
                self.ref_model, ids, attention, keep, batch_size=batch_size, **forward)[0]
        from trl.trainer.utils import use_adapter

        peft_model = self.accelerator.unwrap_model(self.model)
        name = "ref" if "ref" in peft_model.peft_config else None
        with use_adapter(peft_model, adapter_name=name):
            return self._get_per_token_logps_and_entropies(
                self.model, ids, attention, keep, batch_size=batch_size, **forward)[0]

    def _generate_single_turn(self, prompt_ids, *args: Any, **kwargs: Any):
        captures = self._generation_captures
        if (captures is None or self.value_head is None or self.use_vllm
                or self.use_transformers_continuous_batching):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        with capture_generation_values(self.model, self.value_head) as capture:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        captures.append((capture, completion_ids))
        return completion_ids, logprobs

    def _generation_values(self, captures: list[tuple[GenerationValueCapture, list]] | None,
                           output: dict[str, Any]) -> torch.Tensor | None:
        """The rollout's values as read during generation, or None where they cannot be used."""
        if not captures or len(captures) != 1 or "tool_mask" in output:
            return None  # no capture, or a multi-turn rollout (tool results are not generated)
        capture, completion_ids = captures[0]
        if max((len(c) for c in completion_ids), default=0) > len(capture.steps):
            return None
        values = capture.values(*output["completion_ids"].shape)  # None unless rows match
        return None if values is None else values.to(output["completion_ids"].device).float()

    def _rollout_statistics(self, output: dict[str, Any], need_logps: bool,
                            values: torch.Tensor | None = None) -> dict[str, Any]:
        """Values (critic) and policy/reference log-probs of the rollout, as needed.

        ``values`` read during generation (collected only when no log-probs are needed) are
        used as they are; otherwise one no-grad policy forward gives log-probs and values.
        """
        from trl.models.utils import disable_gradient_checkpointing

        if values is not None:
            return {"values": values, "logps": None, "ref_logps": None}

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        mode = "train" if self.model.training else "eval"
        batch_size = (self.args.per_device_train_batch_size if mode == "train"
                      else self.args.per_device_eval_batch_size)
        forward = {k: output[k] for k in _FORWARD_KEYS if k in output}
        stats: dict[str, Any] = {"values": None, "logps": None, "ref_logps": None}
        if not (self.needs_values or need_logps):
            return stats
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if self.value_head is not None:
                with capture_values(self.model, self.value_head, keep) as capture:
                    logps = self._get_per_token_logps_and_entropies(
                        self.model, ids, attention, keep, batch_size=batch_size, **forward)[0]
                stats["values"] = capture.values().float()
            elif need_logps:
                logps = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, keep, batch_size=batch_size, **forward)[0]
            if need_logps:
                stats["logps"] = logps
                ref = output.get("ref_per_token_logps")
                stats["ref_logps"] = ref if ref is not None else self._reference_logps(
                    ids, attention, keep, batch_size, forward)
        return stats

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        kl_coef = float(self.kl_controller.value)  # updated only at the end of this method
        adaptive = isinstance(self.kl_controller, AdaptiveKLController)
        kl_in_reward = self.kl_penalty == "reward" and kl_coef != 0.0
        need_logps = kl_in_reward or (adaptive and kl_coef != 0.0)
        # Values are read during generation unless a policy forward runs anyway (log-probs).
        collect = self.value_head is not None and not need_logps
        self._generation_captures = [] if collect else None
        try:
            output = super()._generate_and_score_completions(inputs)
            generation_values = self._generation_values(self._generation_captures, output)
        finally:
            self._generation_captures = None
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        device = output["completion_ids"].device
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mask = mask.to(torch.int64)
        local_rows, local_len = mask.shape
        stats = self._rollout_statistics(output, need_logps, generation_values)

        rewards = self._total_rewards().to(device)  # [B_global]
        process_slice = slice(self.accelerator.process_index * local_rows,
                              (self.accelerator.process_index + 1) * local_rows)
        dense = self._dense_token_rewards(output, process_slice)  # [b, T] or None
        kl_tokens = None
        if need_logps:
            kl_tokens = kl_estimate(stats["logps"].float(), stats["ref_logps"].float(),
                                    self.kl_estimator if kl_in_reward else "k1") * mask
        if kl_in_reward or dense is not None:
            if dense is not None:  # step rewards at the tokens ending their steps
                token_rewards = dense
            else:  # InstructGPT: R on the last real token ...
                token_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=device)
                local_r = rewards[process_slice]
                last = local_len - 1 - mask.flip(1).argmax(dim=1)
                rows = torch.nonzero(mask.sum(dim=1) > 0).squeeze(1)
                token_rewards[rows, last[rows]] += local_r[rows].float()
            if kl_in_reward:  # ... and -beta * KL_t on every real token
                token_rewards = token_rewards - kl_coef * kl_tokens
            est_rewards = self._gather_rows(token_rewards)
        else:
            est_rewards = rewards
        global_mask = self._gather_rows(mask)
        values = stats["values"]
        global_values = None if values is None else self._gather_rows(values * mask)

        extra: dict[str, Any] = {}
        if member(self.estimator, "advantage_estimators", "needs_reward_components"):
            extra["reward_components"] = self._last_rewards_per_func.to(device)  # [B, F], NaN = None
            extra["reward_weights"] = self.reward_weights.to(device)
        if member(self.estimator, "advantage_estimators", "needs_greedy_baseline"):
            extra["baseline_rewards"] = self._greedy_baseline_rewards(inputs).to(device)
            self._metrics[mode]["greedy_baseline/reward_mean"].append(
                float(torch.nanmean(extra["baseline_rewards"].float())))
        keep = self._group_keep(rewards, num_generations, mode)  # [B_global] bool or None
        result, all_advantages = self._estimate(est_rewards, global_mask, global_values,
                                                num_generations, extra, keep)
        advantages = all_advantages[process_slice]
        if advantages.dim() == 2:
            advantages = advantages[:, :local_len]
        output["advantages"] = advantages
        returns = result.returns
        if returns is not None and self.value_head is not None:
            output["returns"] = returns.to(device=device, dtype=torch.float32)[process_slice, :local_len]
            output["old_values"] = values
        if keep is not None and not bool(keep.all()):
            # Dropped groups take no part in the loss: out of its mask and of TRL's token count.
            local_keep = keep[process_slice].to(output["completion_mask"].dtype)
            output["completion_mask"] = output["completion_mask"] * local_keep[:, None]
            loss_mask = output["completion_mask"]
            if "tool_mask" in output:
                loss_mask = loss_mask * output["tool_mask"]
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
            global_mask = global_mask * keep[:, None].to(global_mask.dtype)

        self._log_rollout(mode, all_advantages, global_mask, kl_tokens, mask, values, returns,
                          kl_in_reward, kl_coef)
        if need_logps and mode == "train" and kl_tokens is not None:
            per_sequence_kl = self._gather_rows(kl_tokens.sum(dim=1, keepdim=True)).float()
            self.kl_controller.update(float(per_sequence_kl.mean()), int(per_sequence_kl.numel()))
            if self.kl_penalty == "loss":
                self.beta = float(self.kl_controller.value)
        return output

    def _estimate(self, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                  num_generations: int, extra: dict[str, Any], keep: torch.Tensor | None,
                  ) -> tuple[Any, torch.Tensor]:
        """Call the estimator (on the kept groups only, with a group filter); (result, advantages).

        Dropped rows get advantage 0 (and returns 0: they are masked out of the value loss).
        """
        from ..advantage_types import Advantages

        device = mask.device
        if keep is None or bool(keep.all()):
            with guarded(self.estimator, "advantage_estimators", "__call__()"):
                result = self.estimator(rewards, num_generations=num_generations, mask=mask,
                                        values=values, gamma=self.gamma, lam=self.lam, **extra)
            advantages = result.advantages.to(device=device, dtype=torch.float32)
            if self.whiten_advantages:
                advantages = _whiten(advantages, mask if advantages.dim() == 2 else None)
            return result, advantages
        rows = torch.nonzero(keep).squeeze(1)
        returns = None
        if rows.numel() == 0:
            advantages = torch.zeros(mask.shape[0], dtype=torch.float32, device=device)
            if self.value_head is not None and values is not None:
                returns = torch.zeros(mask.shape, dtype=torch.float32, device=device)
            return Advantages(advantages, returns), advantages
        sub = {k: (v if k == "reward_weights" else v[rows]) for k, v in extra.items()}
        with guarded(self.estimator, "advantage_estimators", "__call__()"):
            result = self.estimator(rewards[rows], num_generations=num_generations, mask=mask[rows],
                                    values=None if values is None else values[rows],
                                    gamma=self.gamma, lam=self.lam, **sub)
        kept = result.advantages.to(device=device, dtype=torch.float32)
        if self.whiten_advantages:
            kept = _whiten(kept, mask[rows] if kept.dim() == 2 else None)
        advantages = torch.zeros((mask.shape[0], *kept.shape[1:]), dtype=torch.float32, device=device)
        advantages[rows] = kept
        if result.returns is not None:
            returns = torch.zeros(mask.shape, dtype=torch.float32, device=device)
            returns[rows] = result.returns.to(device=device, dtype=torch.float32)
        return Advantages(advantages, returns), advantages

    def _log_rollout(self, mode: str, advantages: torch.Tensor, global_mask: torch.Tensor,
                     kl_tokens: torch.Tensor | None, mask: torch.Tensor,
                     values: torch.Tensor | None, returns: torch.Tensor | None,
                     kl_in_reward: bool, kl_coef: float) -> None:
        metrics = self._metrics[mode]
        if advantages.dim() == 2:
            valid = global_mask.bool()
            per_sequence = masked_mean(advantages, global_mask, dim=1)
            flat = advantages[valid]
        else:
            per_sequence = flat = advantages
        # The completions table shows the advantages the loss used (per-sequence mean if [B, T]).
        logged = self._logs["advantages"]
        for _ in range(min(len(per_sequence), len(logged))):
            logged.pop()
        logged.extend(per_sequence.tolist())
        if flat.numel():
            metrics["advantages/mean"].append(float(flat.mean()))
            metrics["advantages/std"].append(float(flat.std()) if flat.numel() > 1 else 0.0)
        metrics["kl_coef"].append(kl_coef)
        if kl_tokens is not None:
            seq_kl = self._gather_rows(kl_tokens.sum(dim=1, keepdim=True)).float()
            metrics["rollout_kl"].append(float(seq_kl.mean()))
            if kl_in_reward:
                totals = self.accelerator.reduce(
                    torch.stack([kl_tokens.sum().float(), mask.sum().float()]), reduction="sum")
                metrics["kl"].append(float(totals[0] / totals[1].clamp(min=1.0)))
        if values is not None:
            totals = self.accelerator.reduce(
                torch.stack([(values * mask).sum().float(), mask.sum().float()]), reduction="sum")
            metrics["values/mean"].append(float(totals[0] / totals[1].clamp(min=1.0)))
        if returns is not None:
            metrics["returns/mean"].append(float(masked_mean(returns.float(), global_mask.to(returns.device))))

    # -- loss ---------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        policy_term = super()._compute_loss if self.policy_objective is None else self._policy_loss
        if self.value_head is None or "returns" not in inputs:
            return policy_term(model, inputs)
        keep = inputs["completion_ids"].size(1)
        with capture_values(model, self.value_head, keep) as capture:
            loss = policy_term(model, inputs)
        values = capture.values()
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        v_loss = value_loss(values, inputs["returns"], mask, old_values=inputs["old_values"],
                            clip=self.value_clip)
        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.vf_coef * v_loss / normalizer
        self._metrics[mode]["value_loss"].append(self.accelerator.gather(v_loss.detach()).mean().item())
        if self.value_clip is not None:
            old = inputs["old_values"]
            clipped = ((values.detach() - old).abs() > self.value_clip).float()
            self._metrics[mode]["value_clip_fraction"].append(float(masked_mean(clipped, mask)))
        return loss

    def _loss_normaliser(self, inputs: dict[str, Any], mode: str) -> tuple[dict[str, Any], float]:
        """(keyword arguments for the policy loss, divisor of its result) from the loss's `agg`.

        ``token_mean``: ``norm_constant`` = TRL's dapo normaliser, the real tokens of the whole
        generation batch rescaled to one accumulation window (it already accounts for gradient
        accumulation: divisor 1). ``seq_mean_token_sum_norm``: ``norm_constant`` =
        ``max_completion_length`` (TRL's dr_grpo). Any other mode, a loss's own
        ``norm_constant``, or a loss without ``agg``: nothing passed, divided by the
        accumulation steps (TRL's grpo/bnpo). Equal to TRL's loss_type of the same aggregation.
        """
        agg = member(self.policy_objective, "policy_losses", "agg")
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if getattr(self.policy_objective, "norm_constant", None) is not None:
            return {}, accumulation
        if agg == "token_mean":
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # in eval the batch is neither split nor accumulated
                normaliser = (normaliser * self.current_gradient_accumulation_steps
                              / self.args.steps_per_generation)
            return {"norm_constant": normaliser}, 1.0
        if agg == "seq_mean_token_sum_norm":
            return {"norm_constant": float(self.max_completion_length)}, accumulation
        return {}, accumulation

    def _policy_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The configured policy loss on TRL's per-token log-probs, plus TRL's KL term (beta)."""
        from ..policy_objectives import AGG_MODES, aggregate

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _FORWARD_KEYS})
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps")
        mode = "train" if self.model.training else "eval"
        kwargs, divisor = self._loss_normaliser(inputs, mode)
        result = self.policy_objective(per_token_logps, old, inputs["advantages"], mask,
                                       ref_log_probs=ref, **kwargs)
        loss = result.loss
        metrics = self._metrics[mode]
        if self.beta != 0.0:  # TRL's k3 term, aggregated like the policy loss
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                old_lp = per_token_logps.detach() if old is None else old
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old_lp)
            agg = member(self.policy_objective, "policy_losses", "agg")
            agg = agg if agg in AGG_MODES else "token_mean"
            norm = kwargs.get("norm_constant", getattr(self.policy_objective, "norm_constant", None))
            norm = norm if agg in ("token_mean", "seq_mean_token_sum_norm") else None
            loss = loss + self.beta * aggregate(per_token_kl, mask.bool(), agg, norm_constant=norm)
            metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        if divisor != 1:
            loss = loss / divisor
        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        metrics["entropy"].append(self._global_masked_mean(entropies, mask))
        metrics["policy_loss/loss"].append(
            self.accelerator.gather(result.loss.detach().float().reshape(1)).nanmean().item())
        for key, value in result.metrics.items():
            local = torch.tensor([float(value)], dtype=torch.float32, device=per_token_logps.device)
            metrics[f"policy_loss/{key}"].append(self.accelerator.gather(local).nanmean().item())
        return loss

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `x` over the real tokens of every process (TRL's logging rule)."""
        totals = self.accelerator.reduce(torch.stack([(x.detach() * mask).sum().float(),
                                                      mask.sum().float()]), reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1.0))

    # -- checkpoints --------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.value_head is not None and state_dict is None and not hasattr(self.model, "peft_config"):
            # A full model's checkpoint stays a plain causal LM; the head is saved beside it.
            state_dict = {k: v for k, v in self.model.state_dict().items() if not k.startswith("v_head.")}
        super()._save(output_dir, state_dict=state_dict)
        if self.value_head is not None and self.args.should_save:
            self.value_head.save(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.value_head is not None and not self.value_head.load(resume_from_checkpoint):
            logger.warning("%s has no value head weights; the critic restarts from zero",
                           resume_from_checkpoint)


def _whiten(advantages: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero-mean, unit-std advantages over the real tokens (mask) or all entries."""
    if mask is None:
        mask = torch.ones_like(advantages)
    mask = mask.to(advantages.dtype)
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) * torch.rsqrt(var + 1e-8) * mask if advantages.dim() == 2 else \
        (advantages - mean) * torch.rsqrt(var + 1e-8)


def check_trainer_options(estimator: Any, *, critic: str, kl_penalty: str, kl_estimator: str,
                          vf_coef: float, value_clip: float | None, gamma: float, lam: float) -> None:
    """ConfigError for inconsistent trainer options (before any model is loaded)."""
    name = getattr(estimator, "name", type(estimator).__name__)
    if critic not in CRITICS:
        raise ConfigError(f"critic must be one of {', '.join(CRITICS)}, got {critic!r}")
    if getattr(estimator, "needs_values", False) and critic == "none":
        raise ConfigError(f"advantage estimator {name!r} needs values, but critic is 'none'; "
                          "use critic: value_head or a critic-free estimator (grpo, rloo, ...)")
    if kl_penalty not in KL_PENALTIES:
        raise ConfigError(f"kl_penalty must be one of {', '.join(KL_PENALTIES)}, got {kl_penalty!r}")
    if kl_estimator not in KL_KINDS:
        raise ConfigError(f"kl_estimator must be one of {', '.join(KL_KINDS)}, got {kl_estimator!r}")
    for label, value in (("vf_coef", vf_coef), ("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise ConfigError(f"{label} must be a finite number >= 0, got {value!r}")
    for label, value in (("gamma", gamma), ("lam", lam)):
        if value > 1:
            raise ConfigError(f"{label} must be in [0, 1], got {value!r}")
    if value_clip is not None and (isinstance(value_clip, bool) or not isinstance(value_clip, (int, float))
                                   or not value_clip > 0):
        raise ConfigError(f"value_clip must be a number > 0 or null, got {value_clip!r}")
