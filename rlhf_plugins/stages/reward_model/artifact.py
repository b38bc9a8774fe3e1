"""A reward model's artifact: saving a :class:`~.model.RewardModel` and loading it back.

- Saved artifact: a standard transformers classification model (:mod:`.hf_export`): a
  peft ``SEQ_CLS``/``TOKEN_CLS`` adapter with the head in ``modules_to_save``, or a full
  ``*ForSequenceClassification``/``*ForTokenClassification`` model; the tokenizer with the
  training template as ``chat_template``; ``reward_model.json`` (head name/options, template,
  base model, quantization). Heads without a linear ``score`` keep the first format (causal-LM
  adapter + ``reward_head.safetensors``). Reloading (:func:`load_reward_model`) scores
  identically, with the recorded quantization; it also loads any transformers
  sequence-classification reward model directory.
- :func:`attach_reward_adapter` loads a saved reward adapter + head onto an existing PEFT model
  with the same base (e.g. a 4-bit policy under PPO) and returns a scorer using it.
- :func:`~.scoring.score` scores rows in length-sorted batches and returns the scores in
  input order; :class:`~.trainer.RewardHeadTrainer` trains the head.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...artifact_recipe import peft_from_pretrained
from ...cache import atomic_update_dir
from ...errors import ConfigError
from ...models import backbone_of, hidden_size_of
from ...protocols import member
from .model import RewardModel

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "reward_head.safetensors"
META_FILE = "reward_model.json"
FORMAT_VERSION = 2


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------

#: `load_reward_model(quantization=RECORDED)`: load with the quantization the RM was trained with
RECORDED = "recorded"


def _save_head(model: RewardModel, directory: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.head_module.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))


def save_reward_model(model: RewardModel, output_dir: str | os.PathLike,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Save the reward model as a transformers artifact + `reward_model.json` + tokenizer, atomically.

    A linear head saves as a sequence- (preference) or token-classification adapter / model
    (:mod:`.hf_export`); any other head as the causal-LM adapter / model + its head file.
    `extra` adds to the metadata (the stage records ``quantization`` there).
    """
    from .hf_export import hf_kind, save_tokenizer, write_hf_artifact

    def fill(tmp: Path) -> Path:
        folder = tmp
        kind = hf_kind(model)
        tok_meta = save_tokenizer(model, tmp) if model.tokenizer is not None else {}
        hf_meta: dict[str, Any] = {"hf_class": None}
        if kind is not None:
            hf_meta = write_hf_artifact(model, tmp, kind, tok_meta.get("pad_token_id"))
        elif model.is_peft:
            name = model.adapter_name or model.backbone.active_adapter
            model.backbone.save_pretrained(str(tmp), selected_adapters=[name])
            if name != "default" and (tmp / name).is_dir():
                folder = tmp / name  # PEFT nests a non-default adapter; the artifact keeps it flat
                for child in tmp.iterdir():
                    if child.is_file():
                        child.replace(folder / child.name)
            _save_head(model, folder)
        else:
            model.backbone.save_pretrained(str(tmp))
            _save_head(model, folder)
        meta = {"format": FORMAT_VERSION, "head": model.head_name,
                "options": dict(member(model.head, "reward_heads", "options")),
                "template": model.template_name, "base_model": model.base_model,
                "adapter": model.is_peft, "hidden_size": hidden_size_of(model.backbone),
                "quantization": model.quantization,
                "score_position": "the last token of the conversation rendered with the template "
                                  "(the tokenizer's chat_template), cut right after the "
                                  "completion's end-of-turn token",
                **hf_meta, **tok_meta, **dict(extra or {})}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return folder

    # Replaces the destination's artifact files (the folder may hold checkpoints/metrics too).
    return atomic_update_dir(output_dir, fill)


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


