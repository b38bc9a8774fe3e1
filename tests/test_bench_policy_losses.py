"""Smoke test of bench/policy_losses_estimators.py at its tiniest sizes (tiny random model, CPU).

About 15-18 s on the shared 2-core VM (two tiny PPO runs with held-out evaluation), so not `slow`.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "policy_losses_estimators.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_policy_losses_estimators", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_one_estimator_and_one_loss_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "r.json"
    results = _bench().main(["--model", "tiny", "--estimators", "reinforce_plus_plus", "--losses", "gspo",
                             "--steps", "1", "--eval", "2", "--completion-length", "4",
                             "--json", str(out)])
    assert set(results["estimators"]) == {"reinforce_plus_plus"}
    assert set(results["policy_losses"]) == {"gspo"}
    for table in ("estimators", "policy_losses"):
        for row in results[table].values():
            assert math.isfinite(row["before"]) and math.isfinite(row["after"]) and row["train_reward"]
    assert json.loads(out.read_text())["command"].startswith("python bench/policy_losses_estimators.py")
    printed = capsys.readouterr().out
    assert "| reinforce_plus_plus |" in printed and "| gspo |" in printed
