"""The stage skeleton: one dataset-source loader, config sources, TRL configs, checkpoints."""
from __future__ import annotations

import json

import pytest

from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.stages.skeleton import (build_trl_config, last_checkpoint, load_dataset_source,
                                          read_stage_source)

ROWS = [{"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": "What is 4 + 4?", "answer": 8},
        {"prompt": "What is 1 + 6?", "answer": 7}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt", "saved"])
def test_every_source_kind_gives_the_same_rows(tmp_path, suffix):
    import datasets

    path = tmp_path / f"rows{suffix}"
    if suffix in (".jsonl", ".txt"):  # any other suffix is read as JSON lines
        _jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    elif suffix == ".parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    ds, label = load_dataset_source(path, num_examples=2)
    assert [dict(r) for r in ds] == ROWS[:2]
    assert label == (f"{path}[train]" if suffix == "saved" else str(path))


def test_messages_keep_their_own_keys(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "x", "name": "bob"}]},
            {"messages": [{"role": "user", "content": "yo"}], "extra": [1, "mixed"]}]
    ds, _ = load_dataset_source(_jsonl(tmp_path / "m.jsonl", rows))
    assert [dict(r) for r in ds][0]["messages"] == rows[0]["messages"]
    assert ds[1]["extra"] == [1, "mixed"]


@pytest.mark.parametrize("text, message", [
    ('{"a": 1}\n{not json\n', r"bad.jsonl:2: invalid JSON"),
    ('{"a": 1}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object, got list"),
    ("\n\n", r"bad.jsonl: no rows"),
])
def test_broken_files_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset_source(path)


def test_missing_sources_and_splits_are_config_errors(tmp_path):
    import datasets

    with pytest.raises(ConfigError, match="no such file or directory"):
        load_dataset_source(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_dataset_source("data/missing.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="no split 'test' \\(has train\\)"):
        load_dataset_source(tmp_path / "d", split="test")


def test_read_stage_source_overrides_and_output_dir(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lora: {r: 4}\nmax_steps: 2\noutput_dir: out\n")
    data, where, out = read_stage_source(config, ["lora.r=8", "seed=3"], None)
    assert (data, where, out) == ({"lora": {"r": 8}, "max_steps": 2, "seed": 3}, str(config), "out")
    with pytest.raises(ConfigError, match="no output_dir"):
        read_stage_source({"max_steps": 1}, None, None)


def test_build_trl_config_rejects_replaced_fields():
    from trl import SFTConfig

    rejected = {"assistant_only_loss": "the masking plugin decides"}
    args = build_trl_config(SFTConfig, {"max_steps": 1, "assistant_only_loss": False}, "o",
                            label="SFT", rejected=rejected)
    assert args.max_steps == 1 and args.output_dir == "o"
    with pytest.raises(ConfigError, match="assistant_only_loss: not supported here: the masking"):
        build_trl_config(SFTConfig, {"assistant_only_loss": True}, "o", label="SFT",
                         rejected=rejected)
    with pytest.raises(ConfigError, match="SFT config: "):
        build_trl_config(SFTConfig, {"lr_scheduler_type": "sideways"}, "o", label="SFT")


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, None), (6, "{}"), (8, '{"global_step": 8')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    # 4: killed before its trainer state; 6: a state that is not one; 8: torn JSON
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")  # no weights
