"""Every stage's artifact loads as it was trained, anywhere (issue 31).

Each artifact folder (adapter, merged model, reward model), loaded in a fresh process with plain
transformers + peft by the recipe its own model card (README.md) shows, run from inside the
folder, gives the logits / scores of the model the stage evaluated (the trainer's model, spied at
the moment the stage writes its artifacts) within 1e-4 in float32; `rlhf_plugins.load_as_trained`
gives the same. No folder holds TRL's "[None]" card, an adapter's base is never an absolute
cache path, and a QLoRA adapter records its base's quantization with a real compute dtype.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers_models import make_tiny_model_dir

torch = pytest.importorskip("torch")

QUANT_CFG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
QUANT = {"load_in_4bit": True}
IDS = [[1, 40, 41, 42, 2, 1, 50, 51, 52, 2, 60, 61]]
EOT = "<|im_end|>"
RM_ROWS = [{"prompt": "What is 2 + 2?", "completion": "The answer is 4."},
           {"prompt": "Name a colour.", "completion": "Blue, I think."}]
TRL = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2, logging_steps=1,
           save_strategy="no", report_to="none", seed=0, gradient_checkpointing=False)

#: what a fresh process runs inside each artifact folder: the card's recipe, then a forward
_RUNNER = r'''
import json, os, re, sys
import torch
spec = json.loads(sys.argv[1])
out = {}
for folder in spec["folders"]:
    os.chdir(folder)
    card = open("README.md").read()
    ns = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), ns)
    model, tokenizer = ns["model"], ns["tokenizer"]
    with torch.no_grad():
        if spec["kind"] == "lm":
            value = model(input_ids=torch.tensor(spec["ids"])).logits
        else:
            value = []
            for row in spec["rows"]:
                msgs = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["completion"]}]
                text = tokenizer.apply_chat_template(msgs, tokenize=False)
                text = text[:text.rindex(spec["eot"]) + len(spec["eot"])]
                inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                value.append(model(**inputs).logits[0, 0].item())
    out[folder] = torch.as_tensor(value, dtype=torch.float32).tolist()
print("RESULT " + json.dumps(out))
'''


def _fresh_process(folders: list[Path], **spec: Any) -> dict[str, Any]:
    """{folder: output} of each folder's card recipe, run in a new Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = json.dumps({"folders": [str(f) for f in folders], **spec})
    proc = subprocess.run([sys.executable, "-c", _RUNNER, args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("lat-model"), **QUANT_CFG)


@pytest.fixture
def cached_tiny(tmp_path, monkeypatch) -> Path:
    """A tiny base inside the rlhf-plugins cache (as the converted default model is)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_PLUGINS_CACHE", str(cache))
    return make_tiny_model_dir(cache / "models", **QUANT_CFG)


@pytest.fixture
def evaluated(monkeypatch) -> list:
    """The trainer's model at the moment each stage writes its artifacts (what it evaluated)."""
    from rlhf_plugins.stages import skeleton

    models: list = []
    original = skeleton.write_artifacts

    def spy(trainer, *args, **kwargs):
        models.append(trainer.model)
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(skeleton, "write_artifacts", spy)
    return models


def _lm_logits(model) -> Any:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float()


def _check_folder(folder: Path, *, quantized: bool = False) -> None:
    """The done-when of issue 31 for one artifact folder."""
    from rlhf_plugins.cache import cache_dir

    card = (folder / "README.md").read_text()
    assert "[None]" not in card and "```python" in card and "## Held-out result" in card
    config = folder / "adapter_config.json"
    if config.is_file():
        adapter = json.loads(config.read_text())
        base = adapter["base_model_name_or_path"]
        assert not Path(base).is_absolute(), base
        assert (folder / base).is_dir() and not str((folder / base).resolve()).startswith(
            str(cache_dir().resolve()))
        if quantized:
            from transformers import BitsAndBytesConfig

            q = adapter["quantization_config"]
            assert "auto" not in json.dumps(q) and q["bnb_4bit_compute_dtype"] == "float32"
            assert BitsAndBytesConfig(**q).load_in_4bit
        else:
            assert "quantization_config" not in adapter


def _check_lm_folders(folders: list[Path], reference: Any, quantized: bool = False) -> None:
    from rlhf_plugins import load_as_trained

    for folder in folders:
        _check_folder(folder, quantized=quantized and folder.name != "merged")
    plain = _fresh_process(folders, kind="lm", ids=IDS)
    for folder in folders:
        torch.testing.assert_close(torch.tensor(plain[str(folder)]), reference, atol=1e-4, rtol=0)
        ours, _ = load_as_trained(folder)
        torch.testing.assert_close(_lm_logits(ours), reference, atol=1e-4, rtol=0)


# --- SFT (and the base copied out of the cache), QLoRA ---------------------------------------------

@pytest.mark.parametrize("quantized", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["lora", "qlora"])
def test_sft_adapter_and_merged_load_as_trained(tmp_path, cached_tiny, evaluated, quantized):
    from rlhf_plugins.stages.sft.settings import SFTSettings
    from rlhf_plugins.stages.sft.train import run_sft

    settings = SFTSettings(model=str(cached_tiny), lora=LORA, num_examples=8, eval_size=2,
                           merge=True, **({"quantization": QUANT} if quantized else {}))
    result = run_sft(settings, TRL, tmp_path / "run" / "sft")
    reference = _lm_logits(evaluated[-1])
    out = result.output_dir
    # the base came from our cache: saved beside the adapter, as hard links (no extra space)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base_model"
    weights = next((out / "base_model").glob("*.safetensors"))
    assert weights.stat().st_ino == next(cached_tiny.glob("*.safetensors")).stat().st_ino
    assert str(cached_tiny) in (out / "README.md").read_text()  # where it was trained from
    _check_lm_folders([out, result.merged_dir], reference, quantized)
    # the adapter folder alone moves to "another machine": no cache, another path
    import shutil

    from rlhf_plugins import load_as_trained

    moved = shutil.copytree(out, tmp_path / "elsewhere" / "adapter", ignore=shutil.ignore_patterns("merged"))
    shutil.rmtree(cached_tiny.parent.parent)
    torch.testing.assert_close(_lm_logits(load_as_trained(moved)[0]), reference, atol=1e-4, rtol=0)


# --- reward models: 4-bit and not, adapter and full -------------------------------------------------

@pytest.mark.parametrize("variant", [pytest.param("lora", marks=pytest.mark.slow), "qlora",
                                     pytest.param("full", marks=pytest.mark.slow)])
def test_reward_model_scores_as_trained(tmp_path, tiny_dir, variant):
    from rlhf_plugins import load_as_trained
    from rlhf_plugins.stages.reward_model.scoring import score
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    extra = {"lora": LORA} if variant != "full" else {}
    if variant == "qlora":
        extra["quantization"] = QUANT
    result = rm_from_config({"model": str(tiny_dir), "head": "bradley_terry", "template": "chatml",
                             "num_examples": 8, "num_eval_examples": 4, **TRL, **extra},
                            output_dir=tmp_path / "rm")
    reference = torch.tensor(score(result.model, RM_ROWS, progress=False), dtype=torch.float32)
    out = result.output_dir
    _check_folder(out, quantized=variant == "qlora")
    plain = _fresh_process([out], kind="rm", rows=RM_ROWS, eot=EOT)
    torch.testing.assert_close(torch.tensor(plain[str(out)]), reference, atol=1e-4, rtol=0)
    model, tokenizer = load_as_trained(out)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}],
                                           tokenize=False) for r in RM_ROWS]
    with torch.no_grad():
        ours = [model(**tokenizer(t[:t.rindex(EOT) + len(EOT)], return_tensors="pt",
                                  add_special_tokens=False)).logits[0, 0].item() for t in texts]
    torch.testing.assert_close(torch.tensor(ours), reference, atol=1e-4, rtol=0)


