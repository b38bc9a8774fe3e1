"""The reward model: a causal-LM backbone + a reward head component on its last hidden state.

:class:`RewardModel` runs the backbone's transformer body (no LM head: no vocabulary logits)
with position ids derived from the attention mask (left padding is correct too) and applies
the head module to the last hidden state. Saving and loading it: :mod:`.artifact`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ...models import backbone_of, hidden_size_of
from .scoring import score


class RewardModel(nn.Module):
    """A causal-LM backbone (full, LoRA or 4-bit) and a reward head module on its last hidden state."""

    def __init__(self, backbone: Any, head: Any, head_module: nn.Module | None = None, *,
                 tokenizer: Any = None, template: Any = None, template_name: str | None = None,
                 base_model: str | None = None, adapter_name: str | None = None,
                 head_name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_module = head_module if head_module is not None else head.build_module(
            hidden_size_of(backbone))
        self.head = head
        #: the name the head is registered under (saved, so `load_reward_model` finds it again)
        self.head_name = head_name or getattr(head, "name", None) or type(head).__name__
        self.tokenizer = tokenizer
        self.template = template
        self.template_name = template_name or getattr(template, "name", None)
        self.base_model = base_model
        #: the PEFT adapter this model scores with (None: whatever is active)
        self.adapter_name = adapter_name
        #: score at the last token that is not this id (transformers' sequence-classification
        #: rule, for reward models loaded from other trainers); None: the last attended token
        self.score_pad_token_id: int | None = None
        #: the quantization of the base (QuantSettings fields), recorded in reward_model.json
        self.quantization: dict[str, Any] | None = None
        try:
            device = next(p.device for p in backbone.parameters())
            self.head_module.to(device)
        except StopIteration:  # pragma: no cover
            pass

    # -- Trainer integration ---------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The backbone's config (Trainer and PEFT utilities read it)."""
        return self.backbone.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      **kwargs: Any) -> None:
        """Enable (non-reentrant by default) activation checkpointing on the backbone."""
        ckpt = dict(gradient_checkpointing_kwargs or {})
        ckpt.setdefault("use_reentrant", False)
        target = self.backbone
        if hasattr(target, "gradient_checkpointing_enable"):
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        """Disable activation checkpointing on the backbone."""
        if hasattr(self.backbone, "gradient_checkpointing_disable"):
            self.backbone.gradient_checkpointing_disable()

    @property
    def is_peft(self) -> bool:
        """True when the backbone is a PEFT model (the artifact is an adapter)."""
        return hasattr(self.backbone, "peft_config")

    # -- forward -----------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Last hidden state [B, T, H]; position ids count attended tokens (padding-side safe)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = backbone_of(self.backbone)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        """Head outputs at every position ([B, T] or [B, T, C])."""
        with self.using_adapter():
            return self.head_module(self.hidden_states(input_ids, attention_mask))

    @contextlib.contextmanager
    def using_adapter(self) -> Iterator[None]:
        """Activate `adapter_name` for the duration (restoring the previous adapter and grads)."""
        name = self.adapter_name
        if name is None or not self.is_peft or self.backbone.active_adapter == name:
            yield
            return
        previous = self.backbone.active_adapter
        flags = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        self.backbone.set_adapter(name)
        try:
            yield
        finally:
            self.backbone.set_adapter(previous)
            for n, p in self.backbone.named_parameters():  # set_adapter changes requires_grad
                if n in flags:
                    p.requires_grad_(flags[n])

    @torch.no_grad()
    def scores_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **batch: Any) -> torch.Tensor:
        """One score per sequence (the head's `sequence_scores`), without gradients."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        from .scoring import scoring_batch

        outputs = self(input_ids=input_ids, attention_mask=attention_mask)
        return self.head.sequence_scores(outputs, scoring_batch(self, {
            "input_ids": input_ids, "attention_mask": attention_mask, **batch}))

    # -- scoring convenience ------------------------------------------------------------------
    def as_reward_function(self, **score_kwargs: Any) -> Any:
        """A TRL-style reward function ``f(prompts, completions, **kw) -> list[float]``."""
        def reward_model_score(prompts: list, completions: list, **_: Any) -> list[float]:
            rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
            return score(self, rows, progress=False, **score_kwargs)

        reward_model_score.__name__ = f"reward_model_{self.head_name}"
        return reward_model_score
