"""Resume safety of stage commands and the pipeline: config + plugin versions decide.

A stage's output dir records its config hash (plugin versions included): the same config
resumes an interrupted run, a different config or an upgraded plugin starts clean.
"""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from helpers_bad_inputs import as_interrupted  # noqa: E402
from helpers_models import make_tiny_model_dir  # noqa: E402

from rlhf_plugins import manager, registry  # noqa: E402

FAST = {"report_to": "none", "logging_steps": 1, "per_device_train_batch_size": 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("resume-model"))


@pytest.fixture
def upgrade(monkeypatch):
    """Pretend rlhf-plugins (the built-ins' distribution) was upgraded."""
    def bump(version: str = "99.0.0"):
        monkeypatch.setattr(manager, "_version", lambda: version)
        registry(reload=True)

    yield bump
    monkeypatch.undo()
    registry(reload=True)


def _as_if_killed(out, checkpoint):
    """`out` as a run killed before saving `checkpoint` leaves it: no such checkpoint, and a
    run record that is not marked finished."""
    shutil.rmtree(out / checkpoint)
    as_interrupted(out)


def _trained_steps(metrics):
    return [e["step"] for e in metrics["log_history"] if "loss" in e]


def test_run_hash_covers_config_and_plugin_versions(upgrade):
    from rlhf_plugins.stages.resume import plugin_versions, run_hash, settings_components
    from rlhf_plugins.stages.sft.settings import SFTSettings

    settings = SFTSettings(template="chatml", masking="final_turn")
    assert settings_components(settings) == {"chat_templates": ["chatml"],
                                             "masking_strategies": ["final_turn"]}
    versions = plugin_versions(settings_components(settings))
    assert set(versions) == {"chat_templates/chatml", "masking_strategies/final_turn"}
    first, _ = run_hash("sft", settings, {"max_steps": 2})
    assert run_hash("sft", SFTSettings(template="chatml", masking="final_turn",
                                       resume=False), {"max_steps": 2})[0] == first
    assert run_hash("sft", settings, {"max_steps": 3})[0] != first
    upgrade()
    assert run_hash("sft", settings, {"max_steps": 2})[0] != first


def test_every_component_field_of_ppo_is_in_the_hash():
    """The group filter is a component too (a selection rule): its plugin's version is hashed."""
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.resume import settings_components

    settings = PPOSettings(advantage_estimator="grpo", critic="none", reward_functions=["exact_answer"],
                           policy_loss="ppo_clip", group_filter="nonzero_variance")
    assert settings_components(settings) == {
        "chat_templates": ["chatml"], "advantage_estimators": ["grpo"],
        "reward_functions": ["exact_answer"], "policy_losses": ["ppo_clip"],
        "selection_rules": ["nonzero_variance"]}


def test_ppo_command_with_another_configs_checkpoints_starts_clean(tmp_path, tiny_dir):
    """The issue's case: max_steps 2 in a folder holding checkpoint-3 of another config."""
    from rlhf_plugins.stages.ppo.train import ppo_from_config

    config = {"model": str(tiny_dir), "reward_functions": ["exact_answer"], "num_examples": 4,
              "advantage_estimator": "grpo", "critic": "none", "num_generations": 2,
              "max_completion_length": 4, "max_steps": 3, "save_steps": 1, **FAST}
    out = tmp_path / "ppo"
    ppo_from_config(config, output_dir=out)
    assert (out / "checkpoint-3").is_dir()
    second = ppo_from_config({**config, "max_steps": 2}, output_dir=out)
    assert second.metrics["global_step"] == 2 and _trained_steps(second.metrics)[0] == 1
    assert not (out / "checkpoint-3").exists()
    record = json.loads((out / "rlhf_plugins_run.json").read_text())
    assert record["stage"] == "ppo" and "advantage_estimators/grpo" in record["plugins"]


def test_same_config_resumes_and_a_plugin_upgrade_starts_clean(tmp_path, tiny_dir, upgrade):
    from rlhf_plugins.stages.sft.train import sft_from_config

    config = {"model": str(tiny_dir), "num_examples": 8, "max_steps": 3, "save_steps": 1, **FAST}
    out = tmp_path / "sft"
    sft_from_config(config, output_dir=out)
    _as_if_killed(out, "checkpoint-3")  # killed before the last save
    first_save = (out / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns
    resumed = sft_from_config(config, output_dir=out)
    assert resumed.metrics["global_step"] == 3
    # resumed from checkpoint-2: the earlier checkpoints were not rewritten
    assert (out / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns == first_save
    _as_if_killed(out, "checkpoint-3")
    upgrade()  # the template / masking plugins changed: resuming would mix two versions
    fresh = sft_from_config(config, output_dir=out)
    assert fresh.metrics["global_step"] == 3
    assert (out / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns != first_save
    record = json.loads((out / "rlhf_plugins_run.json").read_text())
    assert all("99.0.0" in v for v in record["plugins"].values())


def test_pipeline_reruns_the_stages_whose_plugins_were_upgraded(tmp_path, tiny_dir, upgrade):
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config

    config = {"model": str(tiny_dir), "output_dir": str(tmp_path / "run"), "stages": ["sft"],
              "task": {"n_train": 8, "n_eval": 2}, "eval": {"max_new_tokens": 4, "batch_size": 2},
              "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
              "sft": {"max_steps": 1, "save_strategy": "no", **FAST}}

    def run():
        pipeline = Pipeline(load_pipeline_config(config), config_label="test")
        pipeline.run()
        return pipeline.records["sft"]

    assert not run().skipped
    assert run().skipped  # same config, same plugins: up to date
    upgrade()
    rerun = run()
    assert not rerun.skipped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any(p.get("version") == "99.0.0" for p in summary["plugins"])
