"""How a saved artifact loads as it was trained - the recipe its model card shows, and
:func:`load_as_trained`, which follows the same recipe.

Every artifact folder a stage leaves (an adapter, a ``merged/`` model, a reward model) gets
``rlhf_plugins_load.json`` (:data:`LOAD_FILE`): which transformers class loads it, the base of an
adapter and that base's quantization, the dtype of the non-quantized weights, and whether
bitsandbytes' CPU bf16 repack was off (it is: :func:`~rlhf_plugins.models.keep_4bit_trainable_on_cpu`).
An adapter's ``adapter_config.json`` names the same base and quantization where peft and
transformers look: ``base_model_name_or_path`` and a ``quantization_config`` that
``BitsAndBytesConfig(**...)`` accepts (the compute dtype resolved, never ``"auto"``).

The base reference is portable (:func:`portable_base`): a hub id stays a hub id; a base that came
from our cache (the embedded default model, a converted GGUF) is saved beside the adapter as
``base_model/`` - hard links to the cached files, so it costs no disk space on the same file
system and a real copy elsewhere; any other local base is named by its path relative to the
artifact folder (the run tree moves as a whole). The absolute path it was trained from stays in
the stage record, never as the only reference.

Light module: torch, transformers and peft load inside functions.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from .cache import atomic_write_dir, atomic_write_json, cache_dir, read_json
from .errors import ConfigError

LOAD_FILE = "rlhf_plugins_load.json"
#: the folder (inside an adapter artifact) holding the base copied out of our cache
BASE_DIR = "base_model"
CAUSAL_LM = "AutoModelForCausalLM"
SEQUENCE_CLS = "AutoModelForSequenceClassification"
TOKEN_CLS = "AutoModelForTokenClassification"
#: a reward model whose head is not a linear `score`: only rlhf-plugins loads it
OURS = "rlhf_plugins"
#: the peft warning an adapter_config.json with `quantization_config` triggers (the key is ours)
PEFT_UNKNOWN_KEY_WARNING = r"Unexpected keyword arguments \['quantization_config'\]"


def bnb_config(quantization: Any) -> dict[str, Any] | None:
    """The `BitsAndBytesConfig(**...)` keywords of a QuantSettings (None when not 4-bit), with
    the compute dtype resolved on this machine (what training used), never "auto"."""
    if quantization is None:
        return None
    return quantization.bnb_kwargs()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a real copy
        shutil.copy2(src, dst)
    return dst


def portable_base(base: str, folder: str | os.PathLike) -> str:
    """The base reference an adapter in `folder` records: a hub id as is, `base_model` (a copy
    saved beside it) for a base in our cache, else the base's path relative to `folder`."""
    path = Path(base).expanduser()
    if not path.exists():
        return base  # a hub id
    path, here = path.resolve(), Path(folder).resolve()
    if path.is_relative_to(cache_dir().expanduser().resolve()):
        dest = here / BASE_DIR
        if dest.resolve() != path:
            atomic_write_dir(dest, lambda tmp: shutil.copytree(path, tmp, copy_function=_link_or_copy,
                                                                dirs_exist_ok=True))
        return BASE_DIR
    try:
        return os.path.relpath(path, here)
    except ValueError:  # another drive (Windows): no relative path exists
        return str(path)


def resolve_base(folder: str | os.PathLike, ref: str) -> str:
    """A recorded base reference as a loadable one: relative paths are relative to `folder`."""
    if ref and not os.path.isabs(ref):
        candidate = Path(folder) / ref
        if candidate.exists():
            return str(candidate.resolve())
    return ref


def model_dtype(model: Any) -> str:
    """The dtype name of a model's non-quantized base weights (its input embeddings)."""
    params = list(model.named_parameters())
    for name, param in params:
        if "embed" in name and "lora" not in name and param.dtype.is_floating_point:
            return str(param.dtype).removeprefix("torch.")
    for _, param in params:
        if param.dtype.is_floating_point:
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def write_load_recipe(folder: str | os.PathLike, *, auto_class: str, dtype: str,
                      base: str | None = None, quantization: Any = None,
                      num_labels: int | None = None) -> dict[str, Any]:
    """Write `folder`'s LOAD_FILE (and for an adapter its base + quantization_config into
    adapter_config.json); returns the recipe. `base` is the adapter's base as trained on."""
    folder = Path(folder)
    recipe: dict[str, Any] = {"auto_class": auto_class, "dtype": dtype, "adapter": False,
                              "base": None, "base_is_path": False, "quantization_config": None,
                              "cpu_bf16_repack": True, "num_labels": num_labels}
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        if not base:
            raise ConfigError(f"{folder}: an adapter needs its base model")
        bnb = bnb_config(quantization)
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = portable_base(base, folder)
        config.pop("quantization_config", None)
        if bnb is not None:
            config["quantization_config"] = bnb
        atomic_write_json(adapter_config, config)
        recipe.update(adapter=True, base=config["base_model_name_or_path"],
                      base_is_path=Path(base).expanduser().exists(), quantization_config=bnb,
                      cpu_bf16_repack=bnb is None)
    atomic_write_json(folder / LOAD_FILE, recipe)
    return recipe


