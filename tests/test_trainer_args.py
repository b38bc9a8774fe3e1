"""device_defaults: the CPU-friendly TRL/transformers training-argument defaults every stage applies."""
import pytest

torch = pytest.importorskip("torch")

from rlhf_plugins.stages.trainer_args import device_defaults  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults apply without CUDA")


def test_cpu_defaults_fill_only_what_the_user_left_unset():
    assert device_defaults({}) == {"bf16": False, "dataloader_pin_memory": False,
                                   "gradient_checkpointing": False, "report_to": "none"}
    mine = device_defaults({"gradient_checkpointing": True, "fp16": False, "report_to": "tensorboard"})
    assert mine["gradient_checkpointing"] is True and mine["report_to"] == "tensorboard"
    assert "bf16" not in mine and "use_cpu" not in mine


def test_bf16_without_a_bf16_gpu_trains_on_the_cpu_with_autocast(tmp_path):
    from transformers import TrainingArguments
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("a bf16 GPU (e.g. MPS) is present")
    with pytest.raises(ValueError, match="use_cpu"):  # what transformers does without the default
        TrainingArguments(output_dir=str(tmp_path), bf16=True)
    kwargs = device_defaults({"bf16": True})
    assert kwargs["use_cpu"] is True
    args = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert args.bf16 and args.device.type == "cpu"
    assert device_defaults({"bf16": True, "use_cpu": False})["use_cpu"] is False  # the user's choice stays
