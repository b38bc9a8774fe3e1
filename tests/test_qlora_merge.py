"""A QLoRA adapter is merged into, and evaluated on, the base it was trained on: the dequantized
4-bit weights, not the original ones (issue 16: merging into the original weights undid the
rejection-sampling stage's gain). The reference is the trained model itself: the PEFT model on
the 4-bit base."""
from __future__ import annotations

import json

import pytest
import torch

from helpers_models import make_tiny_model_dir
from rlhf_plugins.models import (STAGE_FILE, QuantSettings, load_base_as_trained, load_causal_lm,
                                 load_tokenizer, trained_quantization)
from rlhf_plugins.stages.sft.train import merge_adapter

QUANT_CFG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
IDS = torch.tensor([[1, 40, 41, 42, 2, 1, 50, 51, 52, 2]])


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """(base dir, adapter dir, logits of the adapter on the 4-bit base): a saved QLoRA adapter
    with non-zero B (as after training) and the STAGE_FILE our stages write next to it."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("qlora")
    base_dir = make_tiny_model_dir(tmp, **QUANT_CFG)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(base_dir, quantization=QuantSettings()),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    with torch.no_grad():
        trained = model(IDS).logits
    adapter_dir = tmp / "adapter"
    model.save_pretrained(adapter_dir)
    load_tokenizer(base_dir).save_pretrained(adapter_dir)
    settings = {"quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                 "compute_dtype": "auto"}}
    (adapter_dir / STAGE_FILE).write_text(json.dumps({"stage": "sft", "settings": settings}))
    return base_dir, adapter_dir, trained


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_merged_qlora_adapter_reproduces_the_trained_model(qlora, tmp_path):
    base_dir, adapter_dir, trained = qlora
    merged = merge_adapter(str(base_dir), adapter_dir, tmp_path / "merged", quantization=QuantSettings())
    torch.testing.assert_close(_logits(load_causal_lm(merged)), trained, atol=1e-4, rtol=1e-4)
    # what merging into the original full-precision weights gives: a different model
    naive = merge_adapter(str(base_dir), adapter_dir, tmp_path / "naive")
    assert (_logits(load_causal_lm(naive)) - trained).abs().max() > 1e-3


def test_base_as_trained_is_the_dequantized_4bit_model(qlora):
    base_dir, _, _ = qlora
    quantized = load_causal_lm(base_dir, quantization=QuantSettings())
    as_trained = load_base_as_trained(base_dir, QuantSettings())
    assert not any("Linear4bit" in type(m).__name__ for m in as_trained.modules())
    torch.testing.assert_close(_logits(as_trained), _logits(quantized), atol=1e-4, rtol=1e-4)
    full = load_base_as_trained(base_dir, None)
    torch.testing.assert_close(_logits(full), _logits(load_causal_lm(base_dir)))


def test_trained_quantization_reads_the_stage_record(qlora, tmp_path):
    _, adapter_dir, _ = qlora
    assert trained_quantization(adapter_dir) == QuantSettings()
    assert trained_quantization(tmp_path) is None  # no record: full precision
    (tmp_path / STAGE_FILE).write_text(json.dumps({"settings": {"quantization": None}}))
    assert trained_quantization(tmp_path) is None


def test_evaluation_runs_the_adapter_on_its_trained_base(qlora, monkeypatch):
    """evaluate_saved_policy(base, adapter) scores the trained model, not base-in-fp32 + adapter."""
    from rlhf_plugins import evaluation

    base_dir, adapter_dir, trained = qlora
    seen = {}

    def capture(model, tokenizer, rows, **kwargs):
        seen["logits"] = _logits(model)
        return {"accuracy": 0.0}

    monkeypatch.setattr(evaluation, "evaluate_policy", capture)
    evaluation.evaluate_saved_policy(str(base_dir), [], adapter_dir=str(adapter_dir))
    torch.testing.assert_close(seen["logits"], trained, atol=1e-4, rtol=1e-4)
    # eval.dtype: the same model (adapter merged), run in bfloat16: equal up to bf16 rounding
    evaluation.evaluate_saved_policy(str(base_dir), [], adapter_dir=str(adapter_dir), dtype="bfloat16")
    assert seen["logits"].dtype == torch.bfloat16
    rounding = (seen["logits"].float() - trained).abs().max()
    adapter_effect = (_logits(load_causal_lm(base_dir)) - trained).abs().max()
    assert rounding < 0.1 * adapter_effect, (rounding, adapter_effect)
    evaluation.evaluate_saved_policy(str(base_dir), [], dtype="bfloat16")  # a saved model, no adapter
    assert seen["logits"].dtype == torch.bfloat16


def test_pipeline_warns_before_quantizing_a_fine_tuned_policy(qlora, tmp_path, caplog):
    """A stage that would load an earlier stage's merged model in 4 bits says so; the base is fine."""
    from rlhf_plugins.models import QuantSettings as Q
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config

    base_dir, _, _ = qlora
    pipeline = Pipeline(load_pipeline_config({"model": str(base_dir), "output_dir": str(tmp_path)}))
    with caplog.at_level("WARNING", logger="rlhf_plugins.stages.pipeline"):
        pipeline.warn_requantizing("sft", str(base_dir), Q())                     # the base: fine
        pipeline.warn_requantizing("ppo", str(tmp_path / "sft" / "merged"), None)  # full precision
        pipeline.warn_requantizing("ppo", str(tmp_path / "sft" / "merged"), Q(load_in_4bit=False))
        assert not caplog.records
        pipeline.warn_requantizing("rejection_sampling.sft", str(tmp_path / "sft" / "merged"), {})
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("rejection_sampling.sft: quantizing") and "quantization: null" in message


@pytest.mark.parametrize("sections, expected", [
    ({"rejection_sampling": {"sft": {"quantization": None}}, "ppo": {"quantization": {"load_in_4bit": True}}},
     ["sft", "ppo"]),
    ({"ppo": {"quantization": None}}, ["sft", "rejection_sampling.sft"]),  # its sft inherits 4 bits
])
def test_each_policy_stage_warns_through_its_section(qlora, tmp_path, caplog, sections, expected):
    """`stage_config` warns for the sft, rejection_sampling.sft and ppo sections that would 4-bit a
    fine-tuned policy (each read from its own field), never for the reward model's QLoRA base."""
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config
    from rlhf_plugins.stages.pipeline import DATA_FILES

    base_dir, _, _ = qlora
    pipeline = Pipeline(load_pipeline_config({"model": str(base_dir), "output_dir": str(tmp_path),
                                              "quantization": {"load_in_4bit": True}, "lora": {"r": 4},
                                              **sections}))
    pipeline.paths = {key: str(tmp_path / f"{key}.jsonl") for key in DATA_FILES}
    with caplog.at_level("WARNING", logger="rlhf_plugins.stages.pipeline"):
        for name in ("sft", "reward_model", "rejection_sampling", "ppo"):
            pipeline.parse_section(name, pipeline.context(name, str(tmp_path / "sft" / "merged")))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == expected
