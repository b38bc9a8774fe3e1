"""The preference-loss contract, checked at every call by the `dpo` trainer (issue 29: every
family's values have their type/shape checked, naming the plugin).

A loss whose per-pair `losses` come back as [B, 1] would broadcast against [B] tensors and train
on the wrong numbers; one returning a plain float would crash deep in TRL's logging. Both are a
ComponentError naming the plugin and the shapes. The built-ins pass through unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from rlhf_plugins import registry
from rlhf_plugins.errors import ComponentError
from rlhf_plugins.preference_contract import call_preference_loss
from rlhf_plugins.sdk import PreferenceLoss, PreferenceObjective
from rlhf_plugins.testing import component_plugin

torch = pytest.importorskip("torch")

LOGPS = (torch.tensor([-5.0, -6.0, -7.0]), torch.tensor([-6.0, -6.5, -6.0]),
         torch.tensor([-5.5, -6.0, -7.5]), torch.tensor([-5.5, -6.0, -6.5]))


@dataclass(frozen=True)
class Column(PreferenceObjective):
    """A loss written against the SDK whose per-pair losses keep a trailing dim: [B, 1]."""

    name: ClassVar[str] = "column_loss"
    description: ClassVar[str] = "returns [B, 1] losses (test plugin)"

    def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
        return (-(chosen - rejected)).unsqueeze(-1)


class FloatLoss:
    """A Protocol-level loss (no SDK base) returning a float loss and a non-numeric metric."""

    name = "float_loss"
    description = "returns python floats (test plugin)"
    reference_free = False

    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None, **_: Any):
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        if self.metrics is not None:
            return PreferenceLoss(-delta, delta, -delta, self.metrics)
        return PreferenceLoss(float(delta.mean()), delta, -delta, {})


def test_builtin_losses_pass_unchanged():
    for name in registry().preference_losses.names():
        loss = registry().preference_losses.get(name)
        kwargs = {"chosen_lengths": torch.tensor([3, 4, 5]), "rejected_lengths": torch.tensor([4, 4, 2])}
        direct = loss(*LOGPS, **kwargs)
        checked = call_preference_loss(loss, *LOGPS, **kwargs)
        assert torch.equal(checked.losses, direct.losses), name


@pytest.mark.parametrize("component, message", [
    (Column(), r"preference loss 'column_loss' returned \.losses of shape \[3, 1\] for log-probs of "
               r"shape \[3\]; expected \[B\] = \[3\]"),
    (FloatLoss(), r"preference loss 'float_loss' returned PreferenceLoss whose \.losses is float"),
    (FloatLoss(metrics={"kl": "high"}), r"preference loss 'float_loss' returned \.metrics \{'kl': "
                                        r"'high'\}; expected a mapping of names to numbers"),
])
def test_a_wrong_result_names_the_plugin_and_shapes(rlhf_plugin, component, message):
    rlhf_plugin(component_plugin("preference_losses", component))
    loss = registry().preference_losses.get(component.name)
    with pytest.raises(ComponentError, match=message) as info:
        call_preference_loss(loss, *LOGPS)
    assert "plugin" in str(info.value)  # the origin: which plugin registered it


def test_an_exception_inside_the_loss_names_it(rlhf_plugin):
    class Broken(FloatLoss):
        name = "broken_loss"

        def __call__(self, *a: Any, **k: Any):
            raise KeyError("chosen_logits")

    rlhf_plugin(component_plugin("preference_losses", Broken()))
    with pytest.raises(ComponentError, match="broken_loss"):
        call_preference_loss(registry().preference_losses.get("broken_loss"), *LOGPS)


def test_the_dpo_trainer_calls_losses_under_the_contract(tmp_path, rlhf_plugin):
    """A training step with the [B, 1] loss fails with the plugin named, before any update."""
    from helpers_bad_inputs import write_jsonl
    from helpers_models import make_tiny_model_dir
    from rlhf_plugins.stages.dpo.run import prepare_dpo
    from rlhf_plugins.stages.dpo.settings import DPOSettings

    rlhf_plugin(component_plugin("preference_losses", Column()))
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 7}."}
             for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    model = make_tiny_model_dir(tmp_path / "m")
    settings = DPOSettings(model=str(model), dataset=str(data), loss="column_loss",
                           lora={"r": 2, "alpha": 4, "dropout": 0.0}, eval_before=False)
    prepared = prepare_dpo(settings, dict(per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                                          report_to="none", bf16=False, gradient_checkpointing=False),
                           tmp_path / "out")
    with pytest.raises(ComponentError, match=r"'column_loss' returned \.losses of shape \[2, 1\]"):
        prepared.trainer.train()
