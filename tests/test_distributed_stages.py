"""Every training stage under `accelerate launch` on 2 CPU processes: DDP over gloo.

Like tests/test_ppo_accelerate.py: `accelerate launch --multi_gpu --num_processes 2` with
``ACCELERATE_USE_CPU=true`` starts two torchrun processes that train on CPU over gloo.
Run as a script (by the tests, under accelerate) this file runs one stage's real entry point
(``<stage>_from_config``: data, trainer, save, record) on a tiny model, and each rank writes
what it saw: the logged training losses, a checksum of its trained parameters, and every file
it wrote under the output folder while the stage ran (a Python audit hook records ``open`` for
writing, renames and new folders: no file system call is replaced). The tests then check that
the processes agree (the same losses, the same trained weights) and that the artifact is one
artifact, written by the main process alone.

PPO (on a 4-bit base) and the pipeline also have their own two-process tests
(test_ppo_accelerate.py, test_pipeline.py). FSDP is not tested: accelerate 1.16 runs DDP instead
on CPU processes. What runs where, and what was never run: docs/scaling.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
FAST = {"report_to": "none", "logging_steps": 1, "save_strategy": "no", "seed": 0,
        "max_steps": 2, "per_device_train_batch_size": 2}
#: stage -> (module, prepare function, entry point, config)
STAGES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "sft": ("rlhf_plugins.stages.sft.train", "prepare_sft", "sft_from_config",
            {"num_examples": 8, "lora": LORA, **FAST}),
    "rm": ("rlhf_plugins.stages.reward_model.train", "prepare_rm", "rm_from_config",
           {"num_examples": 8, "lora": LORA, **FAST}),
    "dpo": ("rlhf_plugins.stages.dpo.run", "prepare_dpo", "dpo_from_config",
            {"num_examples": 8, "lora": LORA, **FAST}),
    "kto": ("rlhf_plugins.stages.kto.run", "prepare_kto", "kto_from_config",
            {"num_examples": 8, "lora": LORA, **FAST}),
    "ppo": ("rlhf_plugins.stages.ppo.train", "prepare_ppo", "ppo_from_config",
            {"num_examples": 8, "lora": LORA, "reward_functions": ["length_penalty"],
             "advantage_estimator": "gae", "eval_before": False, "num_generations": 2,
             "max_completion_length": 6, "learning_rate": 5e-2, **FAST}),
}


class WriteRecorder:
    """Paths under `root` this process opened for writing, renamed to or created (audit hook)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.paths: set[str] = set()
        self.active = True
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        elif event in ("os.rename", "os.mkdir"):
            path, writing = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return
        try:
            rel = Path(os.fsdecode(path)).resolve().relative_to(self.root)
        except ValueError:
            return
        self.paths.add(rel.as_posix())


def _checksum(model: Any) -> float:
    return sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)


def run_stage(stage: str, model_dir: str, out: Path) -> tuple[Any, Any]:
    """Run one stage through its real entry point into `out`; (trainer, trained model)."""
    import importlib

    module_name, prepare_name, entry, config = STAGES[stage]
    module = importlib.import_module(module_name)
    prepared: list[Any] = []
    real_prepare = getattr(module, prepare_name)

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real function; keeps its trainer for the checks
        prepared.append(real_prepare(*args, **kwargs))
        return prepared[-1]

    setattr(module, prepare_name, spy)
    try:
        getattr(module, entry)({"model": model_dir, **config}, output_dir=out)
    finally:
        setattr(module, prepare_name, real_prepare)
    trainer = prepared[0].trainer
    return trainer, trainer.model


def main(stages: str, model_dir: str, out_dir: str) -> None:
    """Run each stage (comma-separated) on every process; write <stage>/rank{r}.json."""
    for stage in stages.split(","):
        out = Path(out_dir) / stage
        recorder = WriteRecorder(out / "run")
        trainer, model = run_stage(stage, model_dir, out / "run")
        trainer.accelerator.wait_for_everyone()
        recorder.active = False
        rank = trainer.accelerator.process_index
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        result = {"rank": rank, "world": trainer.accelerator.num_processes,
                  "distributed_type": str(trainer.accelerator.distributed_type),
                  "losses": losses, "checksum": _checksum(model), "wrote": sorted(recorder.paths)}
        (out / f"rank{rank}.json").write_text(json.dumps(result))


def launch(tmp_path: Path, stages: str, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch` this file for `stages` on 2 CPU processes."""
    sys.path.insert(0, str(HERE))
    from helpers_models import make_tiny_model_dir

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's CLI is installed with the project"
    model_dir = make_tiny_model_dir(tmp_path, seed=7)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [accelerate, "launch", *extra, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).resolve()),
           stages, str(model_dir), str(tmp_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def results(proc: subprocess.CompletedProcess, root: Path, stage: str) -> tuple[list[dict[str, Any]], Path]:
    """Both ranks' results for `stage` (a failed launch fails here, with its output)."""
    files = [root / stage / f"rank{r}.json" for r in (0, 1)]
    assert all(f.is_file() for f in files), proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(f.read_text()) for f in files], root / stage / "run"


def check_agreement(ranks: list[dict[str, Any]], steps: int = 2) -> None:
    """Both processes took part, logged the same (all-reduced) losses and hold the same weights."""
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["losses"]) == steps, ranks[0]["losses"]
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"], rel=1e-6)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6, abs=1e-9)


def check_one_artifact(ranks: list[dict[str, Any]], out: Path, artifact: str) -> None:
    """`artifact` (a file of the saved model) exists once, written by the main process alone."""
    assert (out / artifact).is_file()
    assert [p.relative_to(out).as_posix() for p in out.rglob(Path(artifact).name)] == [artifact]
    assert ranks[0]["wrote"], "the main process wrote nothing under the output folder"
    assert ranks[1]["wrote"] == [], f"process 1 wrote {ranks[1]['wrote']}"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `accelerate launch --multi_gpu` (DDP; gloo on CPU) running SFT, RM, DPO, KTO and PPO in turn."""
    root = tmp_path_factory.mktemp("ddp")
    return launch(root, ",".join(STAGES), "--multi_gpu"), root


@pytest.mark.slow
@pytest.mark.parametrize("stage, artifact", [
    ("sft", "adapter_config.json"), ("rm", "reward_model.json"),
    ("dpo", "adapter_config.json"), ("kto", "adapter_config.json"), ("ppo", "value_head.safetensors")])
def test_stage_under_ddp_on_two_cpu_processes(ddp_runs, stage, artifact):
    ranks, out = results(*ddp_runs, stage)
    # accelerate's name for DDP on CPU processes (torch DistributedDataParallel over gloo)
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    check_agreement(ranks)
    check_one_artifact(ranks, out, artifact)
    assert "rlhf_plugins_stage.json" in ranks[0]["wrote"]  # the stage record: once, by the main process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
