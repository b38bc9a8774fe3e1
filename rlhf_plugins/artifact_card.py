"""The model card (README.md) of every artifact folder a stage leaves: how to load it as trained
(the plain transformers + peft recipe of :mod:`.artifact_recipe`), the base and its quantization,
the stage, template, data, plugins and library versions, and the held-out result.

It replaces the card TRL or peft wrote there (TRL's says "fine-tuned version of [None]" when the
model came from a local folder). Light module: no torch at import.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .artifact_recipe import (CAUSAL_LM, OURS, SEQUENCE_CLS, TOKEN_CLS, bnb_config, model_dtype,
                              recipe_code, write_load_recipe)
from .cache import atomic_write_text, read_json

CARD_FILE = "README.md"
#: the libraries whose versions a card records
_LIBRARIES = ("rlhf-plugins", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def _versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _template_jinja(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else None


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, default=str)}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _is_heldout(key: str) -> bool:
    return key.startswith(("eval_", "heldout"))


def _what(recipe: Mapping[str, Any], stage: str) -> str:
    kind = {CAUSAL_LM: "causal language model", SEQUENCE_CLS: "sequence-classification reward model",
            TOKEN_CLS: "token-classification reward model",
            OURS: "reward model (causal-LM body + a reward head)"}[recipe["auto_class"]]
    form = "a LoRA adapter for a" if recipe.get("adapter") else "a"
    quant = " on a 4-bit base (QLoRA)" if recipe.get("quantization_config") else ""
    return f"{form} {kind}{quant}, trained by the `{stage}` stage of rlhf-plugins"


def model_card(folder: str | os.PathLike, recipe: Mapping[str, Any], *, stage: str,
               record: Mapping[str, Any], metrics: Mapping[str, Any],
               plugins: Mapping[str, str]) -> str:
    """The README.md text of an artifact folder."""
    folder = Path(folder)
    library = "peft" if recipe.get("adapter") else "transformers"
    lines = ["---", f"library_name: {library}", f"tags: [rlhf-plugins, {stage}]", "---", "",
             f"# {folder.name}", "", f"This folder is {_what(recipe, stage)}.", "",
             "## Load it as trained", ""]
    if recipe["auto_class"] == OURS:
        lines += ["Its head is not a linear `score` layer, so no transformers class holds it:",
                  "", "```python", "from rlhf_plugins.stages.reward_model.artifact import "
                  "load_reward_model", "", 'model = load_reward_model(".")', "```", ""]
    else:
        lines += ["Plain transformers + peft (no rlhf-plugins needed); this is the model the stage "
                  "evaluated (same logits):", "", "```python", recipe_code(recipe).rstrip(), "```",
                  "", "With rlhf-plugins installed, `rlhf_plugins.load_as_trained(\".\")` returns the "
                  "same `(model, tokenizer)`."]
        if recipe["auto_class"] == SEQUENCE_CLS:
            lines += ["", "The score of a conversation is `model(**inputs).logits[0, 0]` on the "
                      "conversation rendered with the tokenizer's chat template and cut right after "
                      "the answer's end-of-turn token (the pad token is distinct from it)."]
        elif recipe["auto_class"] == TOKEN_CLS:
            lines += ["", "Its logits are per token; the head's aggregation (which token, which "
                      "transform) is recorded in `reward_model.json`."]
        if recipe.get("quantization_config"):
            lines += ["", "The base loads in 4 bits as during training; peft warns that "
                      "`quantization_config` in adapter_config.json is an unexpected key (it is "
                      "this project's record of the base's quantization) and ignores it."]
        lines.append("")
    rows = [("stage", stage)]
    if recipe.get("adapter"):
        rows.append(("base model", f"`{recipe['base']}`"
                     + (" (relative to this folder)" if recipe.get("base_is_path") else "")
                     + (f", trained from `{record['base_model']}`" if record.get("base_model") else "")))
        rows.append(("base quantization", _value(recipe["quantization_config"])
                     if recipe.get("quantization_config") else "none (full precision)"))
    elif record.get("base_model"):
        rows.append(("trained from", f"`{record['base_model']}`"))
    if record.get("made_from"):
        rows.append(("made from", record["made_from"]))
    rows.append(("dtype", recipe["dtype"]))
    for key in ("template", "masking", "head", "dataset"):
        if record.get(key) is not None:
            rows.append((key if key != "dataset" else "data", _value(record[key])))
    for name, provider in sorted(plugins.items()):
        rows.append((f"plugin `{name}`", provider))
    for name, version in _versions().items():
        rows.append((f"version `{name}`", version))
    lines += ["## Training", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    scalars = {k: v for k, v in metrics.items() if k != "log_history" and v is not None}
    heldout = {k: v for k, v in scalars.items() if _is_heldout(k)}
    lines += ["", "## Held-out result", ""]
    lines += [f"- `{k}`: {_value(v)}" for k, v in heldout.items()] or ["No held-out evaluation ran."]
    lines += ["", "## Metrics", ""]
    lines += [f"- `{k}`: {_value(v)}" for k, v in scalars.items() if not _is_heldout(k)]
    jinja = _template_jinja(folder)
    if jinja:
        lines += ["", "## Training template", "", "The tokenizer's `chat_template`:", "",
                  "```jinja", jinja.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _classification(meta: Mapping[str, Any]) -> tuple[str, int | None]:
    kind = meta.get("hf_class")
    if kind == "sequence_classification":
        return SEQUENCE_CLS, 1
    if kind == "token_classification":
        return TOKEN_CLS, int(meta.get("num_labels") or 1)
    return OURS, None


def _saved_dtype(folder: Path) -> str:
    config = read_json(folder / "config.json")
    config = config if isinstance(config, dict) else {}
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def write_artifact_files(model: Any, output_dir: str | os.PathLike, *, stage: str,
                         record: Mapping[str, Any], quantization: Any, metrics: Mapping[str, Any],
                         plugins: Mapping[str, str]) -> list[Path]:
    """Write the load recipe and model card of a finished stage's artifact folder(s): the output
    folder (adapter, model or reward model) and its `merged` model; returns the folders."""
    from .models import base_model_of

    out = Path(output_dir)
    base = record.get("base_model")
    base = base_model_of(base) if base else None
    folders: list[tuple[Path, dict[str, Any]]] = []
    meta = read_json(out / "reward_model.json")
    if isinstance(meta, dict):
        auto, labels = _classification(meta)
        recipe = write_load_recipe(out, auto_class=auto, dtype=model_dtype(model), base=base,
                                   quantization=quantization, num_labels=labels)
        folders.append((out, recipe))
    elif (out / "adapter_config.json").is_file() or (out / "config.json").is_file():
        recipe = write_load_recipe(out, auto_class=CAUSAL_LM, dtype=model_dtype(model), base=base,
                                   quantization=quantization)
        folders.append((out, recipe))
    merged = record.get("merged")
    if merged and (Path(merged) / "config.json").is_file():
        merged = Path(merged)
        folders.append((merged, write_load_recipe(merged, auto_class=CAUSAL_LM,
                                                  dtype=_saved_dtype(merged))))
    merged_into = ("the dequantized 4-bit weights of " if bnb_config(quantization) else "") + str(base)
    for folder, recipe in folders:
        card_record = dict(record, base_model=base) if folder == out else {
            **record, "base_model": None,
            "made_from": f"the adapter in `..` merged into `{merged_into}`"}
        atomic_write_text(folder / CARD_FILE, model_card(folder, recipe, stage=stage,
                                                         record=card_record, metrics=metrics,
                                                         plugins=plugins))
    return [f for f, _ in folders]


__all__ = ["CARD_FILE", "model_card", "write_artifact_files"]
