"""Smoke test of bench/gpu_qlora_ppo.py in its CPU tiny mode (issue 16, GPU readiness).

Runs the script as a user would (`--device cpu --shapes tiny`), each variant in its own child
process, and checks the results file: a row per variant, finite step times and memory for the
variants that run on a CPU, the PPO-specific parts (4-bit base, value loss, RM adapter reward)
really used, the bases/adapters/heads each variant holds, and the levers that cannot run here reported as such rather than as errors.
About 60 s on the shared 2-core VM (mostly four child processes importing torch/transformers/TRL).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_qlora_ppo.py"
RUNS_ON_CPU = ("four_bf16", "ours", "trl")


@pytest.mark.slow
def test_cpu_tiny_mode_writes_a_row_per_variant(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny", "--steps", "2",
         "--completion", "8", "--budget", "400", "--json", str(out), "--root", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_qlora_ppo as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))

    rows = {r["variant"]: r for r in report["rows"]}
    assert len(report["rows"]) == len(bench.VARIANTS) and set(rows) == set(bench.VARIANTS)
    for row in report["rows"]:
        assert set(bench.ROW_KEYS) <= set(row), row
        assert row["shape"] == "tiny" and row["device"] == "cpu"
        if row["variant"] not in RUNS_ON_CPU:  # levers: no accelerator / liger missing here
            assert row["status"] in ("ok", "not installed") or row["status"].startswith("skipped"), row
    for name in RUNS_ON_CPU:
        row = rows[name]
        assert row["status"] == "ok", row.get("stderr_tail") or row["status"]
        assert row["step_times_s"] and all(math.isfinite(t) and t > 0 for t in row["step_times_s"])
        assert math.isfinite(row["step_time_s"]) and row["step_time_s"] > 0
        assert row["peak_bytes"] > 0 and row["memory_kind"] == "cpu_peak_rss_above_imports"
        assert row["params"] == report["meta"]["made"]["tiny"]["params"] > 0
    ours, trl = rows["ours"], rows["trl"]
    assert ours["quantized_4bit"] == trl["quantized_4bit"]
    if ours["quantized_4bit"]:
        assert ours["linear4bit_modules"] == trl["linear4bit_modules"] > 0
    assert ours["loss_finite"] and trl["loss_finite"]
    assert ours["value_loss_logged"] and ours["rm_adapter_reward_logged"]  # GAE critic + RM adapter
    assert not trl["value_loss_logged"]
    assert rows["four_bf16"]["quantized_4bit"] is False
    # what each variant holds (bench.inventory: parameter bytes, each tensor once)
    params = report["meta"]["made"]["tiny"]["params"]
    four, mine, theirs = (rows[v]["inventory"] for v in ("four_bf16", "ours", "trl"))
    assert four["bases"] == {name: 2 * params for name in ("policy", "ref", "critic", "rm")}  # bf16
    assert four["adapters"] == {} and set(four["heads"]) == {"value_head", "reward_head"}
    # ours: one base; the policy adapter and the RM adapter on it; the reference is that base with
    # the adapter disabled (no copy); the value head and the RM's head
    assert set(mine["bases"]) == {"policy"} and set(mine["adapters"]) == {"default", "reward"}
    assert set(mine["heads"]) == {"policy.v_head", "reward_model.head_module"}
    # TRL: one base, the policy adapter and its "ref" copy (TRL's reference for a PeftModel), no heads
    assert set(theirs["bases"]) == {"policy"} and set(theirs["adapters"]) == {"default", "ref"}
    assert theirs["heads"] == {} and theirs["adapters"]["ref"] == theirs["adapters"]["default"]
    assert mine["bases"] == theirs["bases"] and mine["adapters"]["default"] == theirs["adapters"]["default"]
    assert all(v > 0 for inv in (four, mine, theirs) for part in inv.values() for v in part.values())
    # the markdown table: header, separator and one line per row
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(report["rows"])
