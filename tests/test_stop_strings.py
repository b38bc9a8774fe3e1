"""Generation honours every stop string (multi-token ones too) and records why a completion ended."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

torch = pytest.importorskip("torch")

from helpers_tokenizers import make_tokenizer  # noqa: E402

from rlhf_plugins import registry  # noqa: E402
from rlhf_plugins.testing import component_plugin  # noqa: E402

STOP = "<end>"  # 4 tokens of the test tokenizer: '<', 'e', 'nd', '>'
SCRIPT = "Sure thing" + STOP + "XYZQW"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")


def scripted_model(tok, chain: list[int]):
    """A real tiny Llama whose greedy continuation of chain[k] is chain[k + 1].

    Attention and MLP outputs are zeroed, so the last hidden state is the (normalised) embedding
    of the current token; chain tokens get orthonormal embeddings and the (untied) LM head maps
    each one to its successor with a large logit.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    basis = torch.linalg.qr(torch.randn(64, 64))[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.02)
        head = model.lm_head.weight
        head.zero_()
        for i, t in enumerate(chain):
            emb[t] = basis[i]
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            head[b] += 20.0 * basis[i]
    return model.eval()


def _chain(tok) -> list[int]:
    start = tok("\n", add_special_tokens=False)["input_ids"]  # chatml's generation prompt ends so
    ids = tok(SCRIPT, add_special_tokens=False)["input_ids"]
    chain = start[-1:] + ids
    assert len(set(chain)) == len(chain)
    return chain


def test_stop_string_of_several_tokens_ends_a_completion(tok):
    from rlhf_plugins.generation import HFGenerator

    chain = _chain(tok)
    assert len(tok(STOP, add_special_tokens=False)["input_ids"]) > 1
    model = scripted_model(tok, chain)
    prompt = [chain[:1]]
    common = dict(stop_ids=[tok.eos_token_id], max_new_tokens=14, temperature=0.0)
    plain = HFGenerator(model, tok, **common).generate(prompt, [0], 1)[0][0]
    assert plain.text.startswith("Sure thing<end>XYZ") and plain.finish_reason == "length"
    stopped = HFGenerator(model, tok, stop_strings=[STOP], **common).generate(prompt, [0], 1)[0][0]
    assert stopped.text == "Sure thing" and stopped.finish_reason == "stop"
    assert stopped.num_tokens == len(tok("Sure thing", add_special_tokens=False)["input_ids"])
    # sampling (per-row generators) stops there too, and so does a batch of several rows
    sampled = HFGenerator(model, tok, stop_strings=[STOP], **{**common, "temperature": 1.0},
                          batch_size=3).generate(prompt * 3, [0, 1, 2], 1)
    assert [c[0].text for c in sampled] == ["Sure thing"] * 3


def test_sample_stage_stops_at_a_templates_multi_token_stop_string(tmp_path, tok, rlhf_plugin):
    from rlhf_plugins.generation import end_of_turn_stop_strings, end_of_turn_token_ids
    from rlhf_plugins.stages.rejection_sampling.run import run_sampling
    from rlhf_plugins.stages.rejection_sampling.settings import SamplingSettings

    chatml = registry().chat_templates.get("chatml")

    @dataclass(frozen=True)
    class EndTemplate(type(chatml)):
        """ChatML whose turns may also end with `<end>`."""

        name: ClassVar[str] = "chatml_end"

        def stop_strings(self, tokenizer=None):
            return [STOP, "<|im_end|>"]

    template = EndTemplate()
    # single-token stop strings are ids; the multi-token one is a stop string
    assert end_of_turn_stop_strings(template, tok) == [STOP]
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_token_ids(template, tok)

    rlhf_plugin(component_plugin("chat_templates", template))

    def length_reward(prompts, completions, **_):
        return [float(len(c[0]["content"])) for c in completions]

    rlhf_plugin(component_plugin("reward_functions", length_reward, name="length_reward"))
    model = scripted_model(tok, _chain(tok))
    settings = SamplingSettings(template="chatml_end", num_samples=2, max_new_tokens=14,
                                reward_functions=["length_reward"], batch_size=4, cache=False)
    result = run_sampling(settings, tmp_path / "out", rows=[{"prompt": "hi"}, {"prompt": "yo"}],
                          policy=model, tokenizer=tok)
    assert {r["completion"][0]["content"] for r in result.rows} == {"Sure thing"}
    assert {r["finish_reason"] for r in result.rows} == {"stop"}
