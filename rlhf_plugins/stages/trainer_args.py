"""Defaults every stage applies to its TRL config fields before building the config."""
from __future__ import annotations

from typing import Any


def device_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill CPU-friendly defaults into TRL/transformers training-argument fields (in place).

    On a machine without CUDA: no bf16 autocast (slow and lossy on CPU), no pinned memory, and
    no activation checkpointing (its extra forward costs a third more time on a CPU for little
    memory gain). Anything the user set explicitly is kept.
    """
    import torch

    if not torch.cuda.is_available():
        if "bf16" not in kwargs and "fp16" not in kwargs:
            kwargs["bf16"] = False
        kwargs.setdefault("dataloader_pin_memory", False)
        kwargs.setdefault("gradient_checkpointing", False)
    kwargs.setdefault("report_to", "none")
    return kwargs
