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


def test_bench_heldout_scoring_is_paired_and_runs_grpo_ppo_clip_once(tmp_path):
    """--heldout: greedy scoring on the task's test problems, paired with the starting policy;
    grpo + ppo_clip sits in both tables but is trained once."""
    bench = _bench()
    model = bench.tiny_model(tmp_path / "tiny")
    logged = []
    results = bench.run_tables(model, tiny=True, estimators=["grpo"], losses=["ppo_clip"], steps=1,
                               n_eval=2, completion_length=4, heldout=3, log=logged.append)
    est, loss = results["estimators"]["grpo"], results["policy_losses"]["ppo_clip"]
    assert est is loss and len(logged) == 3  # the starting policy's line + one per table
    start = results["start_correct"]
    assert len(start) == 3 and len(est["correct"]) == 3
    assert est["before"] == sum(start) / 3 and est["after"] == sum(est["correct"]) / 3
    assert "paired change" in bench.markdown({**results, "binary": True})
    # the paired comparison, by hand: problem 1 lost, problems 2 and 3 gained
    scorer = bench.Heldout.__new__(bench.Heldout)
    scorer.start = [True, False, False]
    row = scorer.compare([False, True, True])
    assert (row["before"], row["after"]) == (1 / 3, 2 / 3)
    assert row["paired"]["difference"] == 1 / 3
    assert (row["paired"]["gained"], row["paired"]["lost"]) == (2, 1)
