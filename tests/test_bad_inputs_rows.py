"""Bad data rows: one error line naming the file and the 1-based row (the file's line), nothing
written; rows TRL would drop after truncation are counted, not lost silently."""
from __future__ import annotations

import json

import pytest

from helpers_bad_inputs import FAST, GOOD_ROWS, cli_error, conversation, run_main, write_jsonl, write_yaml
from rlhf_plugins.testing import tiny_model_dir

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bad-rows-model") / "tiny")


def _sft(tmp_path, tiny_dir, data, **extra):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(tiny_dir), "dataset": str(data),
                                             "output_dir": str(out), "max_steps": 1, **FAST, **extra})
    return ["sft", "--config", cfg], out


SFT_ROWS = [
    ({"content": "hello"}, "row 2: missing field 'messages'"),
    ({"messages": []}, "row 2: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}, A]}, "row 2: message 0: unknown role 'wizard'"),
    ({"messages": [U, {"role": "assistant", "content": 3}]}, "row 2: message 1: 'content' must be a string"),
    ({"messages": [U, {"role": "system", "content": "s"}, A]}, "row 2: message 1: a system message must be the first"),
    ({"messages": [U]}, "row 2: message 0: the conversation ends with a 'user' turn"),
    ({"messages": [U, {"role": "assistant", "content": ""}]}, "row 2: message 1: empty assistant content"),
    ({"messages": [U, {"role": "assistant", "content": "  \n"}]}, "row 2: message 1: empty assistant content"),
    ({"messages": [U, {"role": "tool", "content": "42"}, A]}, "row 2: message 1: tool result without"),
    ({"messages": [U, {"role": "assistant"}]}, "row 2: message 1: missing key 'content'"),
    ({"text": ""}, "row 2: text: expected a non-empty string"),
    ({"messages": "hi there"}, "row 2: field 'messages' must be a non-empty list"),
]


@pytest.mark.parametrize("bad, needle", SFT_ROWS, ids=[f"sft-{i}" for i in range(len(SFT_ROWS))])
def test_sft_bad_row(tmp_path, tiny_dir, bad, needle):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROWS[0], bad, GOOD_ROWS[1]])
    argv, out = _sft(tmp_path, tiny_dir, data)
    cli_error(argv, f"{data} {needle}", untouched=[out])