def _load_score_state(head_module: nn.Module, state: Mapping[str, torch.Tensor],
                      meta: Mapping[str, Any]) -> None:
    """transformers' `score` weights (and bias) into the head module; the offset as recorded."""
    linear = head_module.score
    with torch.no_grad():
        linear.weight.copy_(state["weight"].to(linear.weight.device, linear.weight.dtype))
        if linear.bias is not None:
            bias = state.get("bias")
            linear.bias.copy_(torch.zeros_like(linear.bias) if bias is None
                              else bias.to(linear.bias.device, linear.bias.dtype))
        elif state.get("bias") is not None and bool(state["bias"].abs().gt(0).any()):
            raise ConfigError("reward model: the saved score layer has a bias the head has not")
        offset = getattr(head_module, "offset", None)
        if offset is not None:
            offset.fill_(float(meta.get("score_offset") or 0.0))


def _artifact_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(body or LoRA weights, `score` weights) of a saved classification artifact."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    files = [adapter] if adapter.is_file() else sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"{directory}: no weights (adapter_model.safetensors / model.safetensors)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    score_state = {k.rsplit(".", 1)[1]: v for k, v in weights.items()
                   if k.rsplit(".", 2)[-2:-1] == ["score"] and k.split(".")[-1] in ("weight", "bias")}
    rest = {k: v for k, v in weights.items() if not k.rsplit(".", 2)[-2:-1] == ["score"]}
    return rest, score_state


def load_weights_into(model: RewardModel, artifact_dir: str | os.PathLike) -> None:
    """Load a saved artifact's adapter (or backbone) and head weights into an existing model."""
    directory = Path(artifact_dir)
    meta = read_meta(directory) if (directory / META_FILE).is_file() else {}
    if meta.get("hf_class"):
        body, head_state = _artifact_state(directory)
        if model.is_peft:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.backbone, body,
                                      adapter_name=model.adapter_name or model.backbone.active_adapter)
        else:
            target = backbone_of(model.backbone)
            prefix = f"{getattr(model.backbone, 'base_model_prefix', 'model')}."
            target.load_state_dict({k.removeprefix(prefix): v for k, v in body.items()}, strict=True)
        _load_score_state(model.head_module, head_state, meta)
        return
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


def load_reward_model(artifact_dir: str | os.PathLike, *, quantization: Any = RECORDED,
                      dtype: Any = None, template: str | None = None) -> RewardModel:
    """Load a reward model for scoring, the way it was trained.

    `artifact_dir` is this project's reward model (``reward_model.json``) or any transformers
    sequence-classification reward model directory / peft SEQ_CLS adapter. `quantization`:
    ``RECORDED`` (default) = the quantization recorded in ``reward_model.json`` (what it was
    trained on), None = full precision, or a mapping / :class:`~rlhf_plugins.models.QuantSettings`.
    `template` overrides the chat template (a plugin name).
    """
    from ... import registry
    from ...models import load_causal_lm, load_tokenizer, quant_settings, resolve_model
    from .hf_export import (is_hf_reward_model_dir, load_classification_model,
                            load_hf_reward_model, score_layer)

    directory = Path(artifact_dir)
    if not (directory / META_FILE).is_file() and is_hf_reward_model_dir(directory):
        return load_hf_reward_model(directory, dtype=dtype, template=template,
                                    quantization=None if quantization == RECORDED else quantization)
    meta = read_meta(directory)
    quant = quant_settings(meta.get("quantization") if quantization == RECORDED else quantization)
    head = registry().reward_heads.get(meta["head"], **meta.get("options", {}))
    kind = meta.get("hf_class")
    if meta.get("adapter") and not meta.get("base_model"):
        raise ConfigError(f"{directory}: {META_FILE} names no base_model for the adapter")
    if kind:
        labels = {"num_labels": int(meta.get("num_labels") or 1)}
        if meta.get("adapter"):
            base = load_classification_model(resolve_model(_adapter_base(directory, meta)), kind,
                                             quantization=quant, dtype=dtype, **labels)
            backbone = peft_from_pretrained(base, directory, is_trainable=False)
        else:
            backbone = load_classification_model(directory, kind, quantization=quant, dtype=dtype)
    elif meta.get("adapter"):
        base = load_causal_lm(resolve_model(_adapter_base(directory, meta)), quantization=quant,
                              dtype=dtype)
        backbone = peft_from_pretrained(base, directory, is_trainable=False)
    else:
        backbone = load_causal_lm(str(directory), quantization=quant, dtype=dtype)
    tokenizer = load_tokenizer(directory)
    name = template or meta.get("template")
    tpl = registry().chat_templates.get(name) if name else None
    model = RewardModel(backbone, head, tokenizer=tokenizer, template=tpl, template_name=name,
                        base_model=meta.get("base_model"), head_name=meta["head"])
    model.quantization = dataclasses.asdict(quant) if quant is not None else None
    if kind:
        layer = score_layer(backbone)
        _load_score_state(model.head_module, {k: v.detach() for k, v in layer.state_dict().items()}, meta)
    else:
        _load_head_state(model.head_module, directory)
    model.eval()
    return model


