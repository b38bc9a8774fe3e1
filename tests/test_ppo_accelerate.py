"""Two CPU processes under `accelerate launch` run a few PPO (GAE + value head) steps.

accelerate 1.15's `accelerate launch --num_processes 2 --cpu` starts ONE process unless an MPI
hostfile is given (checked: the run reported world size 1), so the test launches
`accelerate launch --multi_gpu --num_processes 2` with `ACCELERATE_USE_CPU=true`: torchrun
starts two processes and accelerate runs them on CPU with the gloo backend (real DDP).

Run as a script (by the test, under accelerate) it trains on a tiny model and writes, per
rank, checksums of the trained LoRA weights and value head: DDP must keep them identical.
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


def _vowel_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    from rlhf_plugins.rewarding import completion_text

    return [float(sum(ch in "aeiou" for ch in completion_text(c)) % 4) for c in completions]


def main(model_dir: str, out_dir: str) -> None:
    """Train 3 steps of PPO on 2 CPU processes; write per-rank parameter checksums."""
    import torch

    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo

    settings = PPOSettings(model=model_dir, reward_functions=[_vowel_reward], num_examples=16,
                           advantage_estimator="gae", kl_penalty="reward", kl_target=1.0,
                           lora={"r": 4, "alpha": 8, "dropout": 0.0},
                           quantization={"load_in_4bit": True})
    trl = dict(max_steps=3, per_device_train_batch_size=4, num_generations=2,
               max_completion_length=6, gradient_checkpointing=False, logging_steps=1,
               save_strategy="no", learning_rate=5e-2, beta=0.1, seed=0)
    prepared = prepare_ppo(settings, trl, Path(out_dir) / "run")
    trainer = prepared.trainer
    trainer.train()
    rank = trainer.accelerator.process_index
    lora = sum(float(p.detach().double().sum()) for n, p in trainer.model.named_parameters() if "lora_" in n
               and ".default." in n)
    head = float(trainer.value_head.summary.weight.double().abs().sum())
    result = {"rank": rank, "world": trainer.accelerator.num_processes, "lora_sum": lora,
              "value_head_abs_sum": head, "log_history": trainer.state.log_history}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result, default=float))
    del torch


@pytest.mark.slow
def test_accelerate_two_cpu_processes_run_ppo(tmp_path):
    sys.path.insert(0, str(HERE))
    from helpers_models import make_tiny_model_dir

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    model_dir = make_tiny_model_dir(tmp_path, seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).resolve()),
           str(model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # DDP averaged the gradients: both ranks hold the same trained adapter and value head
    assert ranks[0]["lora_sum"] == pytest.approx(ranks[1]["lora_sum"], rel=1e-6, abs=1e-9)
    assert ranks[0]["value_head_abs_sum"] == pytest.approx(ranks[1]["value_head_abs_sum"], rel=1e-6)
    assert ranks[0]["value_head_abs_sum"] > 0  # the critic trained
    steps = [h for h in ranks[0]["log_history"] if "value_loss" in h]
    assert len(steps) == 3 and all("kl_coef" in h and "reward" in h for h in steps)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