def read_load_recipe(folder: str | os.PathLike) -> dict[str, Any]:
    """The LOAD_FILE of an artifact folder (ConfigError when it has none)."""
    data = read_json(Path(folder) / LOAD_FILE)
    if not isinstance(data, dict):
        raise ConfigError(f"{folder}: no {LOAD_FILE}: not an artifact folder a stage wrote "
                          "(or one from before load recipes existed: rerun its stage)")
    return data


def peft_from_pretrained(model: Any, folder: str | os.PathLike, **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained(model, folder)` without peft's warning about the
    `quantization_config` key our adapter_config.json files carry."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_UNKNOWN_KEY_WARNING)
        return PeftModel.from_pretrained(model, os.fspath(folder), **kwargs)


def load_as_trained(path: str | os.PathLike) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of an artifact folder, loaded exactly as its model card's
    plain transformers + peft recipe loads it - the model its stage evaluated.

    Causal LMs load as ``AutoModelForCausalLM`` (+ ``PeftModel``), linear-head reward models as
    ``AutoModelFor{Sequence,Token}Classification`` (+ ``PeftModel``); a reward model with another
    head has no plain recipe (ConfigError: load it with
    :func:`~rlhf_plugins.stages.reward_model.artifact.load_reward_model`).
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    folder = Path(path)
    recipe = read_load_recipe(folder)
    if recipe["auto_class"] == OURS:
        raise ConfigError(f"{folder}: its reward head is not a linear `score` layer, so no plain "
                          "transformers class loads it; use rlhf_plugins.stages.reward_model."
                          "artifact.load_reward_model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    auto = getattr(transformers, recipe["auto_class"])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, recipe["dtype"])}
    if recipe["auto_class"] != CAUSAL_LM:
        kwargs.update(num_labels=int(recipe.get("num_labels") or 1), pad_token_id=tokenizer.pad_token_id)
    if recipe.get("quantization_config"):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**recipe["quantization_config"])
    source = resolve_base(folder, recipe["base"]) if recipe.get("adapter") else str(folder)
    model = auto.from_pretrained(source, **kwargs)
    if not recipe.get("cpu_bf16_repack", True):
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if recipe.get("adapter"):
        model = peft_from_pretrained(model, folder)
    return model.eval(), tokenizer


def recipe_code(recipe: Mapping[str, Any]) -> str:
    """The plain transformers + peft code (no rlhf-plugins) that loads an artifact as
    :func:`load_as_trained` does, to run from inside the artifact folder."""
    auto = recipe["auto_class"]
    imports = ["AutoTokenizer", auto]
    args = [f"dtype=torch.{recipe['dtype']}"]
    if auto != CAUSAL_LM:
        args.append(f"num_labels={int(recipe.get('num_labels') or 1)}, "
                    "pad_token_id=tokenizer.pad_token_id")
    if recipe.get("quantization_config"):
        imports.append("BitsAndBytesConfig")
        args.append(f"quantization_config=BitsAndBytesConfig(**{recipe['quantization_config']!r})")
    base = recipe.get("base")
    if not recipe.get("adapter"):
        source = "HERE"
    elif recipe.get("base_is_path") and not Path(base).is_absolute():
        source = f'f"{{HERE}}/{base}"'  # relative to this folder
    else:
        source = repr(base)
    lines = ["import torch"]
    if recipe.get("adapter"):
        lines.append("from peft import PeftModel")
    lines += [f"from transformers import {', '.join(sorted(set(imports)))}", "",
              'HERE = "."  # this folder: run from inside it, or put its path here',
              "tokenizer = AutoTokenizer.from_pretrained(HERE)  # chat_template = the training template",
              f"model = {auto}.from_pretrained({source}, {', '.join(args)})"]
    if not recipe.get("cpu_bf16_repack", True):
        lines += ["for module in model.modules():  # bitsandbytes' CPU bf16 repack off, as trained",
                  '    if hasattr(module, "support_avx512bf16_for_cpu"):',
                  "        module.support_avx512bf16_for_cpu = False"]
    if recipe.get("adapter"):
        lines.append("model = PeftModel.from_pretrained(model, HERE)")
    lines.append("model = model.eval()")
    return "\n".join(lines) + "\n"


__all__ = ["BASE_DIR", "CAUSAL_LM", "LOAD_FILE", "OURS", "SEQUENCE_CLS", "TOKEN_CLS", "bnb_config",
           "load_as_trained", "model_dtype", "peft_from_pretrained", "portable_base", "read_load_recipe", "recipe_code",
           "resolve_base", "write_load_recipe"]
