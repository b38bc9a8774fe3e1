"""Reward models: a causal-LM backbone + a reward head component, their trainer, saving and scoring.

- :class:`RewardModel` runs the backbone's transformer body (no LM head: no vocabulary logits)
  with position ids derived from the attention mask (left padding is correct too) and applies
  the head module to the last hidden state.
- :class:`RewardHeadTrainer` is a ``transformers.Trainer`` subclass whose ``compute_loss`` is the
  head component's loss; it logs the head's batch metrics the way TRL's RewardTrainer does.
- Saved artifact: the PEFT adapter (or the full backbone), ``reward_head.safetensors`` and
  ``reward_model.json`` (head name/options, template, base model) + the tokenizer. Reloading
  (:func:`load_reward_model`) scores identically.
- :func:`attach_reward_adapter` loads a saved reward adapter + head onto an existing PEFT model
  with the same base (e.g. a 4-bit policy under PPO) and returns a scorer using it.
- :func:`score` scores rows in length-sorted batches and returns the scores in input order.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import ConfigError, DataError

import torch
from torch import nn
from transformers import Trainer

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "reward_head.safetensors"
META_FILE = "reward_model.json"
FORMAT_VERSION = 1


def _body(backbone: Any) -> Any:
    """The transformer body (no LM head) of a causal LM, PEFT-wrapped or not."""
    model = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


def hidden_size_of(backbone: Any) -> int:
    """The hidden size of a backbone's last hidden state."""
    config = backbone.config if hasattr(backbone, "config") else _body(backbone).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


