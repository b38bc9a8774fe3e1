"""The rejection-sampling stage's run: prompts -> :class:`~.sampler.SamplingRun` (generate, score,
select) -> the files of :mod:`.outputs` -> optionally SFT on the selection; and best-of-N.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...cache import atomic_write_json
from ...errors import DataError
from .components import resolve_components
from .outputs import build_rows, summarize, write_outputs
from .prompts import check_prompt, counted_prompt_rows
from .sampler import SamplingRun
from .settings import SUMMARY_FILE, SamplingResult, SamplingSettings, load_sampling_config

logger = logging.getLogger(__name__)


def _load_tokenizer_for(policy_ref: str) -> Any:
    from ...models import adapter_base_model, is_adapter_dir, load_tokenizer

    path = Path(policy_ref)
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter_base_model(path))
    return load_tokenizer(policy_ref)


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
    from ..resume import check_run_config, finish_run, output_state

    given = None if rows is None else {"rows": [dict(r) for r in rows]}  # part of the config
    if output_state(out, "sample", settings, given).finished:  # before any model loads
        from .outputs import finished_outputs

        return finished_outputs(out)
    numbers = drops = None  # the rows' indices in `source` and the rows dropped (bad_rows: skip)
    if rows is None:
        prompt_rows, source, numbers, drops = counted_prompt_rows(settings)
    else:
        prompt_rows = [{**dict(r), "prompt": check_prompt(
            [{"role": "user", "content": r["prompt"]}] if isinstance(r.get("prompt"), str)
            else r.get("prompt"), i, "rows")} for i, r in enumerate(rows)]
        source = "rows"
        if not prompt_rows:
            raise DataError("rows: no prompts")
    from ...models import resolve_model
    from ..distributed import main_process_first

    policy_ref = resolve_model(settings.model)
    components = resolve_components(settings, len(prompt_rows), out, policy_ref)
    started = time.perf_counter()
    if tokenizer is None:
        tokenizer = _load_tokenizer_for(policy_ref)
    # encodes every prompt: a row the template refuses fails here, before anything is written
    run = SamplingRun(settings, out, prompt_rows, source, components, policy_ref, tokenizer, policy,
                      numbers=numbers, drops=drops)
    if drops is not None:
        drops.warn()
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(out, "sample", settings, given, keep=("cache",))  # keyed by content: kept
    (out / SUMMARY_FILE).unlink(missing_ok=True)  # this folder is incomplete until the end
    with main_process_first():  # under accelerate: the other processes read the main one's cache
        completions = run.generate()
        scored = run.score(completions)
        totals = scored["totals"]
        pairs = run.select(totals)
        chosen = set(pairs)
        result_rows = build_rows(run, completions, scored, chosen)
        summary = summarize(settings, run, result_rows, pairs, totals)
        if drops is not None:
            summary.update(drops.metrics())
        summary["files"] = write_outputs(run, result_rows, pairs, summary)
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
    finish_run(out)  # last: a rerun of this config now has nothing to do
    logger.info("selected %d of %d completions (mean reward %s -> %s)", summary["selected"],
                summary["completions"], summary["reward_mean_all"], summary["reward_mean_selected"])
    selected_rows = [r for r in result_rows if r["selected"]]
    return SamplingResult(out, summary, selected_rows, result_rows, sft_result)


def _finetune(sft: tuple[Any, dict[str, Any], Path], selected: int) -> Any:
    from ..sft.train import run_sft

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
