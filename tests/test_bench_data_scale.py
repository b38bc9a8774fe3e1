"""bench/data_scale.py at 200 rows (issue 29): each stage's data path and TRL's, and the table.

The measurements run in this process here (the bench runs each in a fresh one, as the slow
test checks once); what is checked is that every stage reads the file and encodes every row,
and that each result carries the fields the README's table is made of.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import data_scale  # noqa: E402

N = 200


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rlhf_plugins.testing import tiny_model_dir

    root = tmp_path_factory.mktemp("data-scale")
    paths = {kind: root / f"{kind}.jsonl" for kind in ("sft", "preference")}
    for kind, path in paths.items():
        assert data_scale.write_rows(path, N, kind) == path.stat().st_size
    return paths, str(tiny_model_dir(root / "tiny"))


def test_synthetic_files_hold_n_conversational_rows(files):
    paths, _ = files
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    pairs = [json.loads(line) for line in paths["preference"].read_text().splitlines()]
    assert len(sft) == len(pairs) == N
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"} and pairs[0]["chosen"] != pairs[0]["rejected"]
    assert 500 < paths["sft"].stat().st_size / N < 2000  # ~1 KB a row: 1M rows ~1 GB


def test_every_stage_and_trl_prepare_every_row_and_the_table_compares_them(files):
    paths, tokenizer = files
    results = []
    for stage in data_scale.STAGES:
        result = data_scale.measure(stage, str(paths[data_scale._kind(stage)]), tokenizer)
        result["file_mb"] = 0
        assert set(result) == set(data_scale.FIELDS), stage
        # KTO makes a desirable and an undesirable row of each pair
        assert (result["rows"], result["out_rows"]) == (N, 2 * N if stage == "kto" else N), stage
        assert result["rows_per_s"] > 0 and result["prepare_s"] >= 0 and result["load_s"] >= 0
        assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
        assert result["peak_anon_mb"] > 0
        results.append(result)
    lines = data_scale.table(results).splitlines()
    assert len(lines) == 2 + len(data_scale.STAGES)
    by_stage = {line.split("|")[2].strip(): line.split("|") for line in lines[2:]}
    sft, trl = (next(r for r in results if r["stage"] == s) for s in ("sft", "trl_sft"))
    assert by_stage["sft"][5].strip() == f"{sft['rows_per_s'] / trl['rows_per_s']:.2f}x"
    assert by_stage["trl_sft"][5].strip() == by_stage["load"][5].strip() == ""


@pytest.mark.slow
def test_the_sweep_measures_in_a_fresh_process(tmp_path, files):
    _, tokenizer = files
    results = data_scale.bench([N], ["sft"], tmp_path / "work", tokenizer, log=lambda _: None)
    assert [(r["stage"], r["rows"], r["out_rows"]) for r in results] == [("sft", N, N)]
    assert set(results[0]) == set(data_scale.FIELDS)
    assert not list((tmp_path / "work").iterdir())  # the JSONL files are deleted
