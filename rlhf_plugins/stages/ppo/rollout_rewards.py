"""Rewards inside the PPO/GRPO trainer's rollout (a mixin of the trainer).

TRL's ``_calculate_rewards`` runs unchanged; this mixin keeps what it computed per function,
places step rewards on tokens (dense/PRM rewards), scores one greedy completion per prompt for
estimators that ask for a greedy baseline, and applies the group filter.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from trl import GRPOTrainer

from ...protocols import member

logger = logging.getLogger("rlhf_plugins.stages.ppo.trainer")


def weighted_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] weighted sum of [B, F] per-function rewards, TRL's nansum rule; a row no function
    scored is NaN (unscorable)."""
    total = (per_func * weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = torch.nan
    return total


class RolloutRewards:
    """Mixin for :class:`~rlhf_plugins.stages.ppo.trainer.PolicyOptimizationTrainer`."""

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
        from ...step_rewards import batch_token_rewards, is_step_rewards

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
        return weighted_rewards(per_func, self.reward_weights)

    def _group_keep(self, rewards: torch.Tensor, num_generations: int, mode: str) -> torch.Tensor | None:
        """[B_global] bool: the completions of the groups the group filter keeps (None: no filter)."""
        if self.group_filter_rule is None:
            return None
        from ...group_filters import completion_keep_mask, group_filter_metrics, group_keep_mask

        keep = group_keep_mask(self.group_filter_rule, rewards.detach().cpu().tolist(), num_generations)
        for key, value in group_filter_metrics(keep).items():
            self._metrics[mode][f"group_filter/{key}"].append(value)
        return torch.tensor(completion_keep_mask(keep, num_generations), dtype=torch.bool,
                            device=rewards.device)

    def _total_rewards(self) -> torch.Tensor:
        """Weighted rewards of the whole (gathered) batch, TRL's rule; unscorable rows NaN."""
        return weighted_rewards(self._last_rewards_per_func, self.reward_weights)
