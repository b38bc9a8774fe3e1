"""An example third-party pipeline stage: `policy_stats` counts the parameters of the policy it
is handed and writes them to `policy_stats.json`.

It shows the whole `Stage` contract on something that runs in a second: a settings class (its
YAML section; every field has a default, so an empty section works), `defaults` from the
pipeline (the incoming policy), and `run`, which returns what later stages consume (here:
nothing; `evaluate=False` tells the pipeline there is no new policy to evaluate). It reads
safetensors headers only, so it imports no torch.

In a pipeline YAML::

    stages: [sft, policy_stats]
    policy_stats: {}          # optional: all defaults
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_plugins import ConfigError, hookimpl
from rlhf_plugins.sdk import Stage, StageContext, StageOutputs, StageResult

#: bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class PolicyStatsSettings:
    """The `policy_stats:` section."""

    #: the model directory to count (the pipeline fills in the incoming policy)
    model: str | None = None
    #: the file written into the stage's output directory
    output_file: str = "policy_stats.json"

    def __post_init__(self) -> None:
        if not isinstance(self.output_file, str) or not self.output_file or "/" in self.output_file:
            raise ConfigError(f"output_file: expected a plain file name, got {self.output_file!r}")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def count_parameters(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Parameters, tensors and bytes of every .safetensors file in `model_dir`, by dtype."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"policy_stats: no .safetensors file in {model_dir}")
    by_dtype: dict[str, int] = {}
    tensors = total_bytes = 0
    for file in files:
        for tensor in safetensors_header(file).values():
            n = 1
            for dim in tensor["shape"]:
                n *= dim
            by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + n
            tensors += 1
            total_bytes += n * DTYPE_BYTES.get(tensor["dtype"], 0)
    return {"parameters": sum(by_dtype.values()), "tensors": tensors, "bytes": total_bytes,
            "by_dtype": by_dtype, "files": [f.name for f in files]}


class PolicyStatsStage(Stage):
    """Counts the incoming policy's parameters; trains nothing."""

    name = "policy_stats"
    description = "count the incoming policy's parameters (example stage: no training)"
    consumes = ("policy",)
    produces = ()

    def settings_class(self) -> type:
        return PolicyStatsSettings

    def defaults(self, ctx: StageContext) -> dict[str, Any]:
        return {"model": ctx.policy}

    def run(self, settings: PolicyStatsSettings, trl_kwargs: dict[str, Any], output_dir: Path,
            ctx: StageContext) -> StageResult:
        stats = count_parameters(settings.model)
        target = Path(output_dir) / settings.output_file
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps({"model": settings.model, **stats}, indent=2))
        os.replace(tmp, target)  # never half-written
        metrics = {k: v for k, v in stats.items() if isinstance(v, int)}
        return StageResult(StageOutputs(evaluate=False), metrics)


@hookimpl
def register_stages(register):
    register(PolicyStatsStage())
