"""Reward models as standard transformers artifacts, in and out.

**Out** (:func:`write_hf_artifact`): a reward head whose module is a linear ``score`` layer on the
last hidden state is saved the way transformers stores classification models, so plain
``AutoModelFor...`` (+ ``peft.PeftModel``) loads it:

- a ``preference`` head (Bradley-Terry) -> ``*ForSequenceClassification`` with ``num_labels=1``
  (its ``score`` has no bias, as in transformers);
- ``outcome`` / ``step`` / ``value`` heads -> ``*ForTokenClassification`` (per-token logits:
  ORM/value 1 label, PRM 3 labels -1/0/+1); the head's aggregation (e.g. the ORM's P(correct)
  at the last completion token) is applied to those logits and recorded in ``reward_model.json``;
- a LoRA reward model is a peft adapter with ``task_type`` ``SEQ_CLS``/``TOKEN_CLS`` and the head
  in ``modules_to_save: [score]``; a fully fine-tuned one is a complete classification model.

The saved tokenizer carries the training template as its ``chat_template`` and a pad token that
never ends a scored sequence (transformers' sequence classifiers read the last token that is not
the pad token: with SmolLM2's pad == eos == ``<|im_end|>`` they would skip the end-of-turn token
the reward model was trained to score). The scored sequence is the rendered conversation cut
right after the completion's end-of-turn token.

A head that does not fit (another module, a bias on a sequence head) is saved in the first
format: the causal-LM adapter or model plus ``reward_head.safetensors``.

**In** (:func:`load_hf_reward_model`): any transformers sequence-classification reward model
directory (one trained by TRL's ``RewardTrainer``, one downloaded, or a peft ``SEQ_CLS``
adapter) scores as a ``bradley_terry`` reward model, at the position transformers reads (the
last token that is not ``config.pad_token_id``), with its tokenizer's own chat template.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ...models import quant_settings

if TYPE_CHECKING:  # pragma: no cover
    from .model import RewardModel

logger = logging.getLogger(__name__)

__all__ = ["HF_SEQUENCE", "HF_TOKEN", "check_reward_model_dir", "hf_kind", "is_hf_reward_model_dir", "load_hf_reward_model",
           "load_classification_model", "save_tokenizer", "score_layer", "score_state",
           "write_hf_artifact"]

HF_SEQUENCE = "sequence_classification"
HF_TOKEN = "token_classification"
_TASK_TYPES = {HF_SEQUENCE: "SEQ_CLS", HF_TOKEN: "TOKEN_CLS"}
_SCORE = "score"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _auto_class(kind: str) -> Any:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForSequenceClassification if kind == HF_SEQUENCE else AutoModelForTokenClassification


def _model_class(kind: str, config: Any) -> Any | None:
    """The transformers class of `kind` for `config`'s architecture (None when it has none)."""
    mapping = _auto_class(kind)._model_mapping
    try:
        return mapping[type(config)]
    except (KeyError, ValueError):
        return None


def hf_kind(model: "RewardModel") -> str | None:
    """The classification kind `model` saves as (None: the first format, head file apart)."""
    from torch import nn

    from ...models import unwrap
    from ...protocols import member

    linear = getattr(model.head_module, _SCORE, None)
    extra = [n for n, _ in model.head_module.named_parameters() if not n.startswith(f"{_SCORE}.")]
    if not isinstance(linear, nn.Linear) or extra:
        return None
    kind = HF_SEQUENCE if member(model.head, "reward_heads", "label_kind") == "preference" else HF_TOKEN
    if kind == HF_SEQUENCE and linear.bias is not None:
        return None
    backbone = unwrap(model.backbone)
    if hasattr(backbone, "get_base_model"):
        backbone = backbone.get_base_model()
    config = getattr(backbone, "config", None)
    cls = _model_class(kind, config) if config is not None else None
    if cls is None or getattr(cls, "base_model_prefix", None) != getattr(backbone, "base_model_prefix", None):
        return None
    return kind


