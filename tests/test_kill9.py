"""kill -9 at a chosen point of every stage, then a rerun: the same final state as a run that was
never interrupted (same steps, complete files, no duplicate rows); a write that fails (disk full)
leaves the previous complete file in place.

The kill is deterministic: `tests/kill_driver.py` patches one function of the running CLI to
SIGKILL the process at its n-th call (a checkpoint just written, a file about to be renamed into
place). The fast cases (the atomic writers, disk full) run in the quick suite; the stage runs
(several CLI processes each) are marked slow. The pipeline also keeps its timed kill test
(mid-training, then a rerun) in tests/test_pipeline.py.
"""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_bad_inputs import GOOD_ROWS, quiet_env, run_main, write_jsonl, write_yaml
from rlhf_plugins import cache

DRIVER = Path(__file__).with_name("kill_driver.py")


def cli(spec: dict, *argv, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, SIGKILLed where `spec` says ({}: not at all)."""
    return subprocess.run([sys.executable, str(DRIVER), json.dumps(spec), *map(str, argv)],
                          env=quiet_env(), capture_output=True, text=True, timeout=timeout)


def killed(spec: dict, *argv) -> None:
    proc = cli(spec, *argv)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def finished(*argv) -> subprocess.CompletedProcess:
    proc = cli({}, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def files(folder: Path) -> set[str]:
    """Relative paths of every file under `folder` (no temp files: names starting with '.')."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def no_temp_files(folder: Path) -> None:
    stale = [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not stale, stale


def train_steps(metrics: dict) -> list[int]:
    return [e["step"] for e in metrics["log_history"] if "loss" in e]


# --------------------------------------------------------------------------------------------
# The atomic writers (quick): kill -9 before the rename, and disk full
# --------------------------------------------------------------------------------------------

WRITER = """
import json, os, signal, sys
from pathlib import Path
from rlhf_plugins import cache
path = Path(sys.argv[1])
real = os.replace
def replace(src, dst):
    if str(dst) == str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # the new file is written and fsynced, not renamed
    return real(src, dst)
cache.os.replace = replace
{call}
"""


@pytest.mark.parametrize("call", [
    "cache.atomic_write_json(path, {'rows': list(range(1000))})",
    "cache.atomic_write_jsonl(path, [{'i': i} for i in range(1000)])",
    "cache.atomic_write_text(path, 'new ' * 1000)",
], ids=["json", "jsonl", "text"])
def test_kill_9_inside_an_atomic_write_keeps_the_previous_file(tmp_path, call):
    path = tmp_path / "out.json"
    cache.atomic_write_json(path, {"rows": [1, 2, 3]})
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", WRITER.format(call=call), str(path)],
                          env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before  # the previous complete file, never half of the new one
    leftovers = list(tmp_path.glob(".out.json.*.tmp"))
    assert len(leftovers) == 1  # the killed writer's temp file, never read as the file itself
    cache.atomic_write_json(path, {"rows": [4]})  # the next write publishes a complete file
    assert json.loads(path.read_text()) == {"rows": [4]}


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.handle.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False


@pytest.fixture
def full_disk(monkeypatch):
    """Every file the atomic writers open holds at most 64 bytes."""
    real = cache.os.fdopen

    def fdopen(fd, *args, **kwargs):
        return _FullDisk(real(fd, *args, **kwargs), 64)

    monkeypatch.setattr(cache.os, "fdopen", fdopen)


@pytest.mark.parametrize("write", [
    lambda p: cache.atomic_write_json(p, {"x": "y" * 500}),
    lambda p: cache.atomic_write_jsonl(p, [{"i": i} for i in range(100)]),
    lambda p: cache.atomic_write_lines(p, (f"line {i}\n" for i in range(100))),
    lambda p: cache.JsonCache(p.parent).put("chunk", "k", {"completions": ["x" * 500]}),
], ids=["json", "jsonl", "lines", "cache-entry"])
def test_disk_full_keeps_the_previous_complete_file(tmp_path, full_disk, write):
    target = tmp_path / "chunk-k.json"  # JsonCache names its entries <name>-<key>.json
    target.write_text('{"previous": "complete"}\n')
    with pytest.raises(OSError) as info:
        write(target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == '{"previous": "complete"}\n'
    assert list(tmp_path.glob(".*")) == []  # the partial temp file is removed


def test_disk_full_while_building_a_directory_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "merged"
    cache.atomic_write_dir(folder, lambda d: (d / "model.safetensors").write_text("old weights"))

    def fill(d: Path) -> None:
        (d / "model.safetensors").write_text("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        cache.atomic_write_dir(folder, fill)
    assert (folder / "model.safetensors").read_text() == "old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_stale_temp_folders_of_a_killed_directory_write_are_removed(tmp_path):
    (tmp_path / ".merged.abc.tmp").mkdir()
    (tmp_path / ".merged.abc.tmp" / "model.safetensors").write_text("x" * 100)
    (tmp_path / ".merged.def.old").mkdir()
    cache.atomic_write_dir(tmp_path / "merged", lambda d: (d / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_disk_full_in_a_cli_run_is_one_line(tmp_path, full_disk):
    code, _, err = run_main(["data", "synth", "--out", tmp_path / "data", "--n", "4"])
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-plugins: error: ")
    assert "No space left on device" in lines[0] and str(tmp_path / "data") in lines[0]
    assert not [p for p in (tmp_path / "data").iterdir() if p.is_file()]  # nothing half-written


# --------------------------------------------------------------------------------------------
# Every stage (slow: several CLI processes each)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rlhf_plugins.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("kill9-model") / "tiny")


def _training_config(tmp_path, tiny_dir, out, **extra):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS * 4)
    return write_yaml(tmp_path / "c.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 6,
        "per_device_train_batch_size": 2, "report_to": "none", "logging_steps": 1,
        "save_strategy": "steps", "save_steps": 2, "lora": {"r": 2, "alpha": 4}, "seed": 0, **extra})


@pytest.mark.slow
def test_sft_killed_while_writing_a_checkpoint(tmp_path, tiny_dir):
    """Killed inside the 2nd checkpoint save (weights written, trainer state not): the rerun
    skips that torn checkpoint, resumes from checkpoint-2 and ends at step 6, steps 1..6 once."""
    out = tmp_path / "out"
    cfg = _training_config(tmp_path, tiny_dir, out)
    killed({"target": "transformers.trainer_callback:TrainerState.save_to_json", "nth": 2,
            "when": "before"}, "sft", "--config", cfg)
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "sft_metrics.json").exists()
    finished("sft", "--config", cfg)
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["global_step"] == 6 and train_steps(metrics) == [1, 2, 3, 4, 5, 6]
    clean = tmp_path / "clean"
    finished("sft", "--config", cfg, "--output-dir", clean)
    reference = json.loads((clean / "sft_metrics.json").read_text())
    assert [e["loss"] for e in metrics["log_history"] if "loss" in e] == pytest.approx(
        [e["loss"] for e in reference["log_history"] if "loss" in e], rel=1e-4)
    assert {f for f in files(out) if not f.startswith("checkpoint-")} == \
        {f for f in files(clean) if not f.startswith("checkpoint-")}
    no_temp_files(out)


@pytest.mark.slow
def test_sft_killed_while_publishing_the_merged_model(tmp_path, tiny_dir):
    """Killed after the merged model is written but before it is renamed into place: the rerun
    merges again; `merged/` is complete (the files of an uninterrupted run) and holds exactly the
    base model plus the trained adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlhf_plugins.models import load_causal_lm

    out = tmp_path / "out"
    cfg = _training_config(tmp_path, tiny_dir, out, merge=True)
    killed({"target": "rlhf_plugins.cache:os.replace", "match": "merged'", "nth": 1,
            "when": "before"}, "sft", "--config", cfg)
    assert not (out / "merged").exists() and list(out.glob(".merged.*.tmp"))
    finished("sft", "--config", cfg)
    clean = tmp_path / "clean"
    finished("sft", "--config", cfg, "--output-dir", clean)
    assert files(out / "merged") == files(clean / "merged")
    merged = load_file(out / "merged" / "model.safetensors")
    expected = PeftModel.from_pretrained(load_causal_lm(str(tiny_dir)), str(out)).merge_and_unload()
    reference = {k: v for k, v in expected.state_dict().items() if k in merged}
    assert set(reference) == set(merged)
    for key, value in merged.items():
        assert (value.float() - reference[key].float()).abs().max() <= 1e-6, key
    no_temp_files(out)


@pytest.mark.slow
def test_reward_model_killed_after_a_checkpoint(tmp_path, tiny_dir):
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.",
              "rejected": f"The answer is {i + 2}."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rm.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 6,
        "per_device_train_batch_size": 2, "report_to": "none", "logging_steps": 1,
        "save_strategy": "steps", "save_steps": 2, "lora": {"r": 2, "alpha": 4}, "seed": 0,
        "eval_strategy": "no"})
    killed({"target": "rlhf_plugins.stages.reward_model.trainer:RewardHeadTrainer._save_checkpoint",
            "nth": 2, "when": "after"}, "rm", "--config", cfg)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / "rm_metrics.json").exists()
    finished("rm", "--config", cfg)
    metrics = json.loads((out / "rm_metrics.json").read_text())
    assert train_steps(metrics) == [1, 2, 3, 4, 5, 6]
    clean = tmp_path / "clean"
    finished("rm", "--config", cfg, "--output-dir", clean)
    assert {f for f in files(out) if not f.startswith("checkpoint-")} == \
        {f for f in files(clean) if not f.startswith("checkpoint-")}
    no_temp_files(out)


@pytest.mark.slow
def test_ppo_killed_after_a_checkpoint(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"prompt": [{"role": "user", "content": f"Count to {i}"}]} for i in range(8)])
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "ppo.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 4,
        "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4,
        "reward_functions": ["length_penalty"], "report_to": "none", "logging_steps": 1,
        "save_strategy": "steps", "save_steps": 2, "lora": {"r": 2, "alpha": 4}, "seed": 0})
    killed({"target": "rlhf_plugins.stages.ppo.trainer:PolicyOptimizationTrainer._save_checkpoint",
            "nth": 1, "when": "after"}, "ppo", "--config", cfg)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "ppo_metrics.json").exists()
    finished("ppo", "--config", cfg)
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert metrics["global_step"] == 4
    steps = [e["step"] for e in metrics["log_history"] if "reward" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # no step logged twice
    no_temp_files(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage, trainer", [
    ("dpo", "rlhf_plugins.stages.dpo.trainer:PluginDPOTrainer._save_checkpoint"),
    ("kto", "rlhf_plugins.stages.kto.trainer:PluginKTOTrainer._save_checkpoint"),
])
def test_direct_alignment_killed_after_a_checkpoint(tmp_path, tiny_dir, stage, trainer):
    """Killed right after checkpoint-4: the rerun resumes there and ends at step 6, steps 1..6
    logged once, with the files of an uninterrupted run."""
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.",
              "rejected": f"The answer is {i + 2}."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / f"{stage}.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "output_dir": str(out), "max_steps": 6,
        "per_device_train_batch_size": 2, "report_to": "none", "logging_steps": 1,
        "save_strategy": "steps", "save_steps": 2, "lora": {"r": 2, "alpha": 4}, "seed": 0,
        "eval_before": False})
    killed({"target": trainer, "nth": 2, "when": "after"}, stage, "--config", cfg)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / f"{stage}_metrics.json").exists()
    finished(stage, "--config", cfg)
    metrics = json.loads((out / f"{stage}_metrics.json").read_text())
    assert metrics["global_step"] == 6 and train_steps(metrics) == [1, 2, 3, 4, 5, 6]
    clean = tmp_path / "clean"
    finished(stage, "--config", cfg, "--output-dir", clean)
    reference = json.loads((clean / f"{stage}_metrics.json").read_text())
    assert [e["loss"] for e in metrics["log_history"] if "loss" in e] == pytest.approx(
        [e["loss"] for e in reference["log_history"] if "loss" in e], rel=1e-4)
    assert {f for f in files(out) if not f.startswith("checkpoint-")} == \
        {f for f in files(clean) if not f.startswith("checkpoint-")}
    no_temp_files(out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_rejection_sampling_killed_after_a_cached_chunk_and_while_writing(tmp_path, tiny_dir):
    out, clean = tmp_path / "out", tmp_path / "clean"
    cfg = write_yaml(tmp_path / "rs.yaml", {
        "model": str(tiny_dir), "output_dir": str(out), "num_prompts": 6, "num_samples": 2,
        "max_new_tokens": 6, "chunk_size": 1, "batch_size": 2, "temperature": 1.0, "seed": 3,
        "reward_functions": [{"name": "length_penalty", "target": 4}],
        "selection": "top_per_prompt"})
    killed({"target": "rlhf_plugins.cache:JsonCache.put", "nth": 3, "when": "after"},
           "sample", "--config", cfg)
    assert not (out / "summary.json").exists()
    cached = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "cache").glob("*.json")}
    assert len(cached) == 3
    # second kill: every chunk cached, killed as selected.jsonl is about to be published
    killed({"target": "rlhf_plugins.cache:os.replace", "match": "selected.jsonl'", "nth": 1,
            "when": "before"}, "sample", "--config", cfg)
    assert not (out / "summary.json").exists() and not (out / "selected.jsonl").exists()
    finished("sample", "--config", cfg)
    finished("sample", "--config", cfg, "--output-dir", clean)
    for name in ("all.jsonl", "selected.jsonl"):
        rows = _rows(out / name)
        assert rows == _rows(clean / name)
        keys = [(r["prompt_index"], r["completion_index"]) for r in rows]
        assert len(keys) == len(set(keys))  # no duplicate rows
    assert len(_rows(out / "all.jsonl")) == 12
    for name, stamp in cached.items():  # chunks finished before the kill were not redone
        p = out / "cache" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    no_temp_files(out)


@pytest.mark.slow
def test_pipeline_killed_while_writing_the_report(tmp_path, tiny_dir):
    """Killed as report.md is renamed into place: the rerun skips every finished stage and
    writes the complete report; the stages' numbers are those of the first run."""
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {
        "model": str(tiny_dir), "output_dir": str(out), "stages": ["sft"], "template": "chatml",
        "task": {"n_train": 8, "n_eval": 2}, "eval": {"max_new_tokens": 4, "batch_size": 2},
        "lora": {"r": 2, "alpha": 4}, "sft": {"max_steps": 2, "per_device_train_batch_size": 2,
                                              "report_to": "none", "save_strategy": "no"}})
    killed({"target": "rlhf_plugins.cache:os.replace", "match": "report.md'", "nth": 1,
            "when": "before"}, "pipeline", cfg)
    assert (out / "sft" / "stage_done.json").is_file() and not (out / "report.md").exists()
    first = json.loads((out / "sft" / "stage_done.json").read_text())
    finished("pipeline", cfg)
    report = (out / "report.md").read_text()
    assert report.startswith("# rlhf-plugins pipeline report") and "## Plugin versions" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["sft"]["skipped"] is True
    assert summary["stages"]["sft"]["log_history"] == first["log_history"]
    assert summary["stages"]["sft"]["metrics"]["global_step"] == 2
    no_temp_files(out)
