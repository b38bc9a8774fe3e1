"""Test kit for plugin authors: register a plugin for one test, unregister it after.

Usage in a test (the fixtures are available automatically once rlhf-plugins is installed)::

    def test_my_template(rlhf_plugin):
        reg = rlhf_plugin(MyPlugin())          # registered, registry rebuilt
        assert "mine" in reg.chat_templates.names()

or without pytest::

    with registered_plugin(MyPlugin()) as reg:
        ...

The plugin under test is registered next to the built-ins only: plugins installed through
entry points stay off unless asked for (``rlhf_plugin(p, installed=True)``), so an installed
plugin can neither provide a name the plugin under test failed to register nor collide with
it. A registration failure of the plugin under test raises :class:`~rlhf_plugins.errors.
PluginError` with its error (``raise_errors=False`` returns the registry to inspect instead).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import PluginError
from .hookspecs import hookimpl
from .manager import add_plugin, registry, remove_plugin
from .protocols import FAMILIES
from .registry import Registry

#: the manager's allow-list of entry-point plugins ("" = none)
_LOAD_ENV = "RLHF_PLUGINS_LOAD"
_UNSET = object()


def check_registered(reg: Registry, name: str) -> Registry:
    """`reg`, or PluginError when plugin `name` failed to register (its error in the message)."""
    info = next((p for p in reg.plugins if p.name == name), None)
    if info is None:
        raise PluginError(f"plugin under test {name!r} was not loaded")
    if info.status == "failed":
        raise PluginError(f"plugin under test {name!r} failed to register: {info.error}")
    return reg


class _EntryPoints:
    """Turns installed entry-point plugins off (the manager's allow-list) and back on."""

    def __init__(self) -> None:
        self.saved: Any = _UNSET

    def off(self) -> None:
        if self.saved is _UNSET:
            self.saved = os.environ.get(_LOAD_ENV)
            os.environ[_LOAD_ENV] = ""

    def restore(self) -> None:
        if self.saved is _UNSET:
            return
        if self.saved is None:
            os.environ.pop(_LOAD_ENV, None)
        else:
            os.environ[_LOAD_ENV] = self.saved
        self.saved = _UNSET


@contextmanager
def registered_plugin(plugin: Any, name: str | None = None, *, installed: bool = False,
                      raise_errors: bool = True) -> Iterator[Registry]:
    """Register `plugin` (an object or module with hookimpls) for the duration of the block."""
    switch = _EntryPoints()
    if not installed:
        switch.off()
    name = add_plugin(plugin, name)
    try:
        reg = registry(reload=True)
        yield check_registered(reg, name) if raise_errors else reg
    finally:
        remove_plugin(name)
        switch.restore()
        registry(reload=True)


def component_plugin(family: str, component: Any, *, name: str | None = None,
                     override: bool = False) -> Any:
    """A plugin object whose only job is to register one component in `family`."""
    spec = FAMILIES[family]

    class _OneComponent:
        pass

    def impl(register: Callable[..., None]) -> None:
        register(component, name=name, override=override)

    impl.__name__ = spec.hook
    setattr(_OneComponent, spec.hook, staticmethod(hookimpl(impl)))
    return _OneComponent()


try:  # pytest fixtures, when pytest is present (this module is also a pytest11 plugin)
    import pytest

    @pytest.fixture
    def rlhf_plugin() -> Iterator[Callable[..., Registry]]:
        """Fixture: `rlhf_plugin(plugin, name=None, *, installed=False, raise_errors=True)`
        registers a plugin (built-ins + it; installed plugins only with `installed=True`) until
        the test ends; raises PluginError when it fails to register (unless `raise_errors=False`).
        """
        names: list[str] = []
        switch = _EntryPoints()
        wants_installed = False

        def register(plugin: Any, name: str | None = None, *, installed: bool = False,
                     raise_errors: bool = True) -> Registry:
            nonlocal wants_installed
            wants_installed = wants_installed or installed
            if wants_installed:
                switch.restore()
            else:
                switch.off()
            added = add_plugin(plugin, name)
            names.append(added)
            reg = registry(reload=True)
            return check_registered(reg, added) if raise_errors else reg

        try:
            yield register
        finally:
            for n in names:
                remove_plugin(n)
            switch.restore()
            registry(reload=True)

    @pytest.fixture
    def rlhf_registry() -> Registry:
        """Fixture: a freshly rebuilt registry."""
        return registry(reload=True)
except ImportError:  # pragma: no cover - pytest not installed
    pass


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (no merges) with SmolLM2's special tokens at ids 0, 1, 2:
    bos ``<|im_start|>``, eos = pad ``<|im_end|>``, unk ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def tiny_model_dir(path: Any, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Any:
    """Save a tiny random Llama + byte-level tokenizer (SmolLM2's special tokens) under `path`.

    For tests and docs that must run anywhere: no download, a few MB, seconds on a CPU. Its
    tokenizer: bos ``<|im_start|>``, eos = pad ``<|im_end|>``, unk ``<|endoftext|>``.
    Returns the directory (a `pathlib.Path`).
    """
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = Path(path)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
