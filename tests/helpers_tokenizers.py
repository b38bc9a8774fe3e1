"""Tiny real Hugging Face fast tokenizers for tests (byte-level BPE trained in-process, no downloads).

`make_tokenizer(variant)` returns a fresh `PreTrainedTokenizerFast` whose vocabulary holds every
special token used by the built-in chat templates (`SPECIAL_TOKENS`), so one tokenizer serves
every template and the security fuzz can try all of them. Byte-level BPE handles any unicode.

Variants (bos / eos / pad):
- ``"default"``: ``<s>`` / ``</s>`` / ``<pad>`` (Llama/Zephyr-like)
- ``"smollm2"``: ``<|im_start|>`` / ``<|im_end|>`` / ``<|im_end|>`` (SmolLM2: bos is ChatML's turn
  opener, eos = pad); ids 0, 1, 2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as in SmolLM2
- ``"gpt2"``: ``<|endoftext|>`` / ``<|endoftext|>`` / none
- ``"nobos"``: none / ``</s>`` / ``<pad>``
Any of bos/eos/pad/unk can be overridden by keyword (``None`` removes it).
"""
from __future__ import annotations

import functools
from typing import Any

#: every special token of the test tokenizers, in id order (ids 0..len-1)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>", "<unk>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>", "<|end|>",
]

VARIANTS: dict[str, dict[str, str | None]] = {
    "default": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "smollm2": {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "unk": "<|endoftext|>"},
    "nobos": {"bos": None, "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
}

_CORPUS = [
    "system user assistant tool You are a helpful assistant.",
    "Hello! How are you doing today? I am fine, thank you.",
    "What is 2 + 2? The answer is 4. What is 12 * 7? It is 84.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky and the stars.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Héllo wörld, ça va? Ünïcödé text: 日本語のテキスト, emoji 🙂🚀.",
    "  leading and trailing whitespace  \n\n\tTabs and\r\nnewlines\n",
    "Let me think step by step. First, second, third; finally the answer.",
]


@functools.lru_cache(maxsize=None)
def _trained_backend_json(vocab_size: int) -> str:
    """Train a byte-level BPE on the small corpus once; return it serialized (copied per call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return backend.to_str()


_UNSET: Any = object()


def make_tokenizer(variant: str = "default", *, bos: str | None = _UNSET, eos: str | None = _UNSET,
                   pad: str | None = _UNSET, unk: str | None = _UNSET, chat_template: str | None = None,
                   vocab_size: int = 400) -> Any:
    """A fresh tiny byte-level BPE `PreTrainedTokenizerFast` with all `SPECIAL_TOKENS`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if variant not in VARIANTS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; choose from {sorted(VARIANTS)}")
    roles = dict(VARIANTS[variant])
    for key, value in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if value is not _UNSET:
            roles[key] = value
    backend = Tokenizer.from_str(_trained_backend_json(vocab_size))
    kwargs = {f"{key}_token": value for key, value in roles.items() if value is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