class RewardModel(nn.Module):
    """A causal-LM backbone (full, LoRA or 4-bit) and a reward head module on its last hidden state."""

    def __init__(self, backbone: Any, head: Any, head_module: nn.Module | None = None, *,
                 tokenizer: Any = None, template: Any = None, template_name: str | None = None,
                 base_model: str | None = None, adapter_name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_module = head_module if head_module is not None else head.build_module(
            hidden_size_of(backbone))
        self.head = head
        self.tokenizer = tokenizer
        self.template = template
        self.template_name = template_name or getattr(template, "name", None)
        self.base_model = base_model
        #: the PEFT adapter this model scores with (None: whatever is active)
        self.adapter_name = adapter_name
        try:
            device = next(p.device for p in backbone.parameters())
            self.head_module.to(device)
        except StopIteration:  # pragma: no cover
            pass

    # -- Trainer integration ---------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The backbone's config (Trainer and PEFT utilities read it)."""
        return self.backbone.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      **kwargs: Any) -> None:
        """Enable (non-reentrant by default) activation checkpointing on the backbone."""
        ckpt = dict(gradient_checkpointing_kwargs or {})
        ckpt.setdefault("use_reentrant", False)
        target = self.backbone
        if hasattr(target, "gradient_checkpointing_enable"):
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        """Disable activation checkpointing on the backbone."""
        if hasattr(self.backbone, "gradient_checkpointing_disable"):
            self.backbone.gradient_checkpointing_disable()

    @property
    def is_peft(self) -> bool:
        """True when the backbone is a PEFT model (the artifact is an adapter)."""
        return hasattr(self.backbone, "peft_config")

    # -- forward -----------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Last hidden state [B, T, H]; position ids count attended tokens (padding-side safe)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = _body(self.backbone)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        """Head outputs at every position ([B, T] or [B, T, C])."""
        with self.using_adapter():
            return self.head_module(self.hidden_states(input_ids, attention_mask))

    @contextlib.contextmanager
    def using_adapter(self) -> Iterator[None]:
        """Activate `adapter_name` for the duration (restoring the previous adapter and grads)."""
        name = self.adapter_name
        if name is None or not self.is_peft or self.backbone.active_adapter == name:
            yield
            return
        previous = self.backbone.active_adapter
        flags = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
        self.backbone.set_adapter(name)
        try:
            yield
        finally:
            self.backbone.set_adapter(previous)
            for n, p in self.backbone.named_parameters():  # set_adapter changes requires_grad
                if n in flags:
                    p.requires_grad_(flags[n])

    @torch.no_grad()
    def scores_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **batch: Any) -> torch.Tensor:
        """One score per sequence (the head's `sequence_scores`), without gradients."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self(input_ids=input_ids, attention_mask=attention_mask)
        return self.head.sequence_scores(outputs, {"input_ids": input_ids,
                                                   "attention_mask": attention_mask, **batch})

    # -- scoring convenience ------------------------------------------------------------------
    def score_rows(self, rows: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[float]:
        """:func:`score` on this model."""
        return score(self, rows, **kwargs)

    def as_reward_function(self, **score_kwargs: Any) -> Any:
        """A TRL-style reward function ``f(prompts, completions, **kw) -> list[float]``."""
        def reward_model_score(prompts: list, completions: list, **_: Any) -> list[float]:
            rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
            return score(self, rows, progress=False, **score_kwargs)

        reward_model_score.__name__ = f"reward_model_{self.head.name}"
        return reward_model_score


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class FeatureDataset(torch.utils.data.Dataset):
    """A list of encoded rows (dicts) as a map-style dataset."""

    def __init__(self, features: Sequence[Mapping[str, Any]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self.features[index]


class HeadCollator:
    """Calls the head component's `collate` with the tokenizer's pad id (picklable)."""

    def __init__(self, head: Any, pad_token_id: int, padding_side: str = "right") -> None:
        self.head, self.pad_token_id, self.padding_side = head, pad_token_id, padding_side

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.head.collate(features, pad_token_id=self.pad_token_id,
                                 padding_side=self.padding_side)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's RewardTrainer does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class RewardHeadTrainer(Trainer):
    """A transformers Trainer whose loss is the reward head component's `compute_loss`.

    `model` is a :class:`RewardModel`; datasets hold rows encoded by `head.encode` (a
    :class:`FeatureDataset` or a list). `args` may be TRL's `RewardConfig` (its
    `disable_dropout` and `center_rewards_coefficient` are honoured) or any TrainingArguments.
    Metrics from `head.batch_metrics` are logged as TRL logs them (`accuracy`,
    `eval_accuracy`, ...), exact over the whole eval set.
    """

    def __init__(self, model: RewardModel, args: Any, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None,
                 data_collator: Any = None, **kwargs: Any) -> None:
        if not isinstance(model, RewardModel):
            raise ConfigError("RewardHeadTrainer: model must be a RewardModel (backbone + head)")
        tokenizer = processing_class if processing_class is not None else model.tokenizer
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if data_collator is None:
            data_collator = HeadCollator(model.head, 0 if pad_id is None else int(pad_id))
        if isinstance(train_dataset, list):
            train_dataset = FeatureDataset(train_dataset)
        if isinstance(eval_dataset, list):
            eval_dataset = FeatureDataset(eval_dataset)
        if getattr(args, "disable_dropout", False):
            disable_dropout(model)
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer,
                         data_collator=data_collator, **kwargs)
        self.can_return_loss = True
        self.label_names = []
        self._head_metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The head's loss on the batch (+ TRL's optional reward-centering term for BT)."""
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.head
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = head.compute_loss(outputs, inputs)
        coef = getattr(self.args, "center_rewards_coefficient", None)
        if coef and "pair_chosen" in inputs:
            scores = head.sequence_scores(outputs, inputs)
            loss = loss + coef * torch.mean(scores ** 2)
        mode = "train" if model.training else "eval"
        for key, (total, count) in head.batch_metrics(outputs, inputs).items():
            acc = self._head_metrics[mode][key]
            acc[0] += total
            acc[1] += count
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """Evaluation: the loss only (metrics accumulate in `compute_loss`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the accumulated head metrics (prefixed `eval_` in evaluation) to the logs."""
        mode = "train" if self.model.training else "eval"
        metrics = {k: v[0] / v[1] for k, v in self._head_metrics[mode].items() if v[1] > 0}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        self._head_metrics[mode].clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Checkpoints and `save_model` write the reward artifact (adapter/backbone + head)."""
        if not self.args.should_save:
            return
        out = output_dir or self.args.output_dir
        save_reward_model(self.accelerator.unwrap_model(self.model), out)
        torch.save(self.args, os.path.join(out, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume: load the checkpoint's adapter/backbone weights and head weights."""
        load_weights_into(model or self.model, resume_from_checkpoint)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------

def _save_head(model: RewardModel, directory: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.head_module.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))


