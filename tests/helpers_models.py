"""Tiny random causal LMs saved as HF directories, for fast unit tests (no downloads)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _smollm_like_tokenizer() -> Any:
    """A byte-level BPE tokenizer with SmolLM2's special tokens (ids 0, 1, 2)."""
    try:  # the shared test tokenizers, when that helper module exists
        from helpers_tokenizers import make_tokenizer  # type: ignore[import-not-found]
    except ImportError:
        make_tokenizer = None
    if make_tokenizer is not None:
        try:
            return make_tokenizer("smollm2")
        except TypeError:
            return make_tokenizer()

    from rlhf_plugins.testing import tiny_tokenizer

    return tiny_tokenizer()


def make_tiny_model_dir(tmp_path: Path, tokenizer: Any = None, **cfg: Any) -> Path:
    """Save a tiny random LlamaForCausalLM (+ tokenizer) under `tmp_path/tiny-llama`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = _smollm_like_tokenizer()
    params: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seed = cfg.pop("seed", 0)
    name = cfg.pop("name", "tiny-llama")
    params.update(cfg)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**params))
    out = Path(tmp_path) / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
