"""Defaults every stage applies to its TRL config fields before building the config."""
from __future__ import annotations

from typing import Any


def device_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill CPU-friendly defaults into TRL/transformers training-argument fields (in place).

    On a machine without CUDA: no bf16 autocast unless asked for (a CPU without bf16 matmul
    units runs it slower), no pinned memory, and no activation checkpointing (its extra forward
    costs a third more time on a CPU for little memory gain). `bf16: true` on a machine without
    a bf16 GPU trains on the CPU with bf16 autocast (transformers' `use_cpu`) instead of
    failing: weights and LoRA adapters stay float32, the matmuls run in bf16 (~1.5x faster
    steps on an AVX512-BF16 CPU). Anything the user set explicitly is kept.
    """
    import torch

    if not torch.cuda.is_available():
        if "bf16" not in kwargs and "fp16" not in kwargs:
            kwargs["bf16"] = False
        if kwargs.get("bf16"):
            from transformers.utils import is_torch_bf16_gpu_available

            if not is_torch_bf16_gpu_available():
                kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("dataloader_pin_memory", False)
        kwargs.setdefault("gradient_checkpointing", False)
    kwargs.setdefault("report_to", "none")
    return kwargs