def save_reward_model(model: RewardModel, output_dir: str | os.PathLike,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Save adapter (or full backbone) + head weights + `reward_model.json` + tokenizer, atomically."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model.is_peft:
            names = [model.adapter_name or model.backbone.active_adapter]
            model.backbone.save_pretrained(str(tmp), selected_adapters=names)
            if names[0] != "default" and (tmp / names[0]).is_dir():
                # PEFT nests non-default adapters in a subfolder; the artifact keeps it flat.
                for item in (tmp / names[0]).iterdir():
                    os.replace(item, tmp / item.name)
                (tmp / names[0]).rmdir()
        else:
            model.backbone.save_pretrained(str(tmp))
        _save_head(model, tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        meta = {"format": FORMAT_VERSION, "head": model.head.name,
                "options": dict(getattr(model.head, "options", {})),
                "template": model.template_name, "base_model": model.base_model,
                "adapter": model.is_peft, "hidden_size": hidden_size_of(model.backbone),
                **dict(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        # Replace the destination's artifact files (the folder may hold checkpoints/metrics too).
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """The `reward_model.json` of a saved reward model (ConfigError when it is not one)."""
    path = Path(artifact_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{artifact_dir}: not a saved reward model (no {META_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None


def _load_head_state(head_module: nn.Module, artifact_dir: Path) -> None:
    from safetensors.torch import load_file

    path = artifact_dir / HEAD_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{artifact_dir}: no {HEAD_WEIGHTS} (the reward head weights)")
    device = next(head_module.parameters()).device
    head_module.load_state_dict(load_file(str(path), device=str(device)), strict=True)


def load_weights_into(model: RewardModel, artifact_dir: str | os.PathLike) -> None:
    """Load a saved artifact's adapter (or backbone) and head weights into an existing model."""
    directory = Path(artifact_dir)
    if model.is_peft:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = directory / "adapter_model.safetensors"
        if weights.is_file():
            set_peft_model_state_dict(model.backbone, load_file(str(weights)),
                                      adapter_name=model.adapter_name or model.backbone.active_adapter)
    else:
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(str(directory), dtype=next(
            model.backbone.parameters()).dtype)
        model.backbone.load_state_dict(fresh.state_dict(), strict=False)
    _load_head_state(model.head_module, directory)


def load_reward_model(artifact_dir: str | os.PathLike, *, quantization: Any = None,
                      dtype: Any = None) -> RewardModel:
    """Load a saved reward model (base + adapter, or full backbone) with its head, for scoring."""
    from .. import registry
    from ..models import load_causal_lm, load_tokenizer, resolve_model

    directory = Path(artifact_dir)
    meta = read_meta(directory)
    head = registry().reward_heads.get(meta["head"], **meta.get("options", {}))
    if meta.get("adapter"):
        from peft import PeftModel

        if not meta.get("base_model"):
            raise ConfigError(f"{directory}: {META_FILE} names no base_model for the adapter")
        base = load_causal_lm(resolve_model(meta["base_model"]), quantization=quantization, dtype=dtype)
        backbone = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    else:
        backbone = load_causal_lm(str(directory), quantization=quantization, dtype=dtype)
    tokenizer = load_tokenizer(directory)
    template = None
    if meta.get("template"):
        template = registry().chat_templates.get(meta["template"])
    model = RewardModel(backbone, head, tokenizer=tokenizer, template=template,
                        template_name=meta.get("template"), base_model=meta.get("base_model"))
    _load_head_state(model.head_module, directory)
    model.eval()
    return model


def attach_reward_adapter(peft_model: Any, artifact_dir: str | os.PathLike,
                          adapter_name: str = "reward", *, tokenizer: Any = None,
                          template: Any = None) -> RewardModel:
    """Load a saved reward adapter + head onto `peft_model` (same base); return a scorer.

    The policy's active adapter and its trainable flags are left as they were: the returned
    :class:`RewardModel` switches to `adapter_name` only inside its own forward passes. Score
    with ``scorer.scores_for(input_ids, attention_mask)`` or ``score(scorer, rows)``.
    """
    from .. import registry

    directory = Path(artifact_dir)
    meta = read_meta(directory)
    if not meta.get("adapter"):
        raise ConfigError(f"{directory}: a fully fine-tuned reward model cannot be attached as an "
                          "adapter; train it with `lora`")
    if not hasattr(peft_model, "load_adapter"):
        raise ConfigError("attach_reward_adapter: the model must be a peft.PeftModel")
    hidden = hidden_size_of(peft_model)
    if meta.get("hidden_size") not in (None, hidden):
        raise ConfigError(f"{directory}: reward model hidden size {meta['hidden_size']} does not "
                          f"match the model's {hidden} (different base model)")
    base_ref = getattr(peft_model.peft_config[peft_model.active_adapter], "base_model_name_or_path", None)
    if meta.get("base_model") and base_ref and Path(str(base_ref)).name != Path(str(meta["base_model"])).name:
        logger.warning("reward adapter %s was trained on %s; attaching it to %s", directory,
                       meta["base_model"], base_ref)
    active = peft_model.active_adapter
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=False)
    if peft_model.active_adapter != active:
        peft_model.set_adapter(active)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    head = registry().reward_heads.get(meta["head"], **meta.get("options", {}))
    if tokenizer is None and (directory / "tokenizer_config.json").is_file():
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(directory)
    if template is None and meta.get("template"):
        template = registry().chat_templates.get(meta["template"])
    scorer = RewardModel(peft_model, head, tokenizer=tokenizer, template=template,
                         template_name=meta.get("template"), base_model=meta.get("base_model"),
                         adapter_name=adapter_name)
    _load_head_state(scorer.head_module, directory)
    for p in scorer.head_module.parameters():
        p.requires_grad_(False)
    return scorer


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def _model_device(model: RewardModel) -> torch.device:
    return next(model.head_module.parameters()).device


def _encode_for_scoring(model: RewardModel, rows: Sequence[Mapping[str, Any]], tokenizer: Any,
                        template: Any, max_length: int | None) -> list[dict[str, Any]]:
    feats = []
    for i, row in enumerate(rows):
        try:
            feats.append(model.head.encode_for_scoring(row, tokenizer=tokenizer, template=template,
                                                       max_length=max_length))
        except DataError as exc:
            raise DataError(f"score: row {i}: {exc}") from None
    return feats


def _run_batches(model: RewardModel, feats: list[dict[str, Any]], fn: Any, *, pad_token_id: int,
                 batch_size: int, sort_by_length: bool, padding_side: str, progress: bool,
                 desc: str = "Scoring") -> tuple[list[Any], dict[str, Any]]:
    """Apply `fn(head_outputs, batch) -> per-row values` over batches; results in input order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"score: batch_size must be >= 1, got {batch_size}")
    order = list(range(len(feats)))
    if sort_by_length:  # longest first: similar lengths share a batch, and OOM shows up early
        order.sort(key=lambda i: -len(feats[i]["input_ids"]))
    device = _model_device(model)
    out: list[Any] = [None] * len(feats)
    tokens = padded = 0
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    try:
        with torch.no_grad():
            for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch = model.head.collate_for_scoring([feats[i] for i in idx],
                                                       pad_token_id=pad_token_id,
                                                       padding_side=padding_side)
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                padded += int(batch["attention_mask"].numel())
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                for i, v in zip(idx, fn(outputs, batch)):
                    out[i] = v
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    stats = {"rows": len(feats), "batches": len(batches), "tokens": tokens, "padded_tokens": padded,
             "padding_fraction": (padded - tokens) / padded if padded else 0.0,
             "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf")}
    return out, stats


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


def score(model: RewardModel, rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
          template: Any = None, batch_size: int = 16, max_length: int | None = None,
          sort_by_length: bool = True, padding_side: str = "right", progress: bool = True,
          return_stats: bool = False) -> Any:
    """Score rows (``prompt`` + ``completion``, PRM ``steps``, or ``input_ids``) in input order.

    Batches are formed from rows sorted by length (longest first) to cut padding; the scores
    come back in the order of `rows`. With `return_stats`, returns ``(scores, stats)`` where
    stats has ``tokens``, ``padded_tokens``, ``padding_fraction``, ``seconds``, ``tokens_per_s``.
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    template = template if template is not None else model.template
    feats = _encode_for_scoring(model, rows, tokenizer, template, max_length)
    head = model.head

    def fn(outputs: torch.Tensor, batch: dict[str, Any]) -> list[float]:
        return [float(v) for v in head.sequence_scores(outputs, batch).float().cpu().tolist()]

    scores, stats = _run_batches(model, feats, fn, pad_token_id=_pad_id(tokenizer),
                                 batch_size=batch_size, sort_by_length=sort_by_length,
                                 padding_side=padding_side, progress=progress)
    return (scores, stats) if return_stats else scores


def step_outputs(model: RewardModel, rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
                 template: Any = None, batch_size: int = 16, max_length: int | None = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """PRM per-row outputs: ``score``, per-step ``p_correct`` and ``predicted`` labels (-1/0/+1)."""
    head = model.head
    if not hasattr(head, "step_predictions"):
        raise ConfigError(f"step_outputs: head {head.name!r} has no per-step outputs")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    template = template if template is not None else model.template
    feats = _encode_for_scoring(model, rows, tokenizer, template, max_length)

    def fn(outputs: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        scores = head.sequence_scores(outputs, batch).float().cpu().tolist()
        probs = head.step_probabilities(outputs, batch)
        preds = head.step_predictions(outputs, batch)
        return [{"score": s, "p_correct": p, "predicted": q} for s, p, q in zip(scores, probs, preds)]

    out, _ = _run_batches(model, feats, fn, pad_token_id=_pad_id(tokenizer), batch_size=batch_size,
                          sort_by_length=True, padding_side="right", progress=progress)
    return out