def _adapter_base(directory: Path, meta: Mapping[str, Any]) -> str:
    """The base of a saved reward adapter: its adapter_config.json's (portable) reference, else
    the one recorded in reward_model.json."""
    from ...models import adapter_base_model

    if (directory / "adapter_config.json").is_file():
        return adapter_base_model(directory)
    return str(meta["base_model"])


def _lora_config_for_causal_lm(directory: Path) -> Any:
    """The saved adapter's LoRA config as a causal-LM adapter (its `score` copy left out)."""
    from peft import LoraConfig

    config = json.loads((directory / "adapter_config.json").read_text())
    known = {f for f in LoraConfig.__dataclass_fields__}
    config = {k: v for k, v in config.items() if k in known}
    config["modules_to_save"] = [m for m in (config.get("modules_to_save") or [])
                                 if m not in ("score", "classifier")] or None
    config["task_type"] = "CAUSAL_LM"
    config["inference_mode"] = True
    return LoraConfig(**config)


def attach_reward_adapter(peft_model: Any, artifact_dir: str | os.PathLike,
                          adapter_name: str = "reward", *, tokenizer: Any = None,
                          template: Any = None) -> RewardModel:
    """Load a saved reward adapter + head onto `peft_model` (same base); return a scorer.

    The policy's active adapter and its trainable flags are left as they were: the returned
    :class:`RewardModel` switches to `adapter_name` only inside its own forward passes. Score
    with ``scorer.scores_for(input_ids, attention_mask)`` or ``score(scorer, rows)``.
    """
    from ... import registry

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
    head_state: dict[str, torch.Tensor] = {}
    if meta.get("hf_class"):
        from peft import set_peft_model_state_dict

        body, head_state = _artifact_state(directory)
        peft_model.add_adapter(adapter_name, _lora_config_for_causal_lm(directory))
        set_peft_model_state_dict(peft_model, body, adapter_name=adapter_name)
    else:
        peft_model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=False)
    if peft_model.active_adapter != active:
        peft_model.set_adapter(active)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    head = registry().reward_heads.get(meta["head"], **meta.get("options", {}))
    if tokenizer is None and (directory / "tokenizer_config.json").is_file():
        from ...models import load_tokenizer

        tokenizer = load_tokenizer(directory)
    if template is None and meta.get("template"):
        template = registry().chat_templates.get(meta["template"])
    scorer = RewardModel(peft_model, head, tokenizer=tokenizer, template=template,
                         template_name=meta.get("template"), base_model=meta.get("base_model"),
                         adapter_name=adapter_name, head_name=meta["head"])
    scorer.quantization = meta.get("quantization")
    if meta.get("hf_class"):
        _load_score_state(scorer.head_module, head_state, meta)
    else:
        _load_head_state(scorer.head_module, directory)
    for p in scorer.head_module.parameters():
        p.requires_grad_(False)
    return scorer