# --- the other policy stages ------------------------------------------------------------------------

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
          "chosen": [{"role": "assistant", "content": f"The answer is {i + 1}."}],
          "rejected": [{"role": "assistant", "content": f"It is {i + 7}, I think."}]}
         for i in range(6)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_adapter_loads_as_trained(tmp_path, tiny_dir, evaluated):
    from rlhf_plugins.stages.dpo.run import run_dpo
    from rlhf_plugins.stages.dpo.settings import DPOSettings

    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = run_dpo(DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA, eval_size=2,
                                 merge=True), TRL, tmp_path / "dpo")
    _check_lm_folders([result.output_dir, result.merged_dir], _lm_logits(evaluated[-1]))


@pytest.mark.slow
def test_kto_adapter_loads_as_trained(tmp_path, tiny_dir, evaluated):
    from rlhf_plugins.stages.kto.run import run_kto
    from rlhf_plugins.stages.kto.settings import KTOSettings

    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = run_kto(KTOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA, eval_before=False),
                     TRL, tmp_path / "kto")
    _check_lm_folders([result.output_dir], _lm_logits(evaluated[-1]))


@pytest.mark.slow
def test_ppo_adapter_loads_as_trained(tmp_path, tiny_dir, evaluated):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import run_ppo

    settings = PPOSettings(model=str(tiny_dir), reward_functions=["exact_answer"], num_examples=4,
                           lora=LORA)
    trl = dict(max_steps=1, per_device_train_batch_size=4, num_generations=2,
               max_completion_length=6, gradient_checkpointing=False, logging_steps=1,
               save_strategy="no", learning_rate=1e-2, seed=0, beta=0.0, report_to="none")
    result = run_ppo(settings, trl, tmp_path / "ppo")
    _check_lm_folders([result.output_dir], _lm_logits(evaluated[-1]))


