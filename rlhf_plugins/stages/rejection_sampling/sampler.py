"""Rejection sampling and best-of-N: generate N completions per prompt, score, select, write, tune.

:class:`SamplingRun` generates, scores and selects; :func:`~.run.run_sampling` drives it. The
settings live in :mod:`.settings`, prompts in :mod:`.prompts`, components in :mod:`.components`,
the output rows, files and summary in :mod:`.outputs`.

1. **Generate** (:mod:`rlhf_plugins.generation`): prompts rendered by the chat template component with
   ``add_generation_prompt=True``; HF ``generate``,
   stopping at the template's end-of-turn token; one seeded random stream per completion.
2. **Score**: registered reward functions (weighted sum, :func:`~rlhf_plugins.rewarding.
   call_reward_functions`) and/or a saved reward model (length-sorted
   :func:`~rlhf_plugins.stages.reward_model.scoring.score`), added together with
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

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from ...cache import JsonCache, model_fingerprint
from ...config import config_hash
from ...errors import DataError
from .components import SamplingComponents
from .settings import REWARD_MODEL_KEY, SamplingSettings

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2  # 2: inverse-CDF sampler (generation._make_sampler)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def nan_to_none(values: Sequence[float]) -> list[float | None]:
    """NaN (unscored) as None, for JSON."""
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            for v in values]


def none_to_nan(values: Sequence[float | None]) -> list[float]:
    """None (unscored, from JSON) as NaN."""
    return [math.nan if v is None else float(v) for v in values]


def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


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

    from ...models import is_adapter_dir, is_quantized, load_causal_lm, load_peft_model

    if is_adapter_dir(policy_ref):
        model = load_peft_model(policy_ref, quantization=settings.quantization, dtype=settings.dtype)
    else:
        model = load_causal_lm(policy_ref, quantization=settings.quantization, dtype=settings.dtype)
    if torch.cuda.is_available() and not is_quantized(model):
        model = model.to("cuda")
    return model


class SamplingRun:
    """One sampling run: state shared by the generate / score / select / write steps."""

    def __init__(self, settings: SamplingSettings, output_dir: Path, rows: list[dict[str, Any]],
                 source: str, components: SamplingComponents, policy_ref: str, tokenizer: Any,
                 policy: Any = None, *, numbers: list[int] | None = None,
                 drops: Any = None) -> None:
        from ...generation import encode_prompt, end_of_turn_stop_strings, end_of_turn_token_ids
        from ...guard import located, row_number

        self.s = settings
        self.out = output_dir
        self.source = source
        self.c = components
        self.policy_ref = policy_ref
        self.tokenizer = tokenizer
        self.policy = policy
        self.cache = JsonCache(output_dir / "cache")
        self.prompt_ids, self.rows = [], []
        for i, r in enumerate(rows):
            try:
                self.prompt_ids.append(encode_prompt(components.template, tokenizer, r["prompt"]))
            except DataError as exc:  # a forged turn marker, a role the template lacks: name the row
                number = row_number(source, i if numbers is None else numbers[i])
                exc = located(exc, f"dataset {source}: row {number}")
                if drops is None or settings.bad_rows == "error":
                    raise exc from None
                drops.add("invalid", number, str(exc))  # `bad_rows: skip`: dropped, counted
                continue
            self.rows.append(r)
        if drops is not None:
            drops.check(settings.max_bad_fraction)
            if not self.rows:
                raise DataError(f"dataset {source}: no prompts left (dropped: {drops.describe()})")
        self.chunks = _chunks(len(self.rows), settings.chunk_size)
        self.stop_ids = end_of_turn_token_ids(components.template, tokenizer)
        self.stop_strings = end_of_turn_stop_strings(components.template, tokenizer)
        self.backend = settings.backend  # "hf": part of the cache key and provenance
        self.policy_fingerprint = model_fingerprint(policy_ref)
        from ..resume import plugin_versions, settings_components

        #: plugin versions of the template / reward functions: an upgrade invalidates the cache
        self.versions = plugin_versions(settings_components(settings))
        self.stats: dict[str, Any] = {}

    # -- keys --------------------------------------------------------------------------------
    def sampler_params(self) -> dict[str, Any]:
        s = self.s
        return {"backend": self.backend, "num_samples": s.num_samples,
                "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "seed": s.seed,
                **({"stop_pattern": s.stop_pattern} if s.stop_pattern else {})}

    def gen_key(self, chunk: range) -> str:
        s = self.s
        return config_hash("generation", _CACHE_VERSION, self.policy_fingerprint, s.template,
                           s.dtype, s.quantization, self.sampler_params(), self.stop_ids,
                           *([self.stop_strings] if self.stop_strings else []),
                           {k: v for k, v in self.versions.items() if k.startswith("chat_templates/")},
                           list(chunk), [self.prompt_ids[i] for i in chunk])

    def scorer_params(self) -> dict[str, Any]:
        return {"reward_functions": self.c.function_specs, "weights": list(self.c.weights),
                "reward_model": str(self.c.reward_model_dir) if self.c.reward_model_dir else None,
                "reward_model_weight": float(self.s.reward_model_weight)}

    def score_key(self, chunk: range) -> str:
        rm = model_fingerprint(self.c.reward_model_dir) if self.c.reward_model_dir else None
        columns = [{k: v for k, v in self.rows[i].items()} for i in chunk]
        return config_hash("scores", _CACHE_VERSION, self.gen_key(chunk), self.scorer_params(),
                           rm, columns, {k: v for k, v in self.versions.items()
                                         if k.startswith("reward_functions/")})

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
        from ...generation import HFGenerator

        s = self.s
        common = dict(stop_ids=self.stop_ids, stop_strings=self.stop_strings,
                      max_new_tokens=s.max_new_tokens,
                      temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        model = self.policy if self.policy is not None else _load_policy(s, self.policy_ref)
        return HFGenerator(model, self.tokenizer, batch_size=s.batch_size,
                           stop_patterns=[s.stop_pattern] if s.stop_pattern else [], **common)

    # -- scoring -----------------------------------------------------------------------------
    def score(self, completions: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Per-prompt totals and per-scorer rewards (NaN = unscored); cached per chunk."""
        from tqdm.auto import tqdm

        from ...rewarding import call_reward_functions

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
                    scores[REWARD_MODEL_KEY] = nan_to_none(head)
                w = float(self.s.reward_model_weight)
                total = []
                for f, h in zip(fn_total, head):
                    terms = [t for t in (f, w * h if not math.isnan(h) else math.nan)
                             if not math.isnan(t)]
                    total.append(math.fsum(terms) if terms else math.nan)
                payload = {"total": nan_to_none(total), "scores": scores}
                self.store("scores", chunk, self.score_key(chunk), payload)
                per_chunk[c] = payload
                bar.update(len(texts))
        self.stats["scoring"] = {"chunks": len(self.chunks), "scored_chunks": len(todo),
                                 "cached_chunks": len(self.chunks) - len(todo),
                                 "seconds": round(time.perf_counter() - started, 3)}
        totals: list[list[float]] = []
        per_scorer: list[list[dict[str, float | None]]] = []
        for c, chunk in enumerate(self.chunks):
            flat_total = none_to_nan(per_chunk[c]["total"])
            names = list(per_chunk[c]["scores"])
            for k in range(len(chunk)):
                sl = slice(k * n, (k + 1) * n)
                totals.append(flat_total[sl])
                per_scorer.append([{name: per_chunk[c]["scores"][name][sl][j] for name in names}
                                   for j in range(n)])
        return {"totals": totals, "per_scorer": per_scorer}

    def _reward_model(self) -> Any:
        import torch

        from ...models import is_quantized
        from ..reward_model.artifact import load_reward_model

        # the quantization it was trained with (reward_model.json), not the policy's
        model = load_reward_model(self.c.reward_model_dir)
        if torch.cuda.is_available() and not is_quantized(model.backbone):
            model = model.to("cuda")
        return model

    def _head_scores(self, model: Any, prompts: list[Any], texts: list[str]) -> list[float]:
        from ..reward_model.scoring import reward_model_function

        # the scorer `ppo` uses too (empty completions: unscored)
        scores = reward_model_function(model, batch_size=self.s.reward_batch_size)(prompts, texts)
        return [math.nan if v is None else float(v) for v in scores]

    # -- selection ---------------------------------------------------------------------------
    def select(self, totals: list[list[float]]) -> list[tuple[int, int]]:
        from ...selection_contract import call_selection_rule

        return call_selection_rule(self.c.rule, totals)  # names rule, plugin, distribution
