"""On-policy preference pairs: the policy's own samples, graded by the verifier (issue 16).

`verified_pairs` against hand-worked expectations; the pipeline's reward-model stage trains on
them when rejection sampling runs first (a real RM run on a tiny model, no mocks).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_plugins.data.verified_pairs import ON_POLICY_KIND, verified_pairs, write_verified_pairs
from rlhf_plugins.errors import ConfigError

from test_pipeline import tiny_config


def _sample(prompt_index: int, completion_index: int, reward: float) -> dict:
    return {"prompt_index": prompt_index, "completion_index": completion_index,
            "prompt": [{"role": "user", "content": f"What is {prompt_index} + 1?"}],
            "completion": [{"role": "assistant", "content": f"p{prompt_index} c{completion_index}"}],
            "reward": reward, "kind": "add", "answer": str(prompt_index + 1)}


#: prompt -> rewards of its samples; pairs expected (hand-counted, max_per_prompt=2):
#: 0: 1 pass x 2 fail = 2 combos -> 2 (held out: 0 % 3 == 0); 1, 2: all pass / all fail -> 0;
#: 3: 1 x 1 -> 1 (held out); 4: 2 x 1 -> 2 (train); 5: 1 x 1 -> 1 (train); 7: 0.5 passes -> 1 (train)
REWARDS = {0: [1.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0], 3: [0.0, 1.0],
           4: [1.0, 0.0, 1.0], 5: [1.0, 0.2], 7: [0.5, 0.49]}
ROWS = [_sample(p, c, r) for p, rewards in REWARDS.items() for c, r in enumerate(rewards)]


def test_pairs_pass_over_fail_per_prompt_and_held_out_prompts_are_never_trained_on():
    train, held_out = verified_pairs(ROWS)
    assert sorted(p["prompt_index"] for p in train) == [4, 4, 5, 7]
    assert sorted(p["prompt_index"] for p in held_out) == [0, 0, 3]
    for pair in train + held_out:
        assert pair["chosen_reward"] >= 0.5 > pair["rejected_reward"]
        assert pair["rejected_kind"] == ON_POLICY_KIND and pair["kind"] == "add"
        index = pair["prompt_index"]
        assert pair["prompt"] == ROWS[[r["prompt_index"] for r in ROWS].index(index)]["prompt"]
        assert pair["chosen"][0]["content"].startswith(f"p{index} ")
        assert pair["rejected"][0]["content"].startswith(f"p{index} ")
    # prompt 0's two pairs reject its two failing samples, each with the one passing sample
    zero = [p for p in held_out if p["prompt_index"] == 0]
    assert {p["chosen"][0]["content"] for p in zero} == {"p0 c0"}
    assert {p["rejected"][0]["content"] for p in zero} == {"p0 c1", "p0 c2"}
    assert verified_pairs(ROWS) == (train, held_out)  # deterministic


def test_max_per_prompt_threshold_and_holdout_options():
    train, held_out = verified_pairs(ROWS, max_per_prompt=1)
    assert sorted(p["prompt_index"] for p in train) == [4, 5, 7]
    assert sorted(p["prompt_index"] for p in held_out) == [0, 3]
    train, _ = verified_pairs(ROWS, min_reward=0.6)  # 7's 0.5 no longer passes; 5's 0.2 still fails
    assert sorted(p["prompt_index"] for p in train) == [4, 4, 5]
    train, held_out = verified_pairs(ROWS, holdout_every=2)  # even prompts held out
    assert sorted(p["prompt_index"] for p in held_out) == [0, 0, 4, 4]
    assert sorted(p["prompt_index"] for p in train) == [3, 5, 7]


def test_bad_rows_and_options_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"sample row 2: missing field\(s\) reward"):
        verified_pairs([ROWS[0], {k: v for k, v in ROWS[1].items() if k != "reward"}])
    with pytest.raises(ConfigError, match="holdout_every"):
        verified_pairs(ROWS, holdout_every=1)
    with pytest.raises(ConfigError, match="max_per_prompt"):
        verified_pairs(ROWS, max_per_prompt=0)
    samples = tmp_path / "all.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in ROWS if r["prompt_index"] != 0
                               and r["prompt_index"] != 3))
    assert write_verified_pairs(samples, tmp_path / "out") is None  # no held-out pair: caller falls back
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({k: v for k, v in ROWS[0].items() if k != "prompt"}) + "\n")
    with pytest.raises(ConfigError, match=rf"^{broken} row 1: missing field\(s\) prompt"):
        write_verified_pairs(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bad_sample_is_named_by_its_line_in_the_file(tmp_path):
    """Blank lines count, as an editor shows them: the 3rd sample, on line 5, is `row 5`; a field
    another row has reads as null in a Dataset row and is still missing."""
    samples = tmp_path / "all.jsonl"
    bad = {k: v for k, v in ROWS[2].items() if k != "completion"}
    samples.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n\n"
                       + json.dumps(bad) + "\n" + json.dumps(ROWS[3]) + "\n")
    with pytest.raises(ConfigError, match=rf"^{samples} row 5: missing field\(s\) completion \("):
        write_verified_pairs(samples, tmp_path / "out")
    from rlhf_plugins.errors import DataError
    from rlhf_plugins.stages.kto.data import write_labelled_samples

    with pytest.raises(DataError, match=rf"^{samples} row 5: missing field\(s\) completion \("):
        write_labelled_samples(samples, tmp_path / "out")


def test_samples_read_from_a_file_give_the_pairs_of_the_rows_in_memory(tmp_path):
    """The file goes through `datasets` (Arrow, memory-mapped): same pairs as the list of rows,
    an ungraded sample (reward null) is left out, and no pair gains a column it lacked."""
    rows = [dict(r) for r in ROWS]
    rows[0] = {**rows[0], "uid": "u0"}  # one row's extra column is null in every other Dataset row
    ungraded = {**rows[1], "completion_index": 9, "reward": None}
    samples = tmp_path / "all.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows + [ungraded]))
    paths = write_verified_pairs(samples, tmp_path / "out")
    expected_train, expected_held = verified_pairs(rows)
    got = [[json.loads(line) for line in Path(paths[k]).read_text().splitlines()]
           for k in ("pairs_train", "pairs_eval")]
    assert got == [expected_train, expected_held]
    assert "uid" not in got[0][0] and got[1][0]["uid"] == "u0"  # prompt 0's pairs are held out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("pairs-model"))


def test_reward_model_stage_trains_on_rejection_samplings_pairs_when_it_runs_first(tmp_path, tiny_dir):
    from rlhf_plugins.stages.pipeline import Pipeline, StageRecord, load_pipeline_config

    order = ["sft", "rejection_sampling", "reward_model", "ppo"]
    config = tiny_config(tiny_dir, tmp_path / "run", stages=order)
    pipeline = Pipeline(load_pipeline_config(config), config_label="test")
    pipeline.validate()  # every section checked with the on-policy pairs as the RM's data
    ctx = pipeline.context("reward_model", "<policy>", validating=True)
    data, _, _ = pipeline.parse_section("reward_model", ctx)
    assert (data["dataset"], data["eval_dataset"]) == ("<on-policy pairs>", "<held-out on-policy pairs>")
    default = Pipeline(load_pipeline_config(tiny_config(tiny_dir, tmp_path / "default")))
    default.validate()
    ctx = default.context("reward_model", "<p>", validating=True)
    assert default.parse_section("reward_model", ctx)[0]["dataset"] == "<preference data>"

    pipeline.paths = pipeline.write_data()
    samples = tmp_path / "all.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pipeline.records["rejection_sampling"] = StageRecord(
        "rejection_sampling", "h", {"policy": str(tiny_dir), "samples": str(samples)})
    record = pipeline.run_stage("reward_model", str(tiny_dir), "h")
    train = Path(pipeline.paths["pairs_train"])
    assert train.parent == tmp_path / "run" / "data"
    assert [json.loads(line) for line in train.read_text().splitlines()] == verified_pairs(ROWS)[0]
    metrics = json.loads((Path(record.outputs["reward_model"]) / "rm_metrics.json").read_text())
    assert metrics["heldout"]["pairs"] == 3  # prompts 0 and 3 (num_eval_examples 4 >= 3)
    assert f"pairwise_accuracy/{ON_POLICY_KIND}" in metrics["heldout"]
    assert metrics["heldout_before"]["pairs"] == 3
    assert metrics["heldout_before"]["tied_pairs"] == 3  # the zero head scores every completion 0
