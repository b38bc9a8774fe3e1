"""The pipeline's validation gate: a stage's model is kept only when it earns it on validation problems."""
from __future__ import annotations

import json

import pytest

from helpers_models import make_tiny_model_dir
from test_pipeline import run_pipeline, tiny_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("gate-model"))


def test_decide_counts_right_answers_per_rule():
    from rlhf_plugins.stages.gate import decide

    before = [True, True, False, False, False]
    up = [True, False, True, True, False]    # 3 right vs 2: one lost, two gained
    same = [False, True, True, False, False]  # 2 vs 2
    v = decide(before, up, "better")
    assert v["kept"] and (v["gained"], v["lost"]) == (2, 1)
    assert v["difference"] == pytest.approx(0.2) and v["incumbent_accuracy"] == pytest.approx(0.4)
    assert v["candidate_accuracy"] == pytest.approx(0.6) and v["n"] == 5
    assert not decide(before, same, "better")["kept"]    # a tie is not better
    assert decide(before, same, "not_worse")["kept"]     # but it is not worse
    assert not decide(up, before, "not_worse")["kept"]
    # `significant`: more right *and* the paired bootstrap interval above zero
    assert not decide(before, up, "significant")["kept"]  # +0.2 on 5 problems: interval spans zero
    many_before = [False] * 40 + [True] * 60
    many_after = [True] * 30 + [False] * 10 + [True] * 60  # 30 gained, none lost
    strong = decide(many_before, many_after, "significant")
    assert strong["kept"] and strong["ci_low"] > 0
    weak = many_after[:2] + many_before[2:]  # 2 gained of 100: more, but not clearly
    assert decide(many_before, weak, "better")["kept"] and not decide(many_before, weak, "significant")["kept"]
    with pytest.raises(ValueError, match="same problems"):
        decide(before, up[:4], "better")


@pytest.mark.parametrize("gate, task, message", [
    ({"stages": ["pop"]}, {}, "unknown stage 'pop'"),
    ({"stages": ["reward_model"]}, {}, "trains no policy"),
    ({"stages": ["sft"]}, {"eval_split": "validation"}, "must be the test split"),
    ({"stages": ["sft"], "rule": "best"}, {}, "gate.rule: expected one of"),
    ({"stages": ["sft"], "n_problems": 0}, {}, "gate.n_problems"),
])
def test_gate_config_errors_name_the_field(tmp_path, gate, task, message):
    from rlhf_plugins.errors import ConfigError
    from rlhf_plugins.stages.pipeline import load_pipeline_config

    config = tiny_config(tmp_path / "model", tmp_path / "run", stages=["sft", "reward_model"], gate=gate)
    config["task"] = {**config["task"], **task}
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(config)


def test_a_stage_that_does_not_beat_its_start_on_validation_is_not_kept(tmp_path, tiny_dir):
    out = tmp_path / "strict"
    gate = {"stages": ["sft"], "n_problems": 6, "rule": "better"}
    config = tiny_config(tiny_dir, out, stages=["sft", "rejection_sampling"], gate=gate)
    pipeline, report = run_pipeline(config)
    verdict = pipeline.evals["sft"]["gate"]
    # a tiny random model answers none of the problems before or after 2 SFT steps: a tie
    assert verdict["incumbent_accuracy"] == verdict["candidate_accuracy"] == 0.0 and verdict["n"] == 6
    assert not verdict["kept"] and verdict["incumbent"] == "base"
    # the gate's problems are validation problems, none of them among the evaluated test problems
    gate_rows = [json.loads(x) for x in (out / "data" / "rl_validation_gate.jsonl").read_text().splitlines()]
    test_rows = [json.loads(x) for x in (out / "data" / "rl_test.jsonl").read_text().splitlines()]
    from rlhf_plugins.data import synth

    drawn = synth.problem_rows(6, 1, "validation")  # the gate's default seed is 1
    assert [r["uid"] for r in gate_rows] == [r["uid"] for r in drawn]
    assert {r["split"] for r in drawn} == {"validation"}
    assert not {r["uid"] for r in gate_rows} & {r["uid"] for r in test_rows}
    # the pipeline went on with the base model: its held-out answers, and rejection sampling's start
    assert pipeline.evals["sft"]["correct"] == pipeline.evals["base"]["correct"]
    assert json.loads((out / "evals" / "sft.json").read_text())["result"]["gate"]["kept"] is False
    assert pipeline.records["rejection_sampling"].metrics["selected"] >= 0
    summary = json.loads((out / "rejection_sampling" / "summary.json").read_text())
    assert summary["policy"] == str(tiny_dir)
    text = report.read_text()
    assert "| base's model; sft not kept |" in text
    assert "Validation gate after sft: 0.000 vs base's 0.000 on 6 validation problems" in text
    assert "not kept" in text and (out / "evals" / "gate" / "sft.json").is_file()

    # the same tie passes `not_worse`: the SFT model is kept and evaluated on the test problems
    lenient = tiny_config(tiny_dir, tmp_path / "lenient", stages=["sft"], gate={**gate, "rule": "not_worse"})
    pipeline, report = run_pipeline(lenient)
    assert pipeline.evals["sft"]["gate"]["kept"]
    cached = json.loads((tmp_path / "lenient" / "evals" / "sft.json").read_text())
    assert cached["key"] is not None and "gate" not in cached["result"]  # a real test evaluation
    assert "| sft |" in report.read_text() and ": kept." in report.read_text()


def test_a_gated_stage_the_run_leaves_out_is_not_an_error(tmp_path):
    from rlhf_plugins.stages.pipeline import load_pipeline_config

    config = tiny_config(tmp_path / "model", tmp_path / "run", stages=["sft"], gate={"stages": ["ppo"]})
    assert load_pipeline_config(config).gate.stages == ["ppo"]  # e.g. `--stages sft` on the quickstart
