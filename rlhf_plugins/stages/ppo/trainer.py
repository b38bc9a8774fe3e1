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
  pass over the batch; the policy's log-probs the KL in the reward needs are those of TRL's
  own rollout forward when it runs one (``old_per_token_logps``: rollouts reused). Where that
  cannot work (vLLM, continuous batching, tool loops, a chunked prefill, no old log-probs),
  one no-grad policy forward computes them instead.
- ``_compute_loss``: TRL's loss - or, with ``policy_loss``, the plugin loss on the per-token
  log-probs of TRL's own forward (``_get_per_token_logps_and_entropies``), TRL's normaliser
  passed as ``norm_constant`` and TRL's KL term added - plus ``vf_coef * value_loss``
  (PPO-clipped) when the batch has value targets; the values come from the same forward pass
  (a hook on the backbone).
- ``_save`` / ``_load_from_checkpoint``: the value head travels with checkpoints.

Where the pieces live: component resolution and option checks in ``options.py`` (no torch),
the reward side of the rollout (per-function rewards, step rewards on tokens, the greedy
baseline, the group filter) in the ``RolloutRewards`` mixin (``rollout_rewards.py``), and
the plugin policy loss in the ``PluginPolicyLoss`` mixin (``loss.py``).

The trainer never looks at a component's name: it asks the estimator's capabilities
(:func:`rlhf_plugins.protocols.member`) and the loss's ``agg``, and calls them.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import torch
from torch import nn
from trl import GRPOTrainer

from ...advantage_contract import call_estimator
from ...errors import ConfigError
from ...losses import kl_estimate, masked_mean, value_loss
from ...models import hidden_size_of, unwrap
from ...protocols import member
from .config import PolicyOptimizationConfig
from .kl import AdaptiveKLController, make_kl_controller
from .loss import FORWARD_KEYS, PluginPolicyLoss
from .options import validated_reward_function
from .rollout_rewards import RolloutRewards
from .value_head import (GenerationValueCapture, ValueHead, capture_generation_values,
                         capture_values)

logger = logging.getLogger(__name__)

__all__ = ["PolicyOptimizationTrainer"]


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


class PolicyOptimizationTrainer(RolloutRewards, PluginPolicyLoss, GRPOTrainer):
    """TRL's GRPOTrainer with a pluggable advantage estimator, a value head and KL shaping.

    Its options are fields of ``args``, a :class:`PolicyOptimizationConfig` (TRL's
    ``GRPOConfig`` plus the estimator, critic, KL placement, whitening, policy loss and group
    filter, checked once in its ``__post_init__``); every other argument is TRL's GRPOTrainer's.
    """

    def __init__(self, model: Any, reward_funcs: Any = None,
                 args: PolicyOptimizationConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(args, PolicyOptimizationConfig):
            raise ConfigError("PolicyOptimizationTrainer needs `args`: a PolicyOptimizationConfig "
                              f"(TRL's GRPOConfig plus our options), got {type(args).__name__}")
        self.estimator, self.policy_objective, self.group_filter_rule = args.components()
        self.needs_values = bool(member(self.estimator, "advantage_estimators", "needs_values"))
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
        self.gamma, self.lam = float(args.gamma), float(args.lam)
        self.vf_coef = float(args.vf_coef)
        self.value_clip = None if args.value_clip is None else float(args.value_clip)
        self.kl_penalty, self.kl_estimator = args.kl_penalty, args.kl_estimator
        self.whiten_advantages = bool(args.whiten_advantages)
        self.kl_controller = make_kl_controller(float(args.beta), args.kl_target, args.kl_horizon)
        kl_penalty = args.kl_penalty

        if reward_funcs is not None and args.validate_rewards:
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

        What the rollout already computed is used as it is: ``values`` read during generation,
        and the policy's log-probs of TRL's own rollout forward (``old_per_token_logps``, there
        whenever rollouts are reused). Only what is still missing costs a no-grad policy
        forward (log-probs and values together); the reference's log-probs, when TRL did not
        compute them (KL in the reward), one reference forward.
        """
        from trl.models.utils import disable_gradient_checkpointing

        stats: dict[str, Any] = {"values": values, "logps": None, "ref_logps": None}
        if need_logps:
            stats["logps"] = output.get("old_per_token_logps")
            stats["ref_logps"] = output.get("ref_per_token_logps")
        policy_forward = (self.needs_values and values is None) or (need_logps and stats["logps"] is None)
        if not policy_forward and not (need_logps and stats["ref_logps"] is None):
            return stats
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        mode = "train" if self.model.training else "eval"
        batch_size = (self.args.per_device_train_batch_size if mode == "train"
                      else self.args.per_device_eval_batch_size)
        forward = {k: output[k] for k in FORWARD_KEYS if k in output}
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if policy_forward:
                critic = self.value_head is not None
                with (capture_values(self.model, self.value_head, keep) if critic
                      else contextlib.nullcontext()) as capture:
                    stats["logps"] = self._get_per_token_logps_and_entropies(
                        self.model, ids, attention, keep, batch_size=batch_size, **forward)[0]
                if critic:
                    stats["values"] = capture.values().float()
            if need_logps and stats["ref_logps"] is None:
                stats["ref_logps"] = self._reference_logps(ids, attention, keep, batch_size, forward)
        if not need_logps:
            stats["logps"] = None
        return stats

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        kl_coef = float(self.kl_controller.value)  # updated only at the end of this method
        adaptive = isinstance(self.kl_controller, AdaptiveKLController)
        kl_in_reward = self.kl_penalty == "reward" and kl_coef != 0.0
        need_logps = kl_in_reward or (adaptive and kl_coef != 0.0)
        # Values are read during generation (with the log-probs of TRL's own rollout forward,
        # no forward of ours is needed for the policy; see _rollout_statistics).
        collect = self.value_head is not None
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
        from ...advantage_types import Advantages

        device = mask.device
        if keep is None or bool(keep.all()):
            result = call_estimator(self.estimator, rewards, num_generations=num_generations, mask=mask,
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
        result = call_estimator(self.estimator, rewards[rows], num_generations=num_generations,
                                mask=mask[rows], values=None if values is None else values[rows],
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

