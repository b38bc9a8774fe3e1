"""Data files through `datasets` (issue 29): memory-mapped Arrow, never a Python list of rows.

`load_data_file` is the one reader of a user's data file: a stage's `dataset`, the pipeline's
held-out problems, `rm mc-labels --problems` and the graded samples of rejection sampling.
Its rows are checked against `json.loads` of each line; broken files name the 1-based line.
"""
from __future__ import annotations

import json

import pytest

from helpers_bad_inputs import cli_error
from rlhf_plugins.data.files import load_data_file
from rlhf_plugins.errors import DataError

ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1),
         "uid": f"p{i}", "kind": "add"} for i in range(5)]


def _write(path, rows, blank_after=()):
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i in blank_after else "")
                            for i, r in enumerate(rows)))
    return path


def test_a_jsonl_file_is_a_memory_mapped_dataset_of_its_lines(tmp_path):
    data = _write(tmp_path / "rows.jsonl", ROWS, blank_after=(1,))
    ds = load_data_file(data)
    assert [dict(r) for r in ds] == [json.loads(line) for line in data.read_text().splitlines() if line]
    # Arrow on disk, mapped (not a table held in memory), outside the HF cache
    assert type(ds.data).__name__ == "MemoryMappedTable"
    assert ds.cache_files and all("rlhf-plugins-data-" in f["filename"] for f in ds.cache_files)
    assert load_data_file(data).cache_files == ds.cache_files  # a file read twice is parsed once


@pytest.mark.parametrize("text, needle", [
    ('{"a": 1}\n\n{"a": }\n', ":3: invalid JSON"),
    ('{"a": 1}\n[1]\n', ":2: expected a JSON object, got list"),
    ("\n\n", ": no rows"),
])
def test_a_broken_file_names_its_line(tmp_path, text, needle):
    data = tmp_path / "rows.jsonl"
    data.write_text(text)
    with pytest.raises(DataError, match=f"^{data}{needle}"):
        load_data_file(data)


def test_mc_labels_problems_file_broken_line_before_any_model_loads(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "a", "steps": ["x"]}\n\n{"prompt": \n')
    out = tmp_path / "labels.jsonl"
    cli_error(["rm", "mc-labels", "--problems", problems, "--out", out,
               "--policy", tmp_path / "no-such-model"], f"{problems}:3: invalid JSON", untouched=[out])


def test_mc_labels_problem_without_steps_names_its_line_before_any_model_loads(tmp_path):
    """Line 3 (after a blank line) has no steps: one error naming the file's line, exit 2, before
    the (missing) policy would load; nothing written."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "a", "steps": ["x"]}\n\n{"prompt": "b", "steps": []}\n')
    out = tmp_path / "labels.jsonl"
    cli_error(["rm", "mc-labels", "--problems", problems, "--out", out,
               "--policy", tmp_path / "no-such-model"],
              f"{problems} row 3: needs 'steps' (a non-empty list of strings)", untouched=[out])


def test_evaluation_of_a_dataset_equals_that_of_its_rows(tmp_path):
    """The pipeline evaluates the held-out file as a Dataset: same result as the list of rows."""
    from rlhf_plugins.evaluation import evaluate_policy
    from rlhf_plugins.models import load_causal_lm, load_tokenizer
    from rlhf_plugins.testing import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "tiny")
    model, tok = load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    data = _write(tmp_path / "eval.jsonl", ROWS)
    kw = dict(max_new_tokens=4, batch_size=2, samples=2)
    from_file = evaluate_policy(model, tok, load_data_file(data), **kw)
    assert from_file == evaluate_policy(model, tok, ROWS, **kw)
    assert from_file["n"] == 5 and len(from_file["samples"]) == 2
    assert from_file["uids"] == [r["uid"] for r in ROWS]


def test_mc_labels_reads_a_problems_file_through_datasets(tmp_path):
    """`--problems FILE` (blank lines, `--num-problems` 3 of 4): each written row is its problem
    plus labels; the last step's label is the verifier's on the whole solution (no rollout), so
    it matches the synthetic task's own label of that step."""
    from helpers_bad_inputs import run_main
    from rlhf_plugins.data import synth
    from rlhf_plugins.testing import tiny_model_dir

    problems = synth.step_rows(4, seed=3, split="train")
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "labels"}) + "\n"
                              for p in problems))
    out = tmp_path / "labels.jsonl"
    code, _, err = run_main(["rm", "mc-labels", "--problems", data, "--out", out, "--num-problems", "3",
                             "--policy", tiny_model_dir(tmp_path / "tiny"), "--num-rollouts", "1",
                             "--max-new-tokens", "2"])
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["steps"] for r in rows] == [p["steps"] for p in problems[:3]]
    assert [r["answer"] for r in rows] == [p["answer"] for p in problems[:3]]
    for row, problem in zip(rows, problems):
        assert len(row["labels"]) == len(row["steps"]) and set(row["labels"]) <= {1, -1}
        assert row["labels"][-1] == (1 if problem["labels"][-1] > 0 else -1)