@pytest.mark.slow
def test_rejection_sampling_finetune_loads_as_trained(tmp_path, tiny_dir, evaluated):
    from rlhf_plugins.stages.rejection_sampling import settings as S
    from rlhf_plugins.stages.rejection_sampling.run import run_sampling

    prompts = _jsonl(tmp_path / "prompts.jsonl",
                     [{"prompt": [{"role": "user", "content": f"question {i}"}], "answer": "1"}
                      for i in range(4)])
    settings = S.SamplingSettings(model=str(tiny_dir), dataset=str(prompts), num_samples=2,
                                  max_new_tokens=6, chunk_size=4, batch_size=4, seed=5,
                                  reward_functions=["exact_answer"], selection="top_per_prompt",
                                  sft={"lora": LORA, "merge": True, **TRL})
    result = run_sampling(settings, tmp_path / "rs", finetune=True)
    sft = result.sft
    _check_lm_folders([sft.output_dir, sft.merged_dir], _lm_logits(evaluated[-1]))


def test_card_recipe_is_the_documented_shape(tmp_path):
    """The recipe is plain code: a hub-id base stays a hub id; 4-bit adds the config + repack off."""
    from rlhf_plugins.artifact_recipe import CAUSAL_LM, recipe_code

    code = recipe_code({"auto_class": CAUSAL_LM, "dtype": "bfloat16", "adapter": True,
                        "base": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_is_path": False,
                        "quantization_config": {"load_in_4bit": True}, "cpu_bf16_repack": False})
    assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct', dtype=torch.bfloat16" in code
    assert "BitsAndBytesConfig(**{'load_in_4bit': True})" in code
    assert "support_avx512bf16_for_cpu = False" in code and "rlhf_plugins" not in code
    assert re.search(r"PeftModel\.from_pretrained\(model, HERE\)", code)