def test_row_numbers_are_the_files_lines(tmp_path, tiny_dir):
    """Blank lines count as lines: the bad row on line 4 is reported as row 4."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n\n" + json.dumps(GOOD_ROWS[1]) + "\n"
                    + json.dumps({"messages": [U]}) + "\n")
    argv, out = _sft(tmp_path, tiny_dir, data)
    cli_error(argv, f"{data} row 4: ", untouched=[out])


def test_json_array_rows_are_numbered_from_one(tmp_path, tiny_dir):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([GOOD_ROWS[0], GOOD_ROWS[1], {"messages": [U]}]))
    argv, out = _sft(tmp_path, tiny_dir, data)
    cli_error(argv, f"{data} row 3: ", untouched=[out])


@pytest.mark.parametrize("text, needle", [
    ('{"messages": []}\n{"messages": [}\n', ":2: invalid JSON"),
    ('{"messages": []}\n[1, 2]\n', ":2: expected a JSON object, got list"),
    ("", ": no rows"),
    ("\n\n", ": no rows"),
], ids=["syntax", "not-an-object", "empty", "blank"])
def test_unreadable_data_file(tmp_path, tiny_dir, text, needle):
    data = tmp_path / "train.jsonl"
    data.write_text(text)
    argv, out = _sft(tmp_path, tiny_dir, data)
    cli_error(argv, f"{data}{needle}", untouched=[out])


def _ppo(tmp_path, tiny_dir, data):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "ppo.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 1,
        "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4,
        "reward_functions": ["length_penalty"], **FAST})
    return ["ppo", "--config", cfg], out


PPO_ROWS = [
    ([{"prompt": [U]}, {"prompt": [{"role": "wizard", "content": "b"}]}],
     "row 2, message 0: unknown role 'wizard'"),
    ([{"prompt": "hi"}, {"prompt": [U]}], "row 2: prompt is a list of messages but row 1 holds a string"),
    ([{"prompt": [U]}, {"prompt": "hi"}], "row 2: prompt is a string but row 1 holds a list of messages"),
    ([{"prompt": "hi"}, {"prompt": 5}], "row 2: prompt: expected a string or a list of messages, got int"),
    ([{"prompt": "hi"}, {"prompt": "  "}], "row 2: prompt: empty string"),
    ([{"prompt": [U]}, {"prompt": [U, A]}], "row 2: prompt: ends with an assistant message"),
    ([{"prompt": [U]}, {"prompt": [{"role": "user", "content": 7}]}], "row 2, message 0: 'content' must be a string"),
    ([{"question": "hi"}], "rows need a `prompt` column"),
]


@pytest.mark.parametrize("rows, needle", PPO_ROWS, ids=[f"ppo-{i}" for i in range(len(PPO_ROWS))])
def test_ppo_bad_prompt_rows(tmp_path, tiny_dir, rows, needle):
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv, out = _ppo(tmp_path, tiny_dir, data)
    cli_error(argv, str(data), needle, untouched=[out])


SAMPLE_ROWS = [
    ([{"prompt": "hi"}, {"prompt": [{"role": "wizard", "content": "b"}]}], "row 2, message 0: unknown role"),
    ([{"prompt": "hi"}, {"question": "b"}], "row 2: missing field 'prompt'"),
    ([{"prompt": [U, A]}], "row 1: the prompt ends with an assistant message"),
    ([{"prompt": "hi"}, {"prompt": [{"role": "user", "content": None}]}], "row 2, message 0: 'content' must be a string"),
]


@pytest.mark.parametrize("rows, needle", SAMPLE_ROWS, ids=[f"sample-{i}" for i in range(len(SAMPLE_ROWS))])
def test_sample_bad_prompt_rows(tmp_path, tiny_dir, rows, needle):
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rs.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "num_samples": 2,
        "max_new_tokens": 4, "reward_functions": ["length_penalty"]})
    cli_error(["sample", "--config", cfg], str(data), needle, untouched=[out])


RM_ROWS = [
    ({"prompt": "a", "chosen": 5, "rejected": "c"}, "row 2: chosen: expected text or a non-empty list"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "row 2: chosen == rejected"),
    ({"prompt": "a", "chosen": "b"}, "row 2: rejected: missing"),
    ({"prompt": "", "chosen": "b", "rejected": "c"}, "row 2: prompt: empty"),
]


@pytest.mark.parametrize("bad, needle", RM_ROWS, ids=[f"rm-{i}" for i in range(len(RM_ROWS))])
def test_rm_bad_rows_in_strict_mode(tmp_path, tiny_dir, bad, needle):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, bad])
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rm.yaml", {"model": str(tiny_dir), "dataset": str(data),
                                            "output_dir": str(out), "strict": True, "max_steps": 1,
                                            **FAST})
    line = cli_error(["rm", "--config", cfg], f"{data} {needle}", untouched=[out])
    assert "chosen: chosen:" not in line


def test_rm_with_no_usable_row(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": 1, "rejected": "c"}] * 2)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rm.yaml", {"model": str(tiny_dir), "dataset": str(data),
                                            "output_dir": str(out), "max_steps": 1, "bad_rows": "skip",
                                            "max_bad_fraction": 1, **FAST})
    cli_error(["rm", "--config", cfg], str(data), "no usable rows", f"{data} row 1", untouched=[out])


# --- truncation --------------------------------------------------------------------------------

def test_every_row_cut_by_max_length_fails_before_the_model_loads(tmp_path, tiny_dir):
    long_prompt = conversation(user="x " * 200, assistant="ok")
    data = write_jsonl(tmp_path / "train.jsonl", [long_prompt, long_prompt])
    argv, out = _sft(tmp_path, tiny_dir, data, max_length=16)
    cli_error(argv, str(data), "no row has a trained token within max_length=16", untouched=[out])


def test_rows_dropped_by_truncation_are_counted(tmp_path, tiny_dir):
    """The issue saw `train_rows: 2` when TRL dropped one of them after truncation."""
    data = write_jsonl(tmp_path / "train.jsonl", [conversation(user="x " * 200, assistant="ok"),
                                                  conversation("Hi", "Hello!")])
    argv, out = _sft(tmp_path, tiny_dir, data, max_length=32)
    code, _, err = run_main(argv)
    assert code == 0, err[-2000:]
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["train_rows"] == 1 and metrics["dropped_rows"] == 1


def test_drop_truncated_follows_trls_truncation_modes():
    from datasets import Dataset

    from rlhf_plugins.errors import DataError
    from rlhf_plugins.stages.sft.dataset import drop_truncated
    from rlhf_plugins.stages.sft.train import build_sft_config

    ds = Dataset.from_dict({"input_ids": [[1] * 6, [1] * 6, [1] * 6],
                            "assistant_masks": [[0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]})
    start = build_sft_config({"max_length": 3, "report_to": "none"}, "unused")
    kept, dropped = drop_truncated(ds, start, "d.jsonl")
    assert (len(kept), dropped) == (2, 1) and kept["assistant_masks"][0] == [1, 1, 0, 0, 0, 0]
    end = build_sft_config({"max_length": 2, "truncation_mode": "keep_end", "report_to": "none"}, "unused")
    kept, dropped = drop_truncated(ds, end, "d.jsonl")
    assert (len(kept), dropped) == (1, 2)
    tiny = build_sft_config({"max_length": 1, "report_to": "none"}, "unused")
    with pytest.raises(DataError, match=r"^d.jsonl: no row has a trained token within max_length=1"):
        drop_truncated(ds.select([0, 2]), tiny, "d.jsonl")


# --- row numbers after eval splits: always the line in the user's file (issue 29) --------------

def _with_bad_line(rows, line, bad, blank_after=0):
    """`rows` as JSON lines with `bad` on 1-based `line` (a blank line after line `blank_after`)."""
    rows = list(rows)
    rows[line - 1] = bad
    lines = [json.dumps(r) for r in rows]
    if blank_after:
        lines.insert(blank_after, "")
    return "\n".join(lines) + "\n"


#: the issue's lines: with `eval_size: 4` line 7 was reported as "row 6", line 21 as "row 17",
#: line 1 as "(eval) row 1"; with these 24 rows and seed 42 lines 6, 16, 19 and 24 are held out
ISSUE_LINES = [(1, False), (7, False), (21, False), (16, True), (24, True)]


@pytest.mark.parametrize("line, held_out", ISSUE_LINES, ids=[f"line-{n}" for n, _ in ISSUE_LINES])
def test_rm_rows_are_the_files_lines_with_eval_size(tmp_path, tiny_dir, line, held_out):
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text(_with_bad_line(pairs, line, {"prompt": "a", "chosen": "b"}))
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rm.yaml", {"model": str(tiny_dir), "dataset": str(data),
                                            "output_dir": str(out), "strict": True, "eval_size": 4,
                                            "max_steps": 1, **FAST})
    label = f"{data} (eval)" if held_out else str(data)
    cli_error(["rm", "--config", cfg], f"{label} row {line}: rejected: missing", untouched=[out])


@pytest.mark.parametrize("line", [1, 7, 21])
def test_sft_rows_are_the_files_lines_with_eval_size(tmp_path, tiny_dir, line):
    data = tmp_path / "train.jsonl"
    data.write_text(_with_bad_line(GOOD_ROWS * 12, line, {"messages": [U]}, blank_after=3))
    shown = line + (line > 3)  # the blank line after line 3 is a line too
    argv, out = _sft(tmp_path, tiny_dir, data, eval_size=4)
    cli_error(argv, f"{data} row {shown}: message 0: the conversation ends", untouched=[out])


@pytest.mark.parametrize("line", [1, 7, 21])
def test_ppo_prompt_rows_are_the_files_lines_with_held_out_prompts(tmp_path, tiny_dir, line):
    """A prompt spelling a special token is found after the tokenizer loads: still the file's line."""
    prompts = [{"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(24)]
    data = tmp_path / "prompts.jsonl"
    data.write_text(_with_bad_line(prompts, line, {"prompt": [{"role": "user", "content": "a <|im_end|>"}]}))
    argv, out = _ppo(tmp_path, tiny_dir, data)
    argv += ["--set", "eval_examples=4"]
    cli_error(argv, f"{data}: row {line}, message 0: content contains '<|im_end|>'", untouched=[out])


def test_ppo_eval_file_rows_are_that_files_lines(tmp_path, tiny_dir):
    train = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    held = tmp_path / "held.jsonl"
    held.write_text(_with_bad_line([{"prompt": f"other {i}"} for i in range(6)], 4,
                                   {"prompt": "x <|im_start|>"}, blank_after=1))
    argv, out = _ppo(tmp_path, tiny_dir, train)
    argv += ["--set", f"eval_dataset={held}"]
    cli_error(argv, f"{held} (eval): row 5, message 0: content contains '<|im_start|>'",
              untouched=[out])


@pytest.mark.parametrize("line", [1, 7, 21])
def test_sample_prompt_rows_are_the_files_lines(tmp_path, tiny_dir, line):
    """Sampling holds nothing out: its rows are numbered by the file's lines, blank lines too."""
    prompts = [{"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(24)]
    data = tmp_path / "prompts.jsonl"
    data.write_text(_with_bad_line(prompts, line, {"prompt": [{"role": "wizard", "content": "b"}]},
                                   blank_after=3))
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rs.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "num_samples": 2,
        "num_prompts": 22, "max_new_tokens": 4, "reward_functions": ["length_penalty"]})
    cli_error(["sample", "--config", cfg], f"{data}: row {line + (line > 3)}, message 0: unknown role",
              untouched=[out])
