"""Rejection sampling: its settings (YAML fields of `rlhf-plugins sample`), file names and result.

Its prompts are loaded by :mod:`.prompts`, its components resolved by :mod:`.components`."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...config import build_dataclass, check_strings
from ...errors import ConfigError
from ...models import QuantSettings, check_dtype
from ..skeleton import read_stage_source
from ..training_settings import SourceSettings, check_positive_ints

BACKENDS = ("hf",)
#: refused with REMOVED_BACKEND's reason (docs/scaling.md, "vLLM")
REMOVED_BACKENDS = ("vllm", "auto")
REMOVED_BACKEND = ("backend: {} was removed: no test ever ran the vLLM generation path (vLLM does not "
                   "install on the CPU machines this project is tested on) and untested code is not a "
                   "feature; use backend: hf")
SUMMARY_FILE = "summary.json"
SELECTED = "selected"
ALL = "all"
HISTOGRAM_FILE = "rewards.png"
REWARD_MODEL_KEY = "reward_model"
#: columns every output row has; dataset columns with these names are not copied
RESERVED_COLUMNS = frozenset({"prompt_index", "completion_index", "prompt", "completion",
                              "reward", "rewards", "rank", "selected", "num_tokens",
                              "finish_reason", "provenance"})


@dataclass
class SamplingSettings(SourceSettings):
    """A rejection-sampling / best-of-N config (YAML fields of `rlhf-plugins sample`); the policy
    and prompt source fields (model, dataset, template, overwrite, ...) are :class:`SourceSettings`'."""

    #: column holding the prompt: a message list (conversational) or a string (one user turn)
    prompt_field: str = "prompt"
    #: use at most this many prompts (synthetic: how many problems; default 64)
    num_prompts: int | None = None
    #: N, completions per prompt
    num_samples: int = 4
    max_new_tokens: int = 128
    #: a regular expression that ends a completion once its text matches (e.g. the synthetic
    #: task's answer line ``The answer is\s*\S+?\.(?=\s)``); the text is kept up to the match
    #: end. None: run to an end-of-turn token or `max_new_tokens`.
    stop_pattern: str | None = None
    #: 0 = greedy decoding
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    #: sequences per `generate` call
    batch_size: int = 16
    #: prompts per cache chunk (the unit of resume)
    chunk_size: int = 8
    #: "hf" (transformers generate), the only backend; "vllm" and "auto" were removed
    backend: str = "hf"
    dtype: str | None = None
    quantization: QuantSettings | None = None
    #: reward function specs: names, or {"name", "weight", **options}
    reward_functions: list[Any] = field(default_factory=list)
    #: a reward model directory: `rlhf-plugins rm` output, or any transformers
    #: sequence-classification reward model (e.g. TRL RewardTrainer's); loaded as trained
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    reward_batch_size: int = 16
    #: a selection rule component name and its parameters
    selection: str = "top_per_prompt"
    selection_params: dict[str, Any] = field(default_factory=dict)
    #: also write every completion (all.jsonl, all/)
    save_all: bool = True
    #: cache generations/scores per chunk (resume); false recomputes everything
    cache: bool = True
    #: fine-tune on the selection with the SFT stage after writing it
    finetune: bool = False
    #: when the rule selects nothing: "error", or "skip" the fine-tuning (policy unchanged)
    on_empty_selection: str = "error"
    #: SFT stage config (SFTSettings + TRL SFTConfig fields); model/dataset/template default
    #: to the policy, the selection and `template`
    sft: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "dtype")
        if self.on_empty_selection not in ("error", "skip"):
            raise ConfigError(f"on_empty_selection: expected 'error' or 'skip', got "
                              f"{self.on_empty_selection!r}")
        if isinstance(self.quantization, Mapping):
            self.quantization = build_dataclass(QuantSettings, self.quantization, "quantization")
        elif self.quantization is True:
            self.quantization = QuantSettings()
        elif self.quantization is False:
            self.quantization = None
        _positive_int(self, "num_samples", "max_new_tokens", "batch_size", "chunk_size",
                      "reward_batch_size")
        if self.stop_pattern is not None:
            import re

            if not isinstance(self.stop_pattern, str) or not self.stop_pattern:
                raise ConfigError(f"stop_pattern: expected a regular expression, got {self.stop_pattern!r}")
            try:
                re.compile(self.stop_pattern)
            except re.error as exc:
                raise ConfigError(f"stop_pattern: not a valid regular expression: {exc}") from None
        check_positive_ints(self, "num_prompts")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed: expected an integer, got {self.seed!r}")
        if _not_number(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if _not_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if _not_number(self.reward_model_weight):
            raise ConfigError(f"reward_model_weight: expected a number, got {self.reward_model_weight!r}")
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if self.backend in REMOVED_BACKENDS:
            raise ConfigError(REMOVED_BACKEND.format(self.backend))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        super().__post_init__()
        check_strings(self, ("template", "selection", "prompt_field"))
        if not isinstance(self.reward_functions, (list, tuple)):
            self.reward_functions = [self.reward_functions]
        self.reward_functions = list(self.reward_functions)
        if not isinstance(self.selection_params, Mapping):
            raise ConfigError(f"selection_params: expected a mapping, got {self.selection_params!r}")
        self.selection_params = dict(self.selection_params)
        if self.sft is None:
            self.sft = {}
        if not isinstance(self.sft, Mapping):
            raise ConfigError(f"sft: expected a mapping of SFT settings, got {self.sft!r}")
        self.sft = dict(self.sft)


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


@dataclass
class SamplingResult:
    """What a sampling run wrote: the folder, the summary, and the SFT result when fine-tuned."""

    output_dir: Path
    summary: dict[str, Any]
    selected: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    sft: Any = None
    #: the output already held a finished run of this config: nothing was generated
    up_to_date: bool = False

    @property
    def selected_path(self) -> Path:
        """The selected completions as JSONL."""
        return self.output_dir / f"{SELECTED}.jsonl"


def load_sampling_config(source: str | os.PathLike | Mapping[str, Any],
                         overrides: Sequence[str] | Mapping[str, Any] | None = None,
                         output_dir: str | os.PathLike | None = None,
                         ) -> tuple[SamplingSettings, Path]:
    """Read a sampling YAML (or mapping) + `key=value` overrides -> (settings, output dir)."""
    data, where, out = read_stage_source(source, overrides, output_dir)
    return build_dataclass(SamplingSettings, data, where), Path(out)
