"""The accelerate configs in examples/accelerate/ mean what docs/scaling.md says they mean.

No GPU and no DeepSpeed run here, so these configs are checked the way `accelerate launch`
reads them: its own argument parser and config-file defaults (`_validate_launch_command`), its
environment preparation for the launcher it would pick, and the plugin
(`FullyShardedDataParallelPlugin`, `DeepSpeedPlugin`) each process builds from that
environment. Also: FSDP + QLoRA needs the 4-bit weights stored in the dtype of the rest of the
model (`quantization.quant_storage`), checked on a real 4-bit load.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_plugins.errors import ConfigError
from rlhf_plugins.models import QuantSettings

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def launch_env(name: str, monkeypatch) -> tuple[object, dict[str, str]]:
    """(parsed launch args, the environment accelerate's launcher gives each process) for a config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args, env


def test_every_config_is_listed_in_the_scaling_doc():
    doc = (CONFIGS.parents[1] / "docs" / "scaling.md").read_text()
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp2_lora.yaml",
                     "fsdp2_qlora.yaml", "two_nodes.yaml"]
    assert [n for n in names if f"examples/accelerate/{n}" not in doc] == []


@pytest.mark.parametrize("name, machines, processes", [("ddp.yaml", 1, 8), ("two_nodes.yaml", 2, 16)])
def test_ddp_configs(monkeypatch, name, machines, processes):
    args, env = launch_env(name, monkeypatch)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (True, False, False)
    assert (args.num_machines, args.num_processes) == (machines, processes)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if machines > 1:  # torchrun's rendezvous: both machines reach the main one
        assert (int(args.nnodes), int(args.nproc_per_node)) == (2, 8)
        assert args.main_process_ip and args.main_process_port == 29500


@pytest.mark.parametrize("name", ["fsdp2_lora.yaml", "fsdp2_qlora.yaml"])
def test_fsdp2_configs(monkeypatch, name):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    args, env = launch_env(name, monkeypatch)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # one ordinary saved adapter
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.cpu_ram_efficient_loading is True


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs(monkeypatch, name, stage):
    from accelerate.utils import DeepSpeedPlugin

    args, env = launch_env(name, monkeypatch)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    assert plugin.zero_stage == stage and config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    # the batch sizes come from the stage's TRL config ("auto"), filled in by transformers
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0
    if stage == 3:  # save_model gathers the shards into one checkpoint
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert plugin.zero3_init_flag is True


def test_quant_storage_field():
    torch = pytest.importorskip("torch")
    assert QuantSettings().to_bnb().bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    assert QuantSettings(quant_storage="bfloat16").to_bnb().bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(ConfigError, match="quantization.quant_storage: expected one of uint8, bfloat16"):
        QuantSettings(quant_storage="int4")


def test_a_saved_adapter_records_quant_storage_as_trained():
    """The recipe an adapter records (artifact_recipe.bnb_config) is the config training used,
    storage dtype included, and BitsAndBytesConfig takes it as it is."""
    pytest.importorskip("torch")
    from transformers import BitsAndBytesConfig

    from rlhf_plugins.artifact_recipe import bnb_config

    quant = QuantSettings(compute_dtype="bfloat16", quant_storage="bfloat16")
    recorded = bnb_config(quant)
    assert recorded == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                        "bnb_4bit_quant_storage": "bfloat16"}
    assert BitsAndBytesConfig(**recorded).to_dict() == quant.to_bnb().to_dict()
    assert "bnb_4bit_quant_storage" not in bnb_config(QuantSettings())  # bitsandbytes' default


def test_trl_model_config_name_maps_to_quant_storage():
    from rlhf_plugins.config import map_model_config_names

    out = map_model_config_names({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "sft.yaml")
    assert out == {"quantization": {"load_in_4bit": True, "quant_storage": "bfloat16"}}


def test_quant_storage_makes_the_4bit_model_one_dtype(tmp_path):
    """What FSDP + QLoRA needs: with quant_storage = the compute dtype, the packed 4-bit weights
    and the unquantized modules share one dtype; the model computes exactly what uint8 storage does."""
    torch = pytest.importorskip("torch")
    import bitsandbytes as bnb
    from helpers_models import make_tiny_model_dir

    from rlhf_plugins.models import load_causal_lm

    model_dir = make_tiny_model_dir(tmp_path, hidden_size=64, intermediate_size=128)
    ids = torch.tensor([[1, 40, 41, 42, 2, 1, 50, 51]])
    packed = load_causal_lm(model_dir, quantization=QuantSettings(compute_dtype="bfloat16"))
    uniform = load_causal_lm(model_dir, quantization=QuantSettings(compute_dtype="bfloat16",
                                                                    quant_storage="bfloat16"))
    assert {p.dtype for p in packed.parameters()} == {torch.uint8, torch.bfloat16}
    assert {p.dtype for p in uniform.parameters()} == {torch.bfloat16}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in uniform.modules())
    with torch.no_grad():
        torch.testing.assert_close(uniform(ids).logits, packed(ids).logits, atol=0, rtol=0)
