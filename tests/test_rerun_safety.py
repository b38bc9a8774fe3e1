"""Rerunning a stage is safe, and nothing the project did not write is deleted (issue 29).

For every stage command (sft, rm, ppo, sample, dpo, kto) and the pipeline:
- an output folder holding entries no record of ours claims is one error line (exit 2) naming
  them, before any model loads, the folder untouched; `--overwrite` replaces them;
- a second run of a finished config prints one line, exits 0, loads no model, runs no trainer
  and leaves every file byte-identical; `--overwrite` retrains;
- a finished folder lists the entries it left: a file dropped into it later is not ours, so a
  changed config (which would clear the folder) stops with an error naming it.
"""
from __future__ import annotations

import contextlib
import json

import pytest

pytest.importorskip("torch")

from helpers_bad_inputs import (FAST, GOOD_ROWS, cli_error, run_main, snapshot,  # noqa: E402
                                write_jsonl, write_yaml)
from rlhf_plugins.testing import tiny_model_dir  # noqa: E402

PROMPTS = [{"prompt": "What is 2 + 2?"}, {"prompt": "Say hi"}, {"prompt": "Name a colour"},
           {"prompt": "Count to three"}]
PAIRS = [{"prompt": p["prompt"], "chosen": "A fine answer.", "rejected": "No."} for p in PROMPTS]
#: cheap configs of each stage command (the data file is added by `_config`)
CONFIGS = {
    "sft": ({"max_steps": 1, **FAST}, GOOD_ROWS * 2),
    "rm": ({"max_steps": 1, **FAST}, PAIRS),
    "ppo": ({"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
             "max_completion_length": 4, "reward_functions": ["length_penalty"], **FAST}, PROMPTS),
    "sample": ({"num_samples": 2, "max_new_tokens": 4, "reward_functions": ["length_penalty"]},
               PROMPTS),
    "dpo": ({"max_steps": 1, "per_device_train_batch_size": 2, "lora": {"r": 2, "alpha": 4},
             **FAST}, PAIRS),
    "kto": ({"max_steps": 1, "per_device_train_batch_size": 2, "lora": {"r": 2, "alpha": 4},
             **FAST}, [{"prompt": p["prompt"], "completion": c, "label": good}
                       for p in PROMPTS for c, good in (("A fine answer.", True), ("No.", False))]),
}
#: a changed field of each command's config (`--set`)
CHANGED = {"sft": "max_steps=2", "rm": "max_steps=2", "ppo": "max_steps=2", "sample": "num_samples=3",
           "dpo": "max_steps=2", "kto": "max_steps=2"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("rerun-model") / "tiny")


def _config(tmp_path, tiny_dir, command):
    settings, rows = CONFIGS[command]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / f"{command}.yaml", {"model": str(tiny_dir), "dataset": str(data),
                                                    "output_dir": str(out), **settings})
    return [command, "--config", str(cfg)], out


@pytest.fixture
def work(monkeypatch):
    """Counts of the heavy calls: trainer runs (`Trainer.train`) and sampling generations."""
    import transformers

    from rlhf_plugins.stages.rejection_sampling.sampler import SamplingRun

    counts = {"train": 0, "generate": 0}

    def counted(key, original):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(transformers.Trainer, "train", counted("train", transformers.Trainer.train))
    monkeypatch.setattr(SamplingRun, "generate", counted("generate", SamplingRun.generate))
    return counts


@pytest.fixture
def no_model():
    """A context in which loading any model or tokenizer fails the run (it must not happen)."""
    from rlhf_plugins import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    @contextlib.contextmanager
    def context():
        with pytest.MonkeyPatch.context() as patch:
            for name in ("load_tokenizer", "load_causal_lm", "load_peft_model"):
                patch.setattr(models, name, refuse)
            yield
    return context


def _work_done(command, counts):
    return counts["generate"] if command == "sample" else counts["train"]


@pytest.mark.parametrize("command", list(CONFIGS))
def test_unrecorded_files_rerun_and_overwrite(command, tmp_path, tiny_dir, work, no_model):
    argv, out = _config(tmp_path, tiny_dir, command)
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (out / "notes.txt").write_text("mine")

    with no_model():  # refused before any model or tokenizer loads
        cli_error(argv, f"output_dir: {out} holds 2 entries that no run of rlhf-plugins recorded: "
                        "checkpoint-3, notes.txt", "--overwrite", untouched=[out])

    code, _, err = run_main([*argv, "--overwrite"])  # replaces them, trains from step 0
    assert code == 0, err[-3000:]
    assert not (out / "notes.txt").exists() and not (out / "checkpoint-3").exists()
    assert _work_done(command, work) == 1
    record = json.loads((out / "rlhf_plugins_run.json").read_text())
    assert record["finished"] is True and "rlhf_plugins_run.json" in record["entries"]
    finished = snapshot(out)

    with no_model():
        code, stdout, err = run_main(argv)  # the same config again: nothing to do
        assert code == 0, err[-3000:]
        assert stdout.splitlines() == [f"{command}: {out} already holds a finished run of this "
                                       "config; nothing to do (--overwrite retrains)"]
        assert _work_done(command, work) == 1  # no trainer step, no generation
        assert snapshot(out) == finished  # byte-identical

        (out / "notes.txt").write_text("mine")  # dropped into the finished folder later
        changed = [*argv, "--set", CHANGED[command]]  # would clear the folder: refused
        cli_error(changed, "holds 1 entry that no run of rlhf-plugins recorded: notes.txt",
                  untouched=[out])