def score_state(model: "RewardModel") -> dict[str, Any]:
    """The head as transformers' ``score`` weights (a token head's score offset folded into its bias)."""
    import torch

    linear = model.head_module.score
    weight = linear.weight.detach().float().cpu().clone()
    state = {"weight": weight}
    offset = getattr(model.head_module, "offset", None)
    if linear.bias is not None:
        bias = linear.bias.detach().float().cpu().clone()
        if offset is not None:
            bias = bias - float(offset)
        state["bias"] = bias
    elif weight.shape[0] > 1 or hf_kind(model) == HF_TOKEN:
        bias = torch.zeros(weight.shape[0])
        if offset is not None:
            bias = bias - float(offset)
        state["bias"] = bias
    dtype = linear.weight.dtype
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def _distinct_pad(tokenizer: Any) -> tuple[str | None, int | None]:
    """A pad token that is neither eos nor bos (the pad, else unk, else an added `pad` token)."""
    reserved = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)}
    candidates = [tokenizer.pad_token, getattr(tokenizer, "unk_token", None)]
    candidates += [t for t in getattr(tokenizer, "all_special_tokens", []) if "pad" in str(t).lower()]
    for token in candidates:
        if not token:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid not in reserved:
            return str(token), int(tid)
    return None, None


def save_tokenizer(model: "RewardModel", folder: Path) -> dict[str, Any]:
    """Save the tokenizer with the training template as chat_template and a distinct pad; meta."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        return {}
    tok = copy.deepcopy(tokenizer)
    meta: dict[str, Any] = {}
    jinja = ""
    if model.template is not None:
        try:
            jinja = model.template.jinja or ""
        except NotImplementedError:
            jinja = ""
    if jinja:
        tok.chat_template = jinja
    elif model.template_name not in (None, "tokenizer"):
        meta["chat_template_note"] = (f"template {model.template_name!r} declares no Jinja source; "
                                      "the tokenizer's own chat_template was kept")
    pad, pad_id = _distinct_pad(tok)
    if pad is not None:
        tok.pad_token = pad
    else:
        meta["pad_note"] = ("no token distinct from eos/bos: transformers' sequence classifier "
                            "reads the last non-pad token, which may differ from the scored one")
    tok.padding_side = "right"
    tok.save_pretrained(str(folder))
    meta.update(pad_token=tok.pad_token, pad_token_id=tok.pad_token_id)
    return meta


def _peft_config_dict(backbone: Any, adapter: str, kind: str, base_model: str | None) -> dict[str, Any]:
    config = backbone.peft_config[adapter].to_dict()
    saved = [m for m in (config.get("modules_to_save") or []) if m not in ("lm_head", _SCORE)]
    config.update(task_type=_TASK_TYPES[kind], modules_to_save=saved + [_SCORE], inference_mode=True)
    if base_model:
        config["base_model_name_or_path"] = base_model
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    return config


def write_hf_artifact(model: "RewardModel", folder: Path, kind: str, pad_token_id: int | None) -> dict[str, Any]:
    """Write `model` into `folder` as a classification adapter or model of `kind`; returns meta."""
    import torch
    from safetensors.torch import save_file

    from ...models import backbone_of, unwrap

    head = score_state(model)
    num_labels = int(head["weight"].shape[0])
    meta: dict[str, Any] = {"hf_class": kind, "num_labels": num_labels}
    offset = getattr(model.head_module, "offset", None)
    if kind == HF_SEQUENCE and offset is not None and float(offset) != 0.0:
        # transformers' sequence `score` has no bias: its scores are ours + score_offset
        meta["score_offset"] = float(offset)
    if model.is_peft:
        from peft import get_peft_model_state_dict

        backbone = unwrap(model.backbone)
        name = model.adapter_name or backbone.active_adapter
        state = {k: v.detach().contiguous().cpu()
                 for k, v in get_peft_model_state_dict(backbone, adapter_name=name).items()
                 if ".lm_head." not in k}
        for key, value in head.items():
            state[f"base_model.model.{_SCORE}.{key}"] = value.cpu()
        save_file(state, str(folder / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = _peft_config_dict(backbone, name, kind, model.base_model)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        return meta
    body = backbone_of(model.backbone)
    config = copy.deepcopy(unwrap(model.backbone).config)
    config.num_labels = num_labels
    if kind == HF_TOKEN:
        config.token_classification_bias = True
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    cls = _model_class(kind, config)
    with torch.device("meta"):
        clf = cls(config)
    getattr(clf, clf.base_model_prefix).load_state_dict(body.state_dict(), assign=True, strict=True)
    clf.score.load_state_dict({k: v.to(next(body.parameters()).device) for k, v in head.items()},
                              assign=True, strict=True)
    clf.config.architectures = [cls.__name__]
    clf.save_pretrained(str(folder))
    return meta


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_classification_model(path: str | os.PathLike, kind: str, *, quantization: Any = None,
                              dtype: Any = None, **config_kwargs: Any) -> Any:
    """``AutoModelFor{Sequence,Token}Classification.from_pretrained`` with our 4-bit/dtype rules."""
    from ...models import load_pretrained

    return load_pretrained(_auto_class(kind), path, quantization=quant_settings(quantization),
                           dtype=dtype, what="reward model", **config_kwargs)


def score_layer(model: Any) -> Any:
    """The `score` Linear of a (peft-wrapped) classification model (the adapter's own copy)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = inner.score
    copies = getattr(layer, "modules_to_save", None)
    if copies is not None:  # peft's ModulesToSaveWrapper: the active adapter's copy
        active = layer.active_adapter
        layer = copies[active if isinstance(active, str) else active[0]]
    return layer


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_hf_reward_model_dir(path: str | os.PathLike) -> bool:
    """True for a transformers sequence-classification model dir or a peft SEQ_CLS adapter dir."""
    p = Path(path)
    adapter = _json(p / "adapter_config.json")
    if adapter:
        return adapter.get("task_type") == "SEQ_CLS"
    archs = _json(p / "config.json").get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_hf_reward_model(path: str | os.PathLike, *, quantization: Any = None, dtype: Any = None,
                         template: str | None = None) -> "RewardModel":
    """A transformers sequence-classification reward model (dir or SEQ_CLS adapter) as a scorer.

    Scores are what transformers computes: the ``score`` logit at the last token that is not
    ``config.pad_token_id``, on the conversation rendered with the tokenizer's own chat template
    (or `template`, a chat template plugin name) and cut after the completion's end-of-turn.
    """
    from torch import nn

    from ... import registry
    from ...models import load_tokenizer, resolve_model
    from .model import RewardModel

    directory = Path(path)
    adapter = _json(directory / "adapter_config.json")
    if adapter:
        from ...artifact_recipe import peft_from_pretrained, resolve_base

        base_ref = adapter.get("base_model_name_or_path")
        if not base_ref:
            raise ConfigError(f"reward_model: {directory}: adapter_config.json names no base model")
        base_ref = resolve_base(directory, base_ref)
        base = load_classification_model(resolve_model(base_ref), HF_SEQUENCE, quantization=quantization,
                                         dtype=dtype, num_labels=1)
        model = peft_from_pretrained(base, directory, is_trainable=False)
        inner = model.get_base_model()
        tok_dir = directory if (directory / "tokenizer_config.json").is_file() else resolve_model(base_ref)
    else:
        model = load_classification_model(directory, HF_SEQUENCE, quantization=quantization, dtype=dtype)
        inner = model
        tok_dir = directory
    if int(inner.config.num_labels) != 1:
        raise ConfigError(f"reward_model: {directory}: a sequence classifier with "
                          f"{inner.config.num_labels} labels is not a reward model (num_labels must be 1)")
    tokenizer = load_tokenizer(tok_dir)
    pad_id = inner.config.get_text_config().pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        inner.config.pad_token_id = pad_id
    name = template or "tokenizer"
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"reward_model: {directory}: its tokenizer has no chat_template; save one "
                          "with the tokenizer (the template the reward model was trained with)")
    tpl = registry().chat_templates.get(name)
    head = registry().reward_heads.get("bradley_terry")
    layer = score_layer(model)
    module = head.build_module(int(inner.config.get_text_config().hidden_size))
    if not isinstance(getattr(module, _SCORE, None), nn.Linear):
        raise ConfigError("reward_model: the bradley_terry head has no linear score layer")
    module.score.load_state_dict({k: v for k, v in layer.state_dict().items()
                                  if k in dict(module.score.named_parameters())}, strict=True)
    scorer = RewardModel(model, head, module, tokenizer=tokenizer, template=tpl, template_name=name,
                         base_model=str(adapter.get("base_model_name_or_path") or directory),
                         head_name="bradley_terry")
    scorer.score_pad_token_id = None if pad_id is None else int(pad_id)
    scorer.eval()
    return scorer


def check_reward_model_dir(path: str | os.PathLike, field: str = "reward_model") -> Path:
    """`path` if it is a reward model this project loads (ours or transformers'), else ConfigError."""
    directory = Path(path).expanduser()
    if (directory / "reward_model.json").is_file() or is_hf_reward_model_dir(directory):
        return directory
    if not directory.is_dir():
        raise ConfigError(f"{field}: {directory}: no such directory")
    raise ConfigError(f"{field}: {directory}: not a reward model (neither an `rlhf-plugins rm` "
                      "output with reward_model.json nor a transformers sequence-classification "
                      "model / peft SEQ_CLS adapter)")
