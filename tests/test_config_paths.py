"""Paths in a config are relative to the config file (issue 31, frictions).

A config read from `configs/x.yaml` names its data beside it: `dataset: data/rows.jsonl` is
`configs/data/rows.jsonl`, wherever the command runs. The old reading (relative to the working
directory) still works, with a warning, when only that path exists; hub ids and `synthetic`
pass through; `output_dir` stays relative to the working directory, as `--output-dir` is.
"""
from __future__ import annotations

import logging

import pytest

from rlhf_plugins.config import load_yaml


@pytest.fixture()
def layout(tmp_path, monkeypatch):
    cfg = tmp_path / "project" / "configs"
    (cfg / "data").mkdir(parents=True)
    (cfg / "data" / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (cfg / "model").mkdir()
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    return cfg, work


def test_input_paths_are_read_beside_the_config_file(layout):
    cfg, _ = layout
    (cfg / "x.yaml").write_text("model: model\ndataset: data/rows.jsonl\neval_dataset: org/hub-id\n"
                                "output_dir: runs/x\nsft:\n  dataset: data/rows.jsonl\n"
                                "  reward_model: missing-dir\n")
    data = load_yaml(cfg / "x.yaml")
    assert data["model"] == str((cfg / "model").resolve())
    assert data["dataset"] == str((cfg / "data" / "rows.jsonl").resolve())
    assert data["sft"]["dataset"] == data["dataset"]  # sections too
    assert data["eval_dataset"] == "org/hub-id"  # names nothing beside the config: a hub id
    assert data["sft"]["reward_model"] == "missing-dir"  # left for the stage's own error
    assert data["output_dir"] == "runs/x"  # outputs stay relative to the working directory


def test_a_path_relative_to_the_working_directory_still_works_with_a_warning(layout, caplog):
    cfg, work = layout
    (work / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (cfg / "x.yaml").write_text("dataset: mine.jsonl\ntemplate: chatml\n")
    with caplog.at_level(logging.WARNING, logger="rlhf_plugins.config"):
        data = load_yaml(cfg / "x.yaml")
    assert data["dataset"] == "mine.jsonl"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "dataset: 'mine.jsonl' is read relative to the working directory (deprecated)" in warning
    assert str((cfg / "mine.jsonl").resolve()) in warning  # where it would be read from now
    caplog.clear()
    (cfg / "mine.jsonl").write_text('{"prompt": "c", "completion": "d"}\n')
    data = load_yaml(cfg / "x.yaml")  # both exist: the config file's neighbour wins, silently
    assert data["dataset"] == str((cfg / "mine.jsonl").resolve()) and not caplog.records


def test_a_stage_command_trains_on_the_file_beside_its_config(layout):
    from rlhf_plugins.stages.sft.settings import SFTSettings
    from rlhf_plugins.stages.skeleton import stage_config
    from trl import SFTConfig

    cfg, work = layout
    (cfg / "sft.yaml").write_text("dataset: data/rows.jsonl\nmax_steps: 1\n")
    settings, _, out = stage_config(cfg / "sft.yaml", ["output_dir=out"], None, SFTSettings, SFTConfig)
    assert settings.dataset == str((cfg / "data" / "rows.jsonl").resolve())
