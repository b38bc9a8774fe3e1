"""The critic of PPO as a value head on the policy's last hidden state (shared backbone).

The head is a linear map ``hidden -> 1`` applied at every completion position. It reads the
hidden states of the forward passes the trainer already runs: :func:`capture_values` hooks the
causal LM's transformer body (the module TRL's fused LM head calls), so computing values needs
no extra backbone pass when a policy forward happens anyway (the loss), and never copies the
base weights (4-bit or not).

Position convention: the log-probability of completion token ``t`` comes from the hidden state
at the position before it; the value ``V(s_t)`` of the state in which token ``t`` is chosen is
read from the same position: ``values = head(hidden[:, -T-1:-1])`` for ``T`` completion tokens.

At rollout time the same positions are the last position of every forward ``generate`` runs
(the prefill's last prompt token, then each fed-back sampled token), so
:class:`GenerationValueCapture` reads the rollout's values from the sampler's own forwards:
no extra pass over the generated batch.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ...cache import atomic_write_bytes
from ...models import backbone_of, hidden_size_of, unwrap

__all__ = ["ValueHead", "ValueCapture", "GenerationValueCapture", "backbone_of", "capture_values",
           "capture_generation_values", "hidden_size_of", "unwrap"]

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``V(s) = w . h + b`` on the last hidden state (float32; zero-initialised: V = 0 at start).

    Zero initialisation keeps the shared backbone untouched by the value loss on the first step
    (its gradient w.r.t. the hidden states is ``w = 0``) and starts every value at 0.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Values [B, T] for hidden states [B, T, H]."""
        weight = self.summary.weight
        return self.summary(hidden_states.to(device=weight.device, dtype=weight.dtype)).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        """Write the head's weights to ``directory/value_head.safetensors`` (atomically)."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return atomic_write_bytes(Path(directory) / VALUE_HEAD_FILE, save(state))

    def load(self, directory: str | Path) -> bool:
        """Load weights saved by :meth:`save` when ``directory`` has them; return whether it did."""
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            return False
        state = load_file(str(path), device=str(self.summary.weight.device))
        self.load_state_dict(state)
        return True


class ValueCapture:
    """Collects ``head(hidden[:, -T-1:-1])`` from every backbone forward while active."""

    def __init__(self, head: nn.Module, completion_length: int) -> None:
        self.head = head
        self.completion_length = completion_length
        self.chunks: list[torch.Tensor] = []

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the backbone."""
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        t = self.completion_length
        if hidden.size(1) <= t:
            raise RuntimeError(f"the transformer body returned {hidden.size(1)} positions for {t} "
                               "completion tokens: the value head needs the whole prompt + completion")
        self.chunks.append(self.head(hidden[:, -t - 1:-1]))

    def values(self) -> torch.Tensor:
        """Values [B, T] of all captured forwards, concatenated along the batch."""
        if not self.chunks:
            raise RuntimeError("no backbone forward was captured: the model's transformer body "
                               "(backbone_of, transformers' `base_model`) was not called; TRL's fused "
                               "LM head must run it for the value head to read its hidden states")
        return torch.cat(self.chunks, dim=0)


@contextlib.contextmanager
def capture_values(model: nn.Module, head: nn.Module, completion_length: int) -> Iterator[ValueCapture]:
    """Within the block, every forward of `model`'s backbone also computes values with `head`."""
    capture = ValueCapture(head, completion_length)
    handle = backbone_of(model).register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()


class GenerationValueCapture:
    """Values of the states a KV-cached ``generate`` visits, one per forward (= per new token).

    Forward ``k`` of generation (the prefill for ``k = 0``) ends at the position whose hidden
    state chooses completion token ``k``: ``head(hidden[:, -1])`` of that forward is ``V(s_k)``,
    the same number :class:`ValueCapture` reads from a full forward over prompt + completion.
    Anything else (a chunked prefill, a change of batch size) marks the capture unusable, and
    the caller falls back to a forward pass.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.steps: list[torch.Tensor] = []
        self.usable = True

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the backbone."""
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if self.steps and (hidden.size(1) != 1 or hidden.size(0) != self.steps[0].size(0)):
            self.usable = False
        self.steps.append(self.head(hidden[:, -1]))

    def values(self, rows: int, length: int) -> torch.Tensor | None:
        """Values [rows, length] (zero beyond the generated length), or None when unusable."""
        if not self.usable or not self.steps or self.steps[0].size(0) != rows:
            return None
        values = torch.stack(self.steps[:length], dim=1)
        if values.size(1) < length:
            values = torch.nn.functional.pad(values, (0, length - values.size(1)))
        return values


@contextlib.contextmanager
def capture_generation_values(model: nn.Module, head: nn.Module) -> Iterator[GenerationValueCapture]:
    """Within the block, every forward of `model`'s backbone records ``head`` at its last position."""
    capture = GenerationValueCapture(head)
    handle = backbone_of(model).register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()
