"""Reward-model stage: a reward head component on a (LoRA / 4-bit) causal LM, trained with
:class:`RewardHeadTrainer` (a transformers Trainer subclass), evaluated and saved.

Here: :func:`prepare_rm`, :func:`run_rm` / :func:`rm_from_config` (what ``rlhf-plugins rm
--config`` runs) and :func:`mc_step_labels` (Monte Carlo PRM labels, Math-Shepherd style). The
rest of the package: :mod:`.model` (:class:`~.model.RewardModel`), :mod:`.artifact` (save, load,
attach), :mod:`.scoring` (:func:`~.scoring.score`, :func:`~.scoring.step_outputs`),
:mod:`.data` (rows, encoding, metrics), :mod:`.trainer` (:class:`~.trainer.RewardHeadTrainer`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ...cache import atomic_write_figure
from ...errors import ConfigError, DataError
from ...protocols import member
from ..resume import check_run_config, output_state
from ..skeleton import (SYNTHETIC, build_trl_config, finish_stage, finished_stage,
                        load_trainable_model, resume_checkpoint, stage_config)
from .artifact import save_reward_model
from .data import EncodedRows, encode_rows, evaluate_rows, load_rows
from .model import RewardModel
from .scoring import score
from .settings import RMSettings
from .trainer import RewardHeadTrainer

logger = logging.getLogger(__name__)

METRICS_FILE = "rm_metrics.json"
PLOT_FILE = "rm_training.png"
_REJECTED_TRL_FIELDS = {
    "chat_template_path": "use `template` (a chat template plugin name)",
    "model_init_kwargs": "use `model`, `quantization` and `lora`",
    "pad_token": "set by the tokenizer",
    "eos_token": "the chat template decides the end-of-turn token",
}

@dataclass
class RMResult:
    """What `run_rm` produced."""

    output_dir: Path
    metrics: dict[str, Any]
    model: RewardModel | None = None
    #: the output already held a finished run of this config: nothing was trained
    up_to_date: bool = False


def build_rm_config(trl_kwargs: Mapping[str, Any], output_dir: str | os.PathLike) -> Any:
    """TRL's `RewardConfig` from the YAML's TRL fields, with CPU-friendly defaults."""
    from trl import RewardConfig

    return build_trl_config(RewardConfig, trl_kwargs, output_dir, label="RM",
                            rejected=_REJECTED_TRL_FIELDS, reject=lambda value: value is not None)


@dataclass
class PreparedRM:
    """Everything `run_rm` trains and evaluates with."""

    trainer: RewardHeadTrainer
    model: RewardModel
    head: Any
    template: Any
    tokenizer: Any
    train: EncodedRows
    train_rows: list[dict]
    eval: EncodedRows | None
    eval_rows: list[dict]
    source: str
    base_model: str


def _split_holdout(rows: list[dict], settings: RMSettings, seed: int) -> tuple[list[int], list[int]]:
    """(indices of the training rows, indices of the held-out rows), in file order."""
    import random

    n = len(rows)
    k = settings.eval_size if settings.eval_size is not None else int(round(n * settings.eval_fraction))
    if k <= 0:
        return list(range(n)), []
    if k >= n:
        raise ConfigError(f"eval_size/eval_fraction: would hold out {k} of {n} rows, leaving none")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [i for i in range(n) if i not in held], [i for i in range(n) if i in held]


def _normalizes(settings: RMSettings, head: Any) -> bool:
    """Whether scores are normalized after training (the setting or the head's option)."""
    return bool(settings.normalize or dict(member(head, "reward_heads", "options")).get("normalize"))


def prepare_rm(settings: RMSettings, trl_kwargs: Mapping[str, Any] | None,
               output_dir: str | os.PathLike) -> PreparedRM:
    """Validate, load and encode the data, build the model and the trainer (config errors first)."""
    from ... import registry
    from ...models import base_model_of, load_tokenizer, resolve_model

    args = build_rm_config(trl_kwargs or {}, output_dir)
    head = registry().reward_heads.get(settings.head, **settings.head_config())
    if _normalizes(settings, head) and not member(head, "reward_heads", "supports_normalize"):
        raise ConfigError(f"normalize: head {settings.head!r} does not support it "
                          "(supports_normalize is false: its module has no score offset)")
    template = registry().chat_templates.get(settings.template)
    numbers = eval_numbers = None  # each row's index in its source (for messages), None: in order
    rows, source = load_rows(settings.dataset, split=settings.dataset_split, head=head,
                             num_examples=settings.num_examples, seed=settings.dataset_seed,
                             dataset_config=settings.dataset_config)
    if settings.eval_dataset is not None or (settings.eval_split is not None
                                             and settings.dataset != SYNTHETIC):
        eval_source = settings.eval_dataset or settings.dataset
        eval_split = settings.eval_split or "test"
        if eval_source == settings.dataset and eval_split == settings.dataset_split:
            raise ConfigError(f"eval_split: {eval_split!r} is the training split; name another "
                              "split (or use eval_size / eval_fraction for a hold-out)")
        eval_rows, eval_where = load_rows(eval_source, split=eval_split, head=head,
                                          num_examples=settings.num_eval_examples,
                                          seed=settings.dataset_seed,
                                          dataset_config=settings.dataset_config,
                                          default_synthetic=64)
    elif settings.dataset == SYNTHETIC and settings.eval_size is None and not settings.eval_fraction:
        eval_where = f"synthetic[{settings.eval_split or 'test'}]"
        eval_rows = member(head, "reward_heads", "synthetic_rows")(
            settings.num_eval_examples or 64, settings.dataset_seed, settings.eval_split or "test")
    else:
        numbers, eval_numbers = _split_holdout(list(rows), settings, args.seed)
        rows, eval_rows, eval_where = [rows[i] for i in numbers], [rows[i] for i in eval_numbers], source
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    strict = dict(strict=settings.bad_rows == "error", max_bad_fraction=settings.max_bad_fraction)
    train = encode_rows(rows, head, tokenizer, template, max_length=args.max_length,
                        where=source, numbers=numbers, **strict)
    evaluation = None
    if eval_rows:
        evaluation = encode_rows(eval_rows, head, tokenizer, template, max_length=args.max_length,
                                 where=eval_where, numbers=eval_numbers, **strict,
                                 label=f"{eval_where} (eval)")
    logger.info("RM data: %d train rows (%d dropped), %d eval rows", len(train.kept), train.dropped,
                0 if evaluation is None else len(evaluation.kept))
    # A saved adapter (e.g. the SFT stage's) is trained on as the reward model's adapter.
    backbone = load_trainable_model(model_path, settings.lora, settings.quantization,
                                    gradient_checkpointing=bool(args.gradient_checkpointing),
                                    seed=args.seed)
    base_model = base_model_of(model_path)
    import torch

    torch.manual_seed(args.seed)  # the head's initialisation
    model = RewardModel(backbone, head, tokenizer=tokenizer, template=template,
                        template_name=settings.template, base_model=base_model,
                        head_name=settings.head)
    # recorded in every save (checkpoints too): scorers load the base the way it was trained
    model.quantization = dataclasses.asdict(settings.quantization) if settings.quantization else None
    trainer = RewardHeadTrainer(model, args, train_dataset=train.features,
                                eval_dataset=None if evaluation is None else evaluation.features,
                                processing_class=tokenizer)
    kept_eval = [] if evaluation is None else [eval_rows[i] for i in evaluation.kept]
    return PreparedRM(trainer, model, head, template, tokenizer, train,
                      [rows[i] for i in train.kept], evaluation, kept_eval, source, base_model)


def normalize_scores(model: RewardModel, reference_rows: Sequence[Mapping[str, Any]],
                     batch_size: int = 16) -> float:
    """Shift a scalar head so `reference_rows` (prompt + completion) score 0 on average; returns the shift."""
    import torch

    offset = getattr(model.head_module, "offset", None)
    if offset is None:
        raise ConfigError(f"normalize: head {model.head_name!r} has no score offset")
    scores = score(model, reference_rows, batch_size=batch_size, progress=False)
    shift = sum(scores) / len(scores)
    with torch.no_grad():
        offset.add_(torch.as_tensor(shift, dtype=offset.dtype, device=offset.device))
    return shift


def _reference_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for r in rows:
        best = r["completions"][0] if "completions" in r else r.get("chosen")
        if best is not None:
            out.append({"prompt": r.get("prompt"), "completion": best})
    return out


def plot_training(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                  title: str = "reward model") -> Path:
    """PNG of train/eval loss and accuracy (or the head's metric) over steps, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    metric = next((m for m in ("accuracy", "mse") if any(m in e or f"eval_{m}" in e
                                                         for e in log_history)), "accuracy")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, keys) in zip(axes, (("loss", ("loss", "eval_loss")),
                                       (metric, (metric, f"eval_{metric}")))):
        for key, label in zip(keys, ("train", "eval")):
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write_figure(path, fig, dpi=100)


def run_rm(settings: RMSettings, trl_kwargs: Mapping[str, Any] | None = None,
           output_dir: str | os.PathLike = "outputs/rm") -> RMResult:
    """Train a reward head; save adapter/backbone + head + tokenizer, metrics JSON and a PNG plot."""
    out = Path(output_dir)
    started = time.time()
    if output_state(out, "rm", settings, trl_kwargs).finished:  # before any model loads
        return RMResult(out, finished_stage(out, "rm", METRICS_FILE)[0], up_to_date=True)
    prepared = prepare_rm(settings, trl_kwargs, out)
    trainer, model = prepared.trainer, prepared.model
    head_options = dict(member(prepared.head, "reward_heads", "options"))
    metrics: dict[str, Any] = {"head": model.head_name, "head_options": head_options,
                               "template": settings.template, "dataset": prepared.source,
                               "train_data": prepared.train.summary(),
                               "eval_data": None if prepared.eval is None else prepared.eval.summary(),
                               **prepared.train.drops.metrics()}
    if prepared.eval is not None:
        metrics.update(prepared.eval.drops.metrics("eval_"))
    kw = dict(batch_size=settings.score_batch_size, max_length=trainer.args.max_length)
    check_run_config(out, "rm", settings, trl_kwargs)  # another config's files: cleared
    resume = resume_checkpoint(out, settings.resume, "RM")
    if prepared.eval_rows and resume is None:
        metrics["heldout_before"] = evaluate_rows(model, prepared.eval_rows, **kw)
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics.update(train_output.metrics)
    metrics["global_step"] = train_output.global_step
    if prepared.eval is not None and settings.trainer_eval:
        metrics.update(trainer.evaluate())
    if _normalizes(settings, prepared.head):
        metrics["normalization_shift"] = normalize_scores(
            model, _reference_rows(prepared.train_rows), settings.score_batch_size)
    if prepared.eval_rows:
        metrics["heldout"] = evaluate_rows(model, prepared.eval_rows, **kw)
    if trainer.is_world_process_zero():
        save_reward_model(model, out)
    if trainer.is_world_process_zero():
        plot_training(trainer.state.log_history, out / PLOT_FILE,
                      title=f"{model.head_name} reward model ({prepared.source})")
    finish_stage(trainer, out, metrics, metrics_file=METRICS_FILE, started=started, stage="rm",
                 settings=settings, head=model.head_name, base_model=prepared.base_model,
                 adapter=model.is_peft, template=settings.template, dataset=prepared.source)
    return RMResult(out, metrics, model)


def rm_from_config(source: str | os.PathLike | Mapping[str, Any],
                   output_dir: str | os.PathLike | None = None,
                   overrides: Sequence[str] | Mapping[str, Any] | None = None) -> RMResult:
    """Run the RM stage from a YAML path or mapping (the Python twin of `rlhf-plugins rm --config`)."""
    from trl import RewardConfig

    return run_rm(*stage_config(source, overrides, output_dir, RMSettings, RewardConfig))


# --------------------------------------------------------------------------------------------
# Monte Carlo PRM labels (Math-Shepherd)
# --------------------------------------------------------------------------------------------

def check_step_rows(problems: Iterable[Mapping[str, Any]], where: str = "problems") -> None:
    """DataError naming the first row of `where` without a non-empty `steps` list (its 1-based
    number: the file's line for JSON lines) - before any model loads."""
    from ...guard import row_place

    for index, row in enumerate(problems):
        steps = row.get("steps")
        if not isinstance(steps, (list, tuple)) or not steps:
            raise DataError(f"{row_place(where, index)}: needs 'steps' (a non-empty list of strings)")


def mc_step_labels(problems: Sequence[Mapping[str, Any]], sample: Callable[..., list[str]],
                   reward: Callable[..., list[float | None]], *, num_rollouts: int = 8,
                   mode: str = "hard", threshold: float = 0.0, delimiter: str = "\n\n",
                   progress: bool = True, where: str = "problems") -> list[dict[str, Any]]:
    """Step rows labelled by rollouts from each step prefix (Math-Shepherd).

    `problems` rows have ``prompt`` and ``steps`` (a solution to label) plus any columns the
    verifier needs (e.g. ``answer``). For step i, ``sample(prompt, prefix, n)`` returns `n`
    continuations of ``delimiter.join(steps[:i+1])``; ``reward(prompts, completions, **columns)``
    (a reward function, e.g. ``exact_answer``) scores each full solution, success = reward > 0.5.
    ``hard``: label +1 when the success rate exceeds `threshold` (0: any rollout succeeds), else
    -1; ``soft``: the label is the success rate (in [0, 1]). Rows get ``labels`` and
    ``mc_success_rates``.
    """
    from tqdm.auto import tqdm

    if mode not in ("hard", "soft"):
        raise ConfigError(f"mc labels: mode must be 'hard' or 'soft', got {mode!r}")
    if num_rollouts < 1:
        raise ConfigError(f"mc labels: num_rollouts must be >= 1, got {num_rollouts}")
    check_step_rows(problems, where)
    out = []
    for row in tqdm(problems, desc="MC step labels", disable=not progress):
        steps = row["steps"]
        columns = {k: v for k, v in row.items() if k not in ("prompt", "steps", "labels")}
        rates = []
        for i in range(len(steps)):
            prefix = delimiter.join(steps[:i + 1])
            if i == len(steps) - 1:  # a complete solution: the verifier decides directly
                completions = [prefix]
            else:
                completions = [prefix + delimiter + c.lstrip() if c.strip() else prefix
                               for c in sample(row["prompt"], prefix + delimiter, num_rollouts)]
            msgs = [[{"role": "assistant", "content": c}] for c in completions]
            cols = {k: [v] * len(msgs) for k, v in columns.items()}
            rewards = reward([row["prompt"]] * len(msgs), msgs, **cols)
            ok = [r is not None and r > 0.5 for r in rewards]
            rates.append(sum(ok) / len(ok))
        labels = ([1 if r > threshold else -1 for r in rates] if mode == "hard" else rates)
        out.append({**dict(row), "labels": labels, "mc_success_rates": rates})
    return out


def policy_sampler(model: Any, tokenizer: Any, template: Any, *, max_new_tokens: int = 128,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> Callable[..., list[str]]:
    """``sample(prompt, prefix, n)``: `n` sampled continuations of an assistant `prefix` (HF generate)."""
    import torch

    from ...generation import end_of_turn_token_ids

    stops = end_of_turn_token_ids(template, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    calls = [0]

    def sample_impl(prompt: Any, prefix: str, n: int) -> list[str]:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = template.encode(msgs, tokenizer=tokenizer, add_generation_prompt=True).input_ids
        ids = list(ids) + tokenizer(prefix, add_special_tokens=False)["input_ids"]
        batch = torch.tensor([ids] * n, device=device)
        torch.manual_seed(seed + calls[0])
        calls[0] += 1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                gen = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                     max_new_tokens=max_new_tokens, do_sample=True,
                                     temperature=temperature, top_p=top_p, eos_token_id=stops,
                                     pad_token_id=pad)
        finally:
            model.train(was_training)
        out = []
        for row in gen[:, len(ids):].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        return out

    return sample_impl
