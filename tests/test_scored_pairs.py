"""DPO pairs from samples scored by a reward model: best vs worst per prompt, with a margin.

`scored_pairs` against hand-worked expectations, and the `dpo` stage's `pairs: reward_model`
source picking them from rejection sampling's graded samples (its `all.jsonl` rows, whose
`rewards["reward_model"]` is the reward model's score).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_bad_inputs import write_jsonl
from rlhf_plugins.data.scored_pairs import SCORED_KIND, scored_pairs
from rlhf_plugins.errors import ConfigError, DataError


def _sample(p: int, c: int, score: float | None, reward: float = 0.0) -> dict:
    rewards = {"exact_answer": reward}
    if score is not None:
        rewards["reward_model"] = score
    return {"prompt_index": p, "completion_index": c,
            "prompt": [{"role": "user", "content": f"q{p}"}],
            "completion": [{"role": "assistant", "content": f"p{p} c{c}"}],
            "reward": reward, "rewards": rewards}


#: prompt -> RM scores of its samples. By hand, with min_margin 0.5 (held out: prompt % 3 == 0):
#: 0: best c1 (2.0) vs worst c2 (-1.0), margin 3.0 -> held out;   1: margin 0.4 < 0.5 -> none;
#: 2: all tie (0.3) -> none;   3: c0 1.0 vs c1 0.0 -> held out;   4: best c2 0.9, worst c0 -0.2
#:    (c1 has no score: ignored) -> train;   5: one scored sample -> none;
#:    7: tie for best (0.8, 0.8): the first, c0; worst c2 0.1 -> train
SCORES = {0: [0.5, 2.0, -1.0], 1: [0.1, 0.5], 2: [0.3, 0.3, 0.3], 3: [1.0, 0.0],
          4: [-0.2, None, 0.9], 5: [0.7, None], 7: [0.8, 0.8, 0.1]}
ROWS = [_sample(p, c, s) for p, scores in SCORES.items() for c, s in enumerate(scores)]


def test_best_vs_worst_per_prompt_above_the_margin():
    train, held = scored_pairs(ROWS, min_margin=0.5)
    got = {(r["prompt_index"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in train}
    assert got == {(4, "p4 c2", "p4 c0"), (7, "p7 c0", "p7 c2")}
    assert {(r["prompt_index"], r["chosen_score"], r["rejected_score"]) for r in held} == {
        (0, 2.0, -1.0), (3, 1.0, 0.0)}
    assert all(r["rejected_kind"] == SCORED_KIND for r in train + held)
    # margin 0: prompt 1's 0.4 gap now counts; ties still never make a pair
    train0, _ = scored_pairs(ROWS, min_margin=0.0)
    assert {r["prompt_index"] for r in train0} == {1, 4, 7}


def test_samples_without_reward_model_scores_and_bad_options_are_one_line_errors():
    with pytest.raises(DataError, match="no sample carries a 'reward_model' score"):
        scored_pairs([_sample(0, 0, None), _sample(0, 1, None)])
    with pytest.raises(ConfigError, match="min_score_margin"):
        scored_pairs(ROWS, min_margin=-1)
    with pytest.raises(DataError, match="sample row 2: missing field"):
        scored_pairs([_sample(0, 0, 1.0), {"prompt": "x"}])


def _ctx(tmp_path: Path, section: dict):
    from rlhf_plugins.stage_api import StageContext

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "all.jsonl", ROWS)
    return StageContext(name="dpo", policy="m", samples=str(path),
                        data={"preference": "x", "preference_eval": "y"}, section=section,
                        data_dir=tmp_path / "data")


def test_dpo_stage_pairs_reward_model_source(tmp_path):
    from rlhf_plugins.stages.dpo.stage import DPOStage

    stage = DPOStage()
    ctx = _ctx(tmp_path, {"pairs": "reward_model", "min_score_margin": 0.5})
    stage.prepare(ctx)
    defaults = stage.defaults(ctx)
    train = [json.loads(x) for x in Path(defaults["dataset"]).read_text().splitlines()]
    held = [json.loads(x) for x in Path(defaults["eval_dataset"]).read_text().splitlines()]
    assert [r["prompt_index"] for r in train] == [4, 7] and [r["prompt_index"] for r in held] == [0, 3]
    # the default source is the verifier: every sample here has reward 0 -> no pair, the task's data
    ctx = _ctx(tmp_path / "v", {})
    stage.prepare(ctx)
    assert stage.defaults(ctx)["dataset"] == "x"


def test_dpo_stage_reward_model_source_without_scores_names_the_field(tmp_path):
    from rlhf_plugins.stage_api import StageContext
    from rlhf_plugins.stages.dpo.stage import DPOStage

    path = write_jsonl(tmp_path / "all.jsonl", [_sample(0, 0, None), _sample(0, 1, None)])
    ctx = StageContext(name="dpo", policy="m", samples=str(path), data={}, section={"pairs": "reward_model"},
                       data_dir=tmp_path / "data")
    with pytest.raises(DataError, match=r"^dpo\.pairs: .*all\.jsonl: no sample carries"):
        DPOStage().prepare(ctx)


def test_settings_check_pairs_and_margin():
    from rlhf_plugins.stages.dpo.settings import DPOSettings

    with pytest.raises(ConfigError, match="pairs: expected one of verified, reward_model"):
        DPOSettings(pairs="best")
    with pytest.raises(ConfigError, match="min_score_margin"):
        DPOSettings(min_score_margin=-0.1)
    assert DPOSettings(pairs="reward_model", min_score_margin=0.2).pairs == "reward_model"


def test_the_stage_record_names_what_direct_alignment_trained_on(tmp_path):
    from rlhf_plugins.stage_api import StageContext
    from rlhf_plugins.stages.dpo.stage import DPOStage, data_source

    ctx = _ctx(tmp_path, {"pairs": "reward_model", "min_score_margin": 0.5})
    DPOStage().prepare(ctx)
    assert data_source(ctx, "graded samples, reward_model pairs") == "graded samples, reward_model pairs"
    fallback = StageContext(name="dpo", policy="m", data={"preference": "x"}, section={})
    assert data_source(fallback, "graded samples") == "the task's preference pairs"
    own = StageContext(name="dpo", policy="m", data={"preference": "x"}, section={"dataset": "mine.jsonl"})
    assert data_source(own, "graded samples") == "dataset"
