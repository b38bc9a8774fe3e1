"""Bad paths: output folders that are files, missing inputs, broken checkpoints.

Each failure comes before a model loads (the issue saw `FileExistsError` after loading) and
leaves what was there untouched.
"""
from __future__ import annotations

import json

import pytest

from helpers_bad_inputs import (FAST, GOOD_ROWS, as_interrupted, cli_error, run_main, write_jsonl,
                                write_yaml)
from rlhf_plugins.testing import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bad-paths-model") / "tiny")


def _stage_config(command, tiny_dir, out):
    if command == "sft":
        return {"model": str(tiny_dir), "output_dir": str(out), "max_steps": 1, **FAST}
    if command == "rm":
        return {"model": str(tiny_dir), "output_dir": str(out), "max_steps": 1, **FAST}
    if command == "ppo":
        return {"model": str(tiny_dir), "output_dir": str(out), "max_steps": 1, "num_generations": 2,
                "per_device_train_batch_size": 2, "reward_functions": ["exact_answer"], **FAST}
    return {"model": str(tiny_dir), "output_dir": str(out), "num_prompts": 2, "num_samples": 2,
            "max_new_tokens": 4, "reward_functions": ["length_penalty"]}


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "sample", "best-of-n"])
def test_output_dir_that_is_a_file(tmp_path, tiny_dir, command):
    blocker = tmp_path / "out"
    blocker.write_text("keep me")
    cfg = write_yaml(tmp_path / "c.yaml", _stage_config(command, tiny_dir, blocker))
    cli_error([command, "--config", cfg], str(cfg), "output_dir", str(blocker),
              "exists and is not a directory", untouched=[blocker])


@pytest.mark.parametrize("command", ["sft", "sample"])
def test_output_dir_under_a_file(tmp_path, tiny_dir, command):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    out = blocker / "run"
    cfg = write_yaml(tmp_path / "c.yaml", _stage_config(command, tiny_dir, out))
    cli_error([command, "--config", cfg], "output_dir", f"{blocker} is a file", untouched=[blocker])


def test_output_dir_flag_that_is_a_file(tmp_path, tiny_dir):
    blocker = tmp_path / "out"
    blocker.write_text("keep me")
    cfg = write_yaml(tmp_path / "c.yaml", _stage_config("sft", tiny_dir, tmp_path / "unused"))
    cli_error(["sft", "--config", cfg, "--output-dir", blocker], "output_dir", str(blocker),
              untouched=[blocker, tmp_path / "unused"])


def test_data_synth_out_that_is_a_file(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("keep me")
    cli_error(["data", "synth", "--out", blocker, "--n", "4"], "--out", str(blocker),
              untouched=[blocker])


def test_pipeline_output_dir_that_is_a_file(tmp_path, tiny_dir):
    blocker = tmp_path / "run"
    blocker.write_text("keep me")
    cfg = write_yaml(tmp_path / "p.yaml", {"model": str(tiny_dir), "output_dir": str(blocker),
                                           "task": {"n_train": 4, "n_eval": 2}})
    cli_error(["pipeline", cfg], str(cfg), "output_dir", untouched=[blocker])


def test_pipeline_checks_the_model_before_writing_data(tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"model": str(tmp_path / "nope"), "output_dir": str(out),
                                           "task": {"n_train": 4, "n_eval": 2}})
    cli_error(["pipeline", cfg], f"{cfg}: model:", "nope", "no such directory", untouched=[out])


def test_pipeline_section_naming_a_missing_model(tmp_path, tiny_dir):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"model": str(tiny_dir), "output_dir": str(out),
                                           "task": {"n_train": 4, "n_eval": 2}, "stages": ["sft"],
                                           "sft": {"model": str(tmp_path / "other")}})
    cli_error(["pipeline", cfg], f"{cfg}: sft.model:", "other", untouched=[out])


def test_model_directory_without_config(tmp_path):
    (tmp_path / "empty-model").mkdir()
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", {"model": str(tmp_path / "empty-model"),
                                           "output_dir": str(out)})
    cli_error(["sft", "--config", cfg], "model", "no config.json", untouched=[out])