@pytest.mark.parametrize("command", ["sft", "sample"])
def test_overwrite_retrains_a_finished_run(command, tmp_path, tiny_dir, work):
    argv, out = _config(tmp_path, tiny_dir, command)
    assert run_main(argv)[0] == 0 and _work_done(command, work) == 1
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main([*argv, "--overwrite"])
    assert code == 0, err[-3000:]
    assert _work_done(command, work) == 2 and not (out / "notes.txt").exists()
    assert json.loads((out / "rlhf_plugins_run.json").read_text())["finished"] is True


def test_a_changed_config_clears_a_folder_that_is_all_ours(tmp_path, tiny_dir, work):
    argv, out = _config(tmp_path, tiny_dir, "sft")
    assert run_main([*argv, "--set", "save_strategy=steps", "--set", "save_steps=1"])[0] == 0
    assert (out / "checkpoint-1").is_dir()
    code, _, err = run_main(argv)  # another config: the old checkpoints are ours, cleared
    assert code == 0, err[-3000:]
    assert not (out / "checkpoint-1").exists() and work["train"] == 2


def test_overwrite_refuses_to_empty_the_working_directory(tmp_path, tiny_dir, monkeypatch):
    argv, _ = _config(tmp_path, tiny_dir, "sft")
    monkeypatch.chdir(tmp_path)
    cli_error([*argv, "--output-dir", str(tmp_path), "--overwrite"],
              "overwrite would empty", "working directory", untouched=[tmp_path / "data.jsonl"])


# --- the pipeline -------------------------------------------------------------------------------

def _pipeline_config(tmp_path, tiny_dir, max_steps=1):
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "pipeline.yaml", {
        "model": str(tiny_dir), "output_dir": str(run), "stages": ["sft"],
        "task": {"n_train": 8, "n_eval": 2}, "eval": {"max_new_tokens": 4, "batch_size": 2},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "sft": {"max_steps": max_steps, **FAST}})
    return ["pipeline", str(cfg)], run


def test_pipeline_never_clears_a_stage_folder_it_did_not_write(tmp_path, tiny_dir, work):
    argv, run = _pipeline_config(tmp_path, tiny_dir)
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "notes.txt").write_text("mine")
    cli_error(argv, f"sft: {run / 'sft'} holds 1 entry that no run of rlhf-plugins recorded: "
                    "notes.txt", untouched=[run])  # before the data is written or a model loads
    code, _, err = run_main([*argv, "--overwrite"])
    assert code == 0, err[-3000:]
    assert not (run / "sft" / "notes.txt").exists() and work["train"] == 1
    done = json.loads((run / "sft" / "stage_done.json").read_text())
    assert "adapter_model.safetensors" in done["entries"]

    (run / "sft" / "notes.txt").write_text("mine")  # dropped into the finished stage's folder
    changed, _ = _pipeline_config(tmp_path, tiny_dir, max_steps=2)
    cli_error(changed, "notes.txt", untouched=[run / "sft"])
    (run / "sft" / "notes.txt").unlink()
    code, _, err = run_main(changed)  # all ours: the changed stage's folder is cleared and rerun
    assert code == 0, err[-3000:]
    assert work["train"] == 2
    assert json.loads((run / "sft" / "sft_metrics.json").read_text())["global_step"] == 2


def test_overwrite_refuses_to_empty_a_folder_holding_an_input(tmp_path, tiny_dir):
    argv, _ = _config(tmp_path, tiny_dir, "sft")
    cli_error([*argv, "--output-dir", str(tmp_path), "--overwrite"],
              "overwrite would empty", "data.jsonl, an input of this run",
              untouched=[tmp_path / "data.jsonl"])


def test_what_a_record_claims(tmp_path):
    """The rule, file by file: no record claims nothing; an unfinished run's record claims the
    whole folder; a finished run's record claims the entries it lists (and the records)."""
    from rlhf_plugins.stages.resume import unclaimed_entries

    folder = tmp_path / "out"
    assert unclaimed_entries(folder) == []  # no folder
    folder.mkdir()
    (folder / "checkpoint-2").mkdir()
    (folder / "notes.txt").write_text("mine")
    assert unclaimed_entries(folder) == ["checkpoint-2", "notes.txt"]
    (folder / "rlhf_plugins_run.json").write_text("not json")  # not a record of ours
    assert unclaimed_entries(folder) == ["checkpoint-2", "notes.txt", "rlhf_plugins_run.json"]
    (folder / "rlhf_plugins_run.json").write_text('{"stage": "sft", "hash": "h"}')
    assert unclaimed_entries(folder) == []  # a run in progress: all of it appeared after
    (folder / "rlhf_plugins_run.json").write_text(json.dumps(
        {"stage": "sft", "hash": "h", "finished": True,
         "entries": ["checkpoint-2", "rlhf_plugins_run.json"]}))
    (folder / "stage_started.json").write_text('{"hash": "p"}')  # the pipeline's, kept after
    assert unclaimed_entries(folder) == ["notes.txt"]
