"""A third-party reward head with only the required members, trained and evaluated by the RM stage."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402
from helpers_tokenizers import make_tokenizer  # noqa: E402

from rlhf_plugins import ConfigError  # noqa: E402
from rlhf_plugins.head_data import at_last_attended, outcome_label, pad_batch, render_row  # noqa: E402
from rlhf_plugins.protocols import member  # noqa: E402
from rlhf_plugins.sdk import RewardHead, option  # noqa: E402
from rlhf_plugins.testing import component_plugin  # noqa: E402

ROWS = [{"prompt": f"What is {a} + {b}?", "completion": f"The answer is {a + b + d}.", "label": int(d == 0)}
        for a, b in [(2, 3), (10, 7), (4, 4), (12, 30), (5, 9), (21, 2)] for d in (0, 1)]


class _RequiredMembers:
    """Outcome RM: Linear(hidden, 1) read at the last completion token, BCE on the row's 0/1 label."""

    def build_module(self, hidden_size: int) -> Any:
        return torch.nn.Linear(hidden_size, 1)

    def encode(self, row: Any, *, tokenizer: Any, template: Any, max_length: int | None = None) -> dict:
        ids, _ = render_row(row, tokenizer, template, max_length, what="an outcome row")
        return {"input_ids": ids, "label": outcome_label(row)}

    def collate(self, rows: Any, *args: Any, pad_token_id: int = 0, **kwargs: Any) -> dict:
        batch = pad_batch(rows, pad_token_id)
        batch["label"] = torch.tensor([float(r["label"]) for r in rows])
        return batch

    def _logits(self, head_outputs: Any, batch: Any) -> Any:
        return at_last_attended(head_outputs[..., 0], batch["attention_mask"])

    def compute_loss(self, head_outputs: Any, batch: Any) -> Any:
        logits = self._logits(head_outputs, batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.device))

    def sequence_scores(self, head_outputs: Any, batch: Any) -> Any:
        return torch.sigmoid(self._logits(head_outputs, batch))


@dataclass(frozen=True)
class SdkOutcomeHead(_RequiredMembers, RewardHead):
    """Outcome RM on the SDK base: the required members only."""

    name = "last_token_outcome"


class PlainOutcomeHead(_RequiredMembers):
    """The same head without the SDK: no name, options, label_kind or scoring members."""


@dataclass(frozen=True)
class NoEncodeHead(RewardHead):
    """A head that forgot `encode`."""

    name = "no_encode"

    def build_module(self, hidden_size: int) -> Any:
        return torch.nn.Linear(hidden_size, 1)

    def collate(self, rows: Any, *args: Any, **kwargs: Any) -> dict:
        return {}

    def compute_loss(self, head_outputs: Any, batch: Any) -> Any:
        return head_outputs.sum()

    def sequence_scores(self, head_outputs: Any, batch: Any) -> Any:
        return head_outputs[:, -1, 0]


@dataclass(frozen=True)
class NoOffsetHead(SdkOutcomeHead):
    """Has a `normalize` option but no score offset (supports_normalize stays False)."""

    name = "no_offset"
    normalize: bool = option(False, help="asks for normalization")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("sdk-head"), tokenizer=make_tokenizer("smollm2"))


@pytest.mark.parametrize("head", [SdkOutcomeHead(), PlainOutcomeHead()], ids=["sdk", "plain"])
def test_head_with_only_required_members_trains_in_the_rm_stage(tmp_path, tiny_dir, rlhf_plugin, head):
    from rlhf_plugins.models import LoraSettings
    from rlhf_plugins.stages.reward_model.artifact import load_reward_model
    from rlhf_plugins.stages.reward_model.scoring import score
    from rlhf_plugins.stages.reward_model.settings import RMSettings
    from rlhf_plugins.stages.reward_model.train import run_rm

    reg = rlhf_plugin(component_plugin("reward_heads", head, name="tiny_outcome"), name="tiny-head")
    assert next(p for p in reg.plugins if p.name == "tiny-head").status == "ok"
    assert member(head, "reward_heads", "label_kind") == "outcome"
    data = tmp_path / "outcomes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = RMSettings(model=str(tiny_dir), head="tiny_outcome", dataset=str(data), eval_size=4,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    out = tmp_path / "rm"
    result = run_rm(settings, {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                               "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                               "seed": 0}, out)

    metrics = result.metrics
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert metrics["global_step"] == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert metrics["head"] == "tiny_outcome" and metrics["head_options"] == {}
    assert math.isfinite(metrics["eval_loss"])
    for held in (metrics["heldout_before"], metrics["heldout"]):
        assert held["n"] == 4 and 0.0 <= held["accuracy"] <= 1.0
    for name in ("reward_head.safetensors", "reward_model.json", "rm_metrics.json", "rm_training.png",
                 "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "reward_model.json").read_text())["head"] == "tiny_outcome"
    # the saved artifact reloads under the registered name and scores as the trained model does
    reloaded = load_reward_model(out)
    assert score(reloaded, ROWS[:4], progress=False) == pytest.approx(
        score(result.model, ROWS[:4], progress=False), abs=1e-5)


def test_normalize_needs_a_head_that_supports_it(tmp_path, rlhf_plugin):
    from rlhf_plugins.stages.reward_model.settings import RMSettings
    from rlhf_plugins.stages.reward_model.train import prepare_rm

    rlhf_plugin(component_plugin("reward_heads", NoOffsetHead()), name="no-offset")
    with pytest.raises(ConfigError, match="normalize: head 'no_offset' does not support it"):
        prepare_rm(RMSettings(head="no_offset", normalize=True), {}, tmp_path / "rm")


def test_head_missing_encode_fails_its_plugin_with_one_line(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("reward_heads", NoEncodeHead()), name="forgetful-plugin",
                      raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "forgetful-plugin")
    assert info.status == "failed"
    assert "\n" not in info.error
    assert "ComponentTypeError" in info.error and "forgetful-plugin" in info.error
    assert "reward_heads" in info.error and "missing encode()" in info.error
    assert "no_encode" not in reg.reward_heads


@dataclass(frozen=True)
class PerRowLossHead(SdkOutcomeHead):
    """Forgets to average its BCE: one loss per row."""

    name = "per_row_outcome"

    def compute_loss(self, head_outputs: Any, batch: Any) -> Any:
        logits = self._logits(head_outputs, batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch["label"].to(logits.device), reduction="none")


def test_a_head_loss_that_is_not_one_number_is_one_error_naming_the_head(tmp_path, tiny_dir, rlhf_plugin):
    """The RM trainer checks compute_loss()'s result at the call (rlhf_plugins.guard.check_loss):
    before, a per-row loss was torch's "grad can be implicitly created only for scalar outputs"
    from the Trainer's backward."""
    from rlhf_plugins.errors import ComponentError
    from rlhf_plugins.models import LoraSettings
    from rlhf_plugins.stages.reward_model.settings import RMSettings
    from rlhf_plugins.stages.reward_model.train import run_rm

    rlhf_plugin(component_plugin("reward_heads", PerRowLossHead(), name="per_row_outcome"), name="per-row")
    data = tmp_path / "outcomes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = RMSettings(model=str(tiny_dir), head="per_row_outcome", dataset=str(data), eval_size=4,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    with pytest.raises(ComponentError, match=r"reward head 'per_row_outcome' returned a loss of shape \[4\] "
                                             r"for a batch of 4 sequences; expected one number"):
        run_rm(settings, {"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1,
                          "save_strategy": "no", "report_to": "none", "seed": 0}, tmp_path / "rm")