def test_dataset_directory_that_is_not_a_dataset(tmp_path, tiny_dir):
    (tmp_path / "notdata").mkdir()  # no data files (a folder of .txt files is a text dataset)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", {**_stage_config("sft", tiny_dir, out),
                                           "dataset": str(tmp_path / "notdata")})
    cli_error(["sft", "--config", cfg], "dataset", "notdata", "cannot load", untouched=[out])


@pytest.mark.parametrize("command", ["ppo", "sample"])
def test_reward_model_directory_that_is_not_one(tmp_path, tiny_dir, command):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", {**_stage_config(command, tiny_dir, out),
                                           "reward_model": str(tiny_dir)})
    cli_error([command, "--config", cfg], "reward_model", "not a reward model", untouched=[out])


def test_missing_plugin_file(tmp_path, tiny_dir):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", _stage_config("sft", tiny_dir, out))
    cli_error(["-p", tmp_path / "nope.py", "sft", "--config", cfg], "--plugin", "nope.py",
              "file not found", untouched=[out])


def test_config_plugins_list_with_a_missing_module(tmp_path, tiny_dir):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", {**_stage_config("sft", tiny_dir, out),
                                           "plugins": ["no_such_module_xyz"]})
    cli_error(["sft", "--config", cfg], str(cfg), "plugins", "no_such_module_xyz", untouched=[out])


def test_render_missing_and_broken_conversation_files(tmp_path, tiny_dir):
    cli_error(["render", tmp_path / "nope.json", "--tokenizer", tiny_dir], "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user",\n "content": }]')
    cli_error(["render", bad, "--tokenizer", tiny_dir], "bad.json", "invalid JSON at line 2")


def test_mc_labels_out_that_is_a_directory(tmp_path):
    (tmp_path / "labels").mkdir()
    cli_error(["rm", "mc-labels", "--problems", "synthetic", "--out", tmp_path / "labels"],
              "--out", "is a directory")


def test_a_checkpoint_whose_trainer_state_is_empty_is_skipped(tmp_path, caplog):
    from rlhf_plugins.stages.skeleton import last_checkpoint

    for step, state in ((2, {"global_step": 2}), (4, {})):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "trainer_state.json").write_text(json.dumps(state))
    weightless = tmp_path / "checkpoint-6"
    weightless.mkdir()
    (weightless / "trainer_state.json").write_text('{"global_step": 6}')
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4: trainer_state.json holds no global_step" in caplog.text
    assert "checkpoint-6: no model or adapter weights" in caplog.text


def test_resume_past_a_checkpoint_with_an_empty_trainer_state(tmp_path, tiny_dir):
    """The issue's `{}` case end to end: the rerun resumes from the checkpoint before it."""
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS * 2)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "c.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 3,
        "per_device_train_batch_size": 2, "report_to": "none", "logging_steps": 1,
        "save_strategy": "steps", "save_steps": 1, "lora": {"r": 2, "alpha": 4}})
    code, _, err = run_main(["sft", "--config", cfg])
    assert code == 0, err[-2000:]
    first = json.loads((out / "sft_metrics.json").read_text())
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")  # torn by a crash
    as_interrupted(out)  # the crash came before the run's end
    kept = {n: (out / n / "trainer_state.json").stat().st_mtime_ns for n in ("checkpoint-1", "checkpoint-2")}
    code, _, err = run_main(["sft", "--config", cfg])
    assert code == 0, err[-2000:]
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["global_step"] == 3
    steps = [e["step"] for e in metrics["log_history"] if "loss" in e]
    assert steps == [1, 2, 3]  # the same steps as the uninterrupted run, none repeated
    assert [e["loss"] for e in metrics["log_history"] if "loss" in e][:2] == \
        [e["loss"] for e in first["log_history"] if "loss" in e][:2]
    # resumed from checkpoint-2 (not retrained from step 0): the earlier checkpoints are as they were
    assert {n: (out / n / "trainer_state.json").stat().st_mtime_ns for n in kept} == kept
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
