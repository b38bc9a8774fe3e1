"""Torch modules for reward heads: a per-position scalar (with a score offset) and a classifier.

This module imports torch at the top: import it inside ``build_module`` (as the built-in heads
do), never at a plugin's import time, so listing plugins stays light.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScalarHead", "ClassHead"]


class ScalarHead(nn.Module):
    """Linear hidden -> 1 at every position, minus a stored score offset."""

    def __init__(self, hidden_size: int, bias: bool = True, zero_init: bool = False) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=bias)
        if zero_init:  # every score 0 before training: an untrained head ranks nothing
            nn.init.zeros_(self.score.weight)
            if bias:
                nn.init.zeros_(self.score.bias)
        # InstructGPT-style normalisation: subtracted from scores, never trained.
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores [B, T] from hidden states [B, T, H]."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1) - self.offset


class ClassHead(nn.Module):
    """Linear hidden -> num_classes at every position."""

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, C] from hidden states [B, T, H]."""
        return self.score(hidden.to(self.score.weight.dtype))
