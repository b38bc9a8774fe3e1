"""Rejection sampling and best-of-N: generate N completions per prompt, score, select, write, fine-tune.

1. **Generate** (:mod:`.generation`): prompts rendered by the chat template component with
   ``add_generation_prompt=True``; HF ``generate`` (or vLLM when installed and asked for),
   stopping at the template's end-of-turn token; one seeded random stream per completion.
2. **Score**: registered reward functions (weighted sum, :func:`~rlhf_plugins.rewarding.
   call_reward_functions`) and/or a saved reward model (length-sorted
   :func:`~rlhf_plugins.stages.reward_model.score`), added together with
   ``reward_model_weight``. A completion no scorer applies to gets NaN.
3. **Select** with a selection rule component by name (NaN is never selected).
4. **Write** ``selected.jsonl`` + ``selected/`` (HF ``datasets``), optionally ``all.jsonl`` +
   ``all/``, ``rewards.png`` (histogram before/after selection) and, last, ``summary.json``.
5. Optionally **fine-tune** on the selection with the SFT stage (``<output_dir>/sft``).

Caching and resume: prompts are processed in fixed chunks of ``chunk_size`` prompts. Each
chunk's generations and scores are cached under ``<output_dir>/cache/`` as JSON files named by
a hash of everything they depend on (model files, template, prompt token ids, sampler
parameters; for scores also the scorers and the rows' columns), written atomically. A rerun
skips every chunk already cached, so an interrupted run resumes without regenerating finished
prompts and - per-completion seeds - produces the same dataset as an uninterrupted run.
``summary.json`` is deleted when a run starts and written last: a folder with a summary is a
complete run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..cache import (JsonCache, atomic_write_bytes, atomic_write_dir, atomic_write_json,
                     atomic_write_jsonl, model_fingerprint)
from ..config import build_dataclass, config_hash
from ..errors import ConfigError, DataError, PluginError, RlhfPluginsError
from ..models import QuantSettings

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
BACKENDS = ("hf", "vllm", "auto")
SUMMARY_FILE = "summary.json"
SELECTED = "selected"
ALL = "all"
HISTOGRAM_FILE = "rewards.png"
REWARD_MODEL_KEY = "reward_model"
#: columns every output row has; dataset columns with these names are not copied
RESERVED_COLUMNS = frozenset({"prompt_index", "completion_index", "prompt", "completion",
                              "reward", "rewards", "rank", "selected", "num_tokens",
                              "finish_reason", "provenance"})
_CACHE_VERSION = 1


@dataclass
class SamplingSettings:
    """A rejection-sampling / best-of-N config (YAML fields of `rlhf-plugins sample`)."""

    #: policy: HF model dir, PEFT adapter dir, hub id, .gguf, or None/"default" (embedded SmolLM2)
    model: str | None = None
    #: JSONL/JSON file, saved HF dataset dir, or "synthetic" (the built-in verifiable task)
    dataset: str = SYNTHETIC
    dataset_split: str = "train"
    #: column holding the prompt: a message list (conversational) or a string (one user turn)
    prompt_field: str = "prompt"
    #: use at most this many prompts (synthetic: how many problems; default 64)
    num_prompts: int | None = None
    dataset_seed: int = 0
    template: str = "chatml"
    #: N, completions per prompt
    num_samples: int = 4
    max_new_tokens: int = 128
    #: 0 = greedy decoding
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    #: sequences per `generate` call
    batch_size: int = 16
    #: prompts per cache chunk (the unit of resume)
    chunk_size: int = 8
    #: "hf" (transformers generate), "vllm" (must be installed), "auto" (vllm if installed)
    backend: str = "hf"
    dtype: str | None = None
    quantization: QuantSettings | None = None
    #: reward function specs: names, or {"name", "weight", **options}
    reward_functions: list[Any] = field(default_factory=list)
    #: a saved reward model directory (rlhf-plugins reward-model output)
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
        if self.num_prompts is not None:
            _positive_int(self, "num_prompts")
        for name in ("seed", "dataset_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if _not_number(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if _not_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if _not_number(self.reward_model_weight):
            raise ConfigError(f"reward_model_weight: expected a number, got {self.reward_model_weight!r}")
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("dataset", "template", "selection", "prompt_field", "dataset_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
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

    @property
    def selected_path(self) -> Path:
        """The selected completions as JSONL."""
        return self.output_dir / f"{SELECTED}.jsonl"


# --------------------------------------------------------------------------------------------
# Config and data
# --------------------------------------------------------------------------------------------

def load_sampling_config(source: str | os.PathLike | Mapping[str, Any],
                         overrides: Sequence[str] | Mapping[str, Any] | None = None,
                         output_dir: str | os.PathLike | None = None,
                         ) -> tuple[SamplingSettings, Path]:
    """Read a sampling YAML (or mapping) + `key=value` overrides -> (settings, output dir)."""
    from .sft import read_stage_source

    data, where, out = read_stage_source(source, overrides, output_dir)
    return build_dataclass(SamplingSettings, data, where), Path(out)


def _read_rows_file(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc}") from None
    return rows


def load_prompt_rows(settings: SamplingSettings) -> tuple[list[dict[str, Any]], str]:
    """The prompt rows (each with a conversational `prompt`) and a label naming their source."""
    source, split = settings.dataset, settings.dataset_split
    if source == SYNTHETIC:
        from ..data import synth

        rows = synth.rl_rows(settings.num_prompts or 64, seed=settings.dataset_seed, split=split)
        label = f"synthetic[{split}]"
    else:
        path = Path(source).expanduser()
        if path.is_file():
            rows, label = _read_rows_file(path), str(path)
        elif path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except (OSError, ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"dataset: {path}: not a saved HF dataset: "
                                  f"{str(exc).splitlines()[0]}") from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"dataset: {path}: no split {split!r} (has {list(ds)})")
                ds = ds[split]
            rows, label = [dict(r) for r in ds], f"{path}[{split}]"
        else:
            raise ConfigError(f"dataset: {source}: no such file or directory")
        if settings.num_prompts is not None:
            rows = rows[:settings.num_prompts]
    if not rows:
        raise DataError(f"dataset: {label}: no rows")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"dataset {label}: row {i}: expected an object, got {type(row).__name__}")
        if settings.prompt_field not in row:
            raise DataError(f"dataset {label}: row {i}: missing field {settings.prompt_field!r}")
        prompt = row[settings.prompt_field]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = _check_prompt(prompt, i, label)
        extra = {k: v for k, v in row.items() if k != settings.prompt_field}
        out.append({"prompt": prompt, **extra})
    return out, label


def _check_prompt(prompt: Any, i: int, label: str) -> list[dict]:
    from ..conversation import validate_messages

    try:
        messages = validate_messages(prompt, row=i)
    except DataError as exc:
        raise DataError(f"dataset {label}: {exc}") from None
    if messages[-1].get("role") == "assistant":
        raise DataError(f"dataset {label}: row {i}: the prompt ends with an assistant message")
    return [dict(m) for m in messages]


# --------------------------------------------------------------------------------------------
# Components (resolved and validated before any model loads)
# --------------------------------------------------------------------------------------------

@dataclass
class _Components:
    template: Any
    funcs: list[Any]
    weights: list[float]
    function_specs: list[Any]
    rule: Any
    reward_model_dir: Path | None
    sft: tuple[Any, dict[str, Any], Path] | None


def _spec_repr(spec: Any) -> Any:
    """A JSON-able description of a reward function spec (for hashes and provenance)."""
    if isinstance(spec, (str, int, float)) or spec is None:
        return spec
    if isinstance(spec, Mapping):
        return {str(k): _spec_repr(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_spec_repr(v) for v in spec]
    from ..rewarding import reward_function_name

    return f"<callable {reward_function_name(spec)}>"


def resolve_components(settings: SamplingSettings, num_prompts: int, output_dir: Path,
                       policy_ref: str | None = None) -> _Components:
    """Look up the template, reward functions, selection rule, reward model and SFT config.

    Unknown names, bad rule parameters (the rule is run once on a dummy reward matrix of the
    run's shape), a missing reward model and a bad SFT section fail here, before loading models.
    """
    from .. import registry
    from ..rewarding import resolve_reward_functions

    if not settings.reward_functions and not settings.reward_model:
        raise ConfigError("no scorer: set `reward_functions` (names) and/or `reward_model` "
                          "(a saved reward model directory)")
    reg = registry()
    template = reg.chat_templates.get(settings.template)
    funcs, weights = resolve_reward_functions(settings.reward_functions) \
        if settings.reward_functions else ([], [])
    rule = reg.selection_rules.get(settings.selection, **settings.selection_params) \
        if settings.selection_params else reg.selection_rules.get(settings.selection)
    dummy = [[0.0] * settings.num_samples for _ in range(num_prompts)]
    try:
        rule.select(dummy)
    except RlhfPluginsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party rule may dislike the dummy input
        logger.warning("selection rule %r failed on a dummy reward matrix (%s: %s); "
                       "continuing", settings.selection, type(exc).__name__, exc)
    rm_dir = None
    if settings.reward_model:
        rm_dir = Path(settings.reward_model).expanduser()
        if not (rm_dir / "reward_model.json").is_file():
            raise ConfigError(f"reward_model: {rm_dir}: not a saved reward model "
                              "(no reward_model.json)")
    if settings.backend == "vllm":
        from .generation import vllm_available

        if not vllm_available():
            raise ConfigError("backend: vllm is not installed (use backend: hf)")
    sft = None
    if settings.finetune:
        sft = _sft_settings(settings, output_dir, policy_ref)
    return _Components(template, funcs, weights, [_spec_repr(s) for s in settings.reward_functions],
                       rule, rm_dir, sft)


def _sft_settings(settings: SamplingSettings, output_dir: Path,
                  policy_ref: str | None) -> tuple[Any, dict[str, Any], Path]:
    from trl import SFTConfig

    from ..config import load_stage_config
    from .sft import SFTSettings

    data = dict(settings.sft)
    out = Path(data.pop("output_dir", None) or output_dir / "sft")
    base = {"model": policy_ref if policy_ref is not None else settings.model,
            "dataset": str(output_dir / f"{SELECTED}.jsonl"), "template": settings.template}
    ours, trl_kwargs = load_stage_config({**base, **data}, SFTSettings, SFTConfig, where="sft")
    return ours, trl_kwargs, out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            for v in values]


def _none_to_nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _mean(values: Sequence[float]) -> float | None:
    good = [v for v in values if not math.isnan(v)]
    return math.fsum(good) / len(good) if good else None


def _std(values: Sequence[float]) -> float | None:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return None
    m = math.fsum(good) / len(good)
    return math.sqrt(math.fsum((v - m) ** 2 for v in good) / len(good))


def _ranks(rewards: Sequence[float]) -> list[int | None]:
    """1 = best within the prompt; ties go to the lower completion index; NaN gets None."""
    order = sorted((j for j, r in enumerate(rewards) if not math.isnan(r)),
                   key=lambda j: (-rewards[j], j))
    ranks: list[int | None] = [None] * len(rewards)
    for rank, j in enumerate(order, 1):
        ranks[j] = rank
    return ranks


def _load_tokenizer_for(policy_ref: str) -> Any:
    from ..models import is_adapter_dir, load_tokenizer

    path = Path(policy_ref)
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").is_file():
        from peft import PeftConfig

        return load_tokenizer(PeftConfig.from_pretrained(str(path)).base_model_name_or_path)
    return load_tokenizer(policy_ref)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _load_policy(settings: SamplingSettings, policy_ref: str) -> Any:
    import torch

    from ..models import is_adapter_dir, is_quantized, load_causal_lm, load_peft_model

    if is_adapter_dir(policy_ref):
        model = load_peft_model(policy_ref, quantization=settings.quantization, dtype=settings.dtype)
    else:
        model = load_causal_lm(policy_ref, quantization=settings.quantization, dtype=settings.dtype)
    if torch.cuda.is_available() and not is_quantized(model):
        model = model.to("cuda")
    return model


class _Run:
    """One sampling run: state shared by the generate / score / select / write steps."""

    def __init__(self, settings: SamplingSettings, output_dir: Path, rows: list[dict[str, Any]],
                 source: str, components: _Components, policy_ref: str, tokenizer: Any,
                 policy: Any = None) -> None:
        self.s = settings
        self.out = output_dir
        self.rows = rows
        self.source = source
        self.c = components
        self.policy_ref = policy_ref
        self.tokenizer = tokenizer
        self.policy = policy
        self.cache = JsonCache(output_dir / "cache")
        self.chunks = _chunks(len(rows), settings.chunk_size)
        from .generation import encode_prompt, end_of_turn_token_ids

        self.prompt_ids = [encode_prompt(components.template, tokenizer, r["prompt"]) for r in rows]
        self.stop_ids = end_of_turn_token_ids(components.template, tokenizer)
        self.backend = settings.backend
        if self.backend == "auto":
            from .generation import vllm_available

            self.backend = "vllm" if vllm_available() and policy is None else "hf"
        if policy is not None:
            self.backend = "hf"  # an in-memory policy runs through transformers
        self.policy_fingerprint = model_fingerprint(policy_ref)
        self.stats: dict[str, Any] = {}

    # -- keys --------------------------------------------------------------------------------
    def sampler_params(self) -> dict[str, Any]:
        s = self.s
        return {"backend": self.backend, "num_samples": s.num_samples,
                "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "seed": s.seed}

    def gen_key(self, chunk: range) -> str:
        s = self.s
        return config_hash("generation", _CACHE_VERSION, self.policy_fingerprint, s.template,
                           s.dtype, s.quantization, self.sampler_params(), self.stop_ids,
                           list(chunk), [self.prompt_ids[i] for i in chunk])

    def scorer_params(self) -> dict[str, Any]:
        return {"reward_functions": self.c.function_specs, "weights": list(self.c.weights),
                "reward_model": str(self.c.reward_model_dir) if self.c.reward_model_dir else None,
                "reward_model_weight": float(self.s.reward_model_weight)}

    def score_key(self, chunk: range) -> str:
        rm = model_fingerprint(self.c.reward_model_dir) if self.c.reward_model_dir else None
        columns = [{k: v for k, v in self.rows[i].items()} for i in chunk]
        return config_hash("scores", _CACHE_VERSION, self.gen_key(chunk), self.scorer_params(),
                           rm, columns)

    @staticmethod
    def chunk_name(kind: str, chunk: range) -> str:
        return f"{kind}-{chunk.start:06d}-{chunk.stop:06d}"

    def cached(self, kind: str, chunk: range, key: str) -> Any | None:
        return self.cache.get(self.chunk_name(kind, chunk), key) if self.s.cache else None

    def store(self, kind: str, chunk: range, key: str, payload: Any) -> None:
        if self.s.cache:
            self.cache.put(self.chunk_name(kind, chunk), key, payload)

    # -- generation --------------------------------------------------------------------------
    def generate(self) -> list[list[dict[str, Any]]]:
        """Completions per prompt (dicts: text, num_tokens, finish_reason); cached per chunk."""
        from tqdm.auto import tqdm

        self.cache.remove_temp_files()
        results: dict[int, list[list[dict[str, Any]]]] = {}
        missing = []
        for c, chunk in enumerate(self.chunks):
            payload = self.cached("generation", chunk, self.gen_key(chunk))
            if payload is not None:
                results[c] = payload["completions"]
            else:
                missing.append(c)
        started = time.perf_counter()
        generator = None
        if missing:
            generator = self._generator()
            total = sum(len(self.chunks[c]) for c in missing) * self.s.num_samples
            with tqdm(total=total, desc="generating", unit="sample") as bar:
                for c in missing:
                    chunk = self.chunks[c]
                    out = generator.generate([self.prompt_ids[i] for i in chunk], list(chunk),
                                             self.s.num_samples, progress=bar.update)
                    completions = [[comp._asdict() for comp in row] for row in out]
                    self.store("generation", chunk, self.gen_key(chunk),
                               {"prompt_indices": list(chunk), "completions": completions})
                    results[c] = completions
                    logger.info("generated prompts %d-%d", chunk.start, chunk.stop - 1)
        self.stats["generation"] = {
            "chunks": len(self.chunks), "generated_chunks": len(missing),
            "cached_chunks": len(self.chunks) - len(missing),
            "generate_calls": getattr(generator, "calls", 0),
            "seconds": round(time.perf_counter() - started, 3)}
        if generator is not None and self.policy is None:
            del generator  # free the policy before a reward model loads
            _free_memory()
        return [row for c in range(len(self.chunks)) for row in results[c]]

    def _generator(self) -> Any:
        from .generation import HFGenerator, VLLMGenerator

        s = self.s
        common = dict(stop_ids=self.stop_ids, max_new_tokens=s.max_new_tokens,
                      temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        if self.backend == "vllm":
            return VLLMGenerator(self.policy_ref, dtype=s.dtype, **common)
        model = self.policy if self.policy is not None else _load_policy(s, self.policy_ref)
        return HFGenerator(model, self.tokenizer, batch_size=s.batch_size, **common)

    # -- scoring -----------------------------------------------------------------------------
    def score(self, completions: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Per-prompt totals and per-scorer rewards (NaN = unscored); cached per chunk."""
        from tqdm.auto import tqdm

        from ..rewarding import call_reward_functions

        started = time.perf_counter()
        reward_model = None
        per_chunk: dict[int, dict[str, Any]] = {}
        todo = []
        for c, chunk in enumerate(self.chunks):
            payload = self.cached("scores", chunk, self.score_key(chunk))
            if payload is not None:
                per_chunk[c] = payload
            else:
                todo.append(c)
        if todo and self.c.reward_model_dir is not None:
            reward_model = self._reward_model()
        n = self.s.num_samples
        with tqdm(total=sum(len(self.chunks[c]) for c in todo) * n, desc="scoring",
                  unit="completion", disable=not todo) as bar:
            for c in todo:
                chunk = self.chunks[c]
                prompts, texts, convs, columns = [], [], [], {}
                keys = sorted({k for i in chunk for k in self.rows[i] if k != "prompt"})
                for i in chunk:
                    for comp in completions[i]:
                        prompts.append(self.rows[i]["prompt"])
                        texts.append(comp["text"])
                        convs.append([{"role": "assistant", "content": comp["text"]}])
                        for k in keys:
                            columns.setdefault(k, []).append(self.rows[i].get(k))
                scores: dict[str, list[float | None]] = {}
                fn_total = [math.nan] * len(texts)
                if self.c.funcs:
                    fn_total, per_function = call_reward_functions(
                        self.c.funcs, self.c.weights, prompts, convs, **columns)
                    scores.update(per_function)
                head = [math.nan] * len(texts)
                if reward_model is not None:
                    head = self._head_scores(reward_model, prompts, texts)
                    scores[REWARD_MODEL_KEY] = _nan_to_none(head)
                w = float(self.s.reward_model_weight)
                total = []
                for f, h in zip(fn_total, head):
                    terms = [t for t in (f, w * h if not math.isnan(h) else math.nan)
                             if not math.isnan(t)]
                    total.append(math.fsum(terms) if terms else math.nan)
                payload = {"total": _nan_to_none(total), "scores": scores}
                self.store("scores", chunk, self.score_key(chunk), payload)
                per_chunk[c] = payload
                bar.update(len(texts))
        self.stats["scoring"] = {"chunks": len(self.chunks), "scored_chunks": len(todo),
                                 "cached_chunks": len(self.chunks) - len(todo),
                                 "seconds": round(time.perf_counter() - started, 3)}
        totals: list[list[float]] = []
        per_scorer: list[list[dict[str, float | None]]] = []
        for c, chunk in enumerate(self.chunks):
            flat_total = _none_to_nan(per_chunk[c]["total"])
            names = list(per_chunk[c]["scores"])
            for k in range(len(chunk)):
                sl = slice(k * n, (k + 1) * n)
                totals.append(flat_total[sl])
                per_scorer.append([{name: per_chunk[c]["scores"][name][sl][j] for name in names}
                                   for j in range(n)])
        return {"totals": totals, "per_scorer": per_scorer}

    def _reward_model(self) -> Any:
        import torch

        from ..models import is_quantized
        from .reward_model import load_reward_model

        model = load_reward_model(self.c.reward_model_dir, quantization=self.s.quantization)
        if torch.cuda.is_available() and not is_quantized(model.backbone):
            model = model.to("cuda")
        return model

    def _head_scores(self, model: Any, prompts: list[Any], texts: list[str]) -> list[float]:
        from .reward_model import score

        keep = [i for i, t in enumerate(texts) if t.strip()]  # empty completions: unscored
        rows = [{"prompt": prompts[i], "completion": texts[i]} for i in keep]
        out = [math.nan] * len(texts)
        if rows:
            values = score(model, rows, batch_size=self.s.reward_batch_size, progress=False)
            for i, v in zip(keep, values):
                out[i] = float(v)
        return out

    # -- selection and outputs ---------------------------------------------------------------
    def select(self, totals: list[list[float]]) -> list[tuple[int, int]]:
        try:
            pairs = self.c.rule.select(totals)
        except RlhfPluginsError:
            raise
        except Exception as exc:
            raise PluginError(f"selection rule {self.s.selection!r} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        out = []
        for pair in pairs:
            i, j = int(pair[0]), int(pair[1])
            if not (0 <= i < len(totals) and 0 <= j < len(totals[i])):
                raise PluginError(f"selection rule {self.s.selection!r} returned {pair!r}, "
                                  "outside the reward matrix")
            if math.isnan(totals[i][j]):
                raise PluginError(f"selection rule {self.s.selection!r} selected the unscored "
                                  f"(NaN) completion {pair!r}")
            out.append((i, j))
        return sorted(set(out))

    def build_rows(self, completions: list[list[dict[str, Any]]], scored: dict[str, Any],
                   selected: set[tuple[int, int]]) -> list[dict[str, Any]]:
        from .generation import sample_seed

        s = self.s
        provenance = {
            "policy": str(self.policy_ref), "template": s.template, "source": self.source,
            "sampler": self.sampler_params(),
            "scorer": {**self.scorer_params(), "reward_functions": [
                spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
                for spec in self.c.function_specs]},
            "rule": s.selection, "rule_params": json.dumps(s.selection_params, sort_keys=True),
        }
        out = []
        for i, row in enumerate(self.rows):
            ranks = _ranks(scored["totals"][i])
            extra = {k: v for k, v in row.items() if k not in RESERVED_COLUMNS}
            for j, comp in enumerate(completions[i]):
                total = scored["totals"][i][j]
                out.append({
                    "prompt_index": i, "completion_index": j,
                    "prompt": row["prompt"],
                    "completion": [{"role": "assistant", "content": comp["text"]}],
                    "reward": None if math.isnan(total) else total,
                    "rewards": scored["per_scorer"][i][j],
                    "rank": ranks[j], "selected": (i, j) in selected,
                    "num_tokens": comp["num_tokens"], "finish_reason": comp["finish_reason"],
                    **extra,
                    "provenance": {**provenance,
                                   "sample_seed": sample_seed(s.seed, i, j)
                                   if s.temperature > 0 else None},
                })
        return out

    def write(self, rows: list[dict[str, Any]], pairs: list[tuple[int, int]],
              summary: dict[str, Any]) -> dict[str, str]:
        import datasets

        n = self.s.num_samples
        index = {(r["prompt_index"], r["completion_index"]): k for k, r in enumerate(rows)}
        sel_idx = [index[p] for p in pairs]
        full = datasets.Dataset.from_list(rows)
        files: dict[str, str] = {}
        if self.s.save_all:
            atomic_write_jsonl(self.out / f"{ALL}.jsonl", rows)
            atomic_write_dir(self.out / ALL, lambda d: full.save_to_disk(str(d)))
            files.update({"all_jsonl": f"{ALL}.jsonl", "all_dataset": ALL})
        atomic_write_jsonl(self.out / f"{SELECTED}.jsonl", [rows[k] for k in sel_idx])
        chosen = full.select(sel_idx)
        atomic_write_dir(self.out / SELECTED, lambda d: chosen.save_to_disk(str(d)))
        files.update({"selected_jsonl": f"{SELECTED}.jsonl", "selected_dataset": SELECTED})
        if plot_histogram(self.out / HISTOGRAM_FILE,
                          [r["reward"] for r in rows if r["reward"] is not None],
                          [rows[k]["reward"] for k in sel_idx], rule=self.s.selection, n=n):
            files["histogram"] = HISTOGRAM_FILE
        return files


def plot_histogram(path: Path, before: Sequence[float], after: Sequence[float], *,
                   rule: str = "", n: int | None = None) -> bool:
    """PNG histogram of rewards before (all scored) and after selection; False if nothing to plot."""
    if not before:
        return False
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = min(before), max(before)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * k / 20 for k in range(21)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    mean_b = math.fsum(before) / len(before)
    ax.hist(before, bins=bins, alpha=0.55, label=f"all completions (n={len(before)}, "
                                                 f"mean {mean_b:.3f})")
    if after:
        mean_a = math.fsum(after) / len(after)
        ax.hist(after, bins=bins, alpha=0.55, label=f"selected (n={len(after)}, mean {mean_a:.3f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("completions")
    ax.set_title(f"Rewards before/after selection ({rule}{f', N={n}' if n else ''})")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def run_sampling(settings: SamplingSettings, output_dir: str | os.PathLike, *,
                 rows: Sequence[Mapping[str, Any]] | None = None, policy: Any = None,
                 tokenizer: Any = None, finetune: bool | None = None) -> SamplingResult:
    """Generate, score, select and write (and optionally fine-tune); resumes from the cache.

    `rows` replaces the configured dataset (each with a `prompt`); `policy`/`tokenizer` pass an
    already loaded policy (its identity for caching is still `settings.model`); `finetune`
    overrides `settings.finetune`.
    """
    out = Path(output_dir)
    if finetune is not None:
        settings = dataclasses.replace(settings, finetune=bool(finetune))
    if rows is None:
        prompt_rows, source = load_prompt_rows(settings)
    else:
        prompt_rows = [{**dict(r), "prompt": _check_prompt(
            [{"role": "user", "content": r["prompt"]}] if isinstance(r.get("prompt"), str)
            else r.get("prompt"), i, "rows")} for i, r in enumerate(rows)]
        source = "rows"
        if not prompt_rows:
            raise DataError("rows: no prompts")
    from ..models import resolve_model
    from .distributed import main_process_first

    policy_ref = resolve_model(settings.model)
    components = resolve_components(settings, len(prompt_rows), out, policy_ref)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)  # this folder is incomplete until the end
    started = time.perf_counter()
    if tokenizer is None:
        tokenizer = _load_tokenizer_for(policy_ref)
    run = _Run(settings, out, prompt_rows, source, components, policy_ref, tokenizer, policy)
    with main_process_first():  # under accelerate: the other processes read the main one's cache
        completions = run.generate()
        scored = run.score(completions)
        totals = scored["totals"]
        pairs = run.select(totals)
        chosen = set(pairs)
        result_rows = run.build_rows(completions, scored, chosen)
        summary = _summary(settings, run, result_rows, pairs, totals)
        summary["files"] = run.write(result_rows, pairs, summary)
        summary["seconds"] = round(time.perf_counter() - started, 3)
    sft_result = None
    if components.sft is not None and not pairs and settings.on_empty_selection == "skip":
        logger.warning("the selection is empty: no fine-tuning, the policy stays as it was")
        summary["sft"] = {"skipped": "empty selection"}
    elif components.sft is not None:
        sft_result = _finetune(components.sft, len(pairs))
        summary["sft"] = {"output_dir": str(sft_result.output_dir),
                          "merged_dir": str(sft_result.merged_dir) if sft_result.merged_dir else None,
                          "train_loss": sft_result.metrics.get("train_loss"),
                          "train_rows": sft_result.metrics.get("train_rows")}
    atomic_write_json(out / SUMMARY_FILE, summary)
    logger.info("selected %d of %d completions (mean reward %s -> %s)", summary["selected"],
                summary["completions"], summary["reward_mean_all"], summary["reward_mean_selected"])
    selected_rows = [r for r in result_rows if r["selected"]]
    return SamplingResult(out, summary, selected_rows, result_rows, sft_result)


def _summary(settings: SamplingSettings, run: _Run, rows: list[dict[str, Any]],
             pairs: list[tuple[int, int]], totals: list[list[float]]) -> dict[str, Any]:
    flat = [r for row in totals for r in row]
    chosen = [totals[i][j] for i, j in pairs]
    all_nan = sum(1 for row in totals if row and all(math.isnan(r) for r in row))
    names = sorted({k for r in rows for k in r["rewards"]})

    def per_name(subset: list[dict[str, Any]]) -> dict[str, float | None]:
        return {name: _mean([math.nan if r["rewards"].get(name) is None else r["rewards"][name]
                             for r in subset]) for name in names}

    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    selected_rows = [r for r in rows if r["selected"]]
    return {
        "complete": True,
        "config_hash": config_hash(dataclasses.asdict(settings), len(totals)),
        "policy": str(run.policy_ref), "source": run.source,
        "prompts": len(totals), "num_samples": settings.num_samples, "completions": len(flat),
        "scored": sum(1 for r in flat if not math.isnan(r)),
        "unscored": sum(1 for r in flat if math.isnan(r)),
        "all_nan_prompts": all_nan,
        "selected": len(pairs), "selected_prompts": len({i for i, _ in pairs}),
        "reward_mean_all": _mean(flat), "reward_mean_selected": _mean(chosen),
        "reward_std_all": _std(flat), "reward_std_selected": _std(chosen),
        "per_scorer_mean_all": per_name(rows), "per_scorer_mean_selected": per_name(selected_rows),
        "finish_reasons": reasons,
        "mean_completion_tokens": _mean([float(r["num_tokens"]) for r in rows]),
        "rule": settings.selection, "rule_params": dict(settings.selection_params),
        "sampler": run.sampler_params(), "scorer": run.scorer_params(),
        "generation": run.stats.get("generation"), "scoring": run.stats.get("scoring"),
    }


def _finetune(sft: tuple[Any, dict[str, Any], Path], selected: int) -> Any:
    from .sft import run_sft

    if selected == 0:
        raise DataError("sft: the selection is empty; nothing to fine-tune on")
    ours, trl_kwargs, out = sft
    return run_sft(ours, trl_kwargs, out)


def best_of_n(settings: SamplingSettings, output_dir: str | os.PathLike, **kwargs: Any,
              ) -> SamplingResult:
    """Best-of-N at inference: per prompt, the highest-scoring of N samples (no fine-tuning)."""
    settings = dataclasses.replace(settings, selection="top_per_prompt", selection_params={},
                                   finetune=False)
    kwargs.pop("finetune", None)
    return run_sampling(settings, output_dir, finetune=False, **kwargs)


def sample_from_config(source: str | os.PathLike | Mapping[str, Any],
                       output_dir: str | os.PathLike | None = None,
                       overrides: Sequence[str] | Mapping[str, Any] | None = None,
                       finetune: bool | None = None) -> SamplingResult:
    """`rlhf-plugins sample --config` as a function: load the YAML, run the stage."""
    settings, out = load_sampling_config(source, overrides, output_dir)
    return run_sampling(settings, out, finetune=finetune)
