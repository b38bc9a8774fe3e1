"""bench/gpu_qlora_ppo.py (issues 16, 30): the floor arithmetic, the variant checks, and a CPU tiny run.

The slow smoke test runs the script as a user would (`--device cpu --shapes tiny`), each variant
in its own child process, with 5 timed steps after one warm-up, and checks the results file: a row
per variant, what each variant holds (bases, adapters, heads), the equal set-ups, the floor and
the levers that cannot run here reported as such rather than as errors. About 2-3 minutes on the
shared 2-core VM (mostly five child processes importing torch/transformers/TRL).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "gpu_qlora_ppo.py"
RUNS_ON_CPU = ("four_bf16", "four_4bit", "ours", "trl")

# The tiny shape by hand: hidden 128, intermediate 256, 2 layers, 4 heads of 32, 2 KV heads
# (k/v out 64), vocab 1024, untied. Per layer: q, o 128x128; k, v 128x64; gate, up, down 128x256.
Q, KV, MLP = 128 * 128, 128 * 64, 128 * 256
QUANTIZED = 2 * (2 * Q + 2 * KV + 3 * MLP)  # 294,912 weights in 14 Linear4bit layers
OTHER = 2 * 1024 * 128 + 2 * 2 * 128 + 128  # embeddings + LM head, 2 norms a layer, final norm
# NF4 with double quant: n/2 bytes + 1 byte per 64-block + 4 bytes per 256 blocks
NF4 = {Q: 8192 + 256 + 4, KV: 4096 + 128 + 4, MLP: 16384 + 512 + 8}
LORA = 2 * (2 * 16 * (128 + 128) + 2 * 16 * (128 + 64) + 3 * 16 * (128 + 256))  # r=16: r*(in+out)
TRAINABLE = LORA + 128 + 1  # + value head (w, b)
HAND_FLOOR = {"linear_4bit": 2 * (2 * NF4[Q] + 2 * NF4[KV] + 3 * NF4[MLP]),
              "bf16_other": 2 * OTHER, "lora": 2 * 2 * LORA, "heads": 2 * (129 + 128),
              "gradients": 2 * TRAINABLE, "optimizer_state": 2 * 2 * TRAINABLE}


def _import(name: str):
    saved = list(sys.path)
    sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]
    try:
        return __import__(name)
    finally:
        sys.path[:] = saved


def test_floor_of_the_tiny_shape_matches_the_hand_count():
    bench, floor_mod = _import("gpu_qlora_ppo"), _import("gpu_bench_floor")
    arch, shape = bench.SHAPES["tiny"]
    got = floor_mod.floor(arch, shape, lora_r=16)
    assert QUANTIZED + OTHER == 557_696  # the tiny model's parameter count (bench meta "params")
    assert got["quantized_linears"] == 14 and got["policy_lora_params"] == LORA == 65_536
    assert got["parts"] == HAND_FLOOR
    assert got["bytes"] == sum(HAND_FLOOR.values()) == 1_334_360
    assert all(n.endswith(("_proj",)) for n in got["quantized_linear_names"])  # not lm_head
    assert floor_mod.nf4_bytes(64 * 256 + 1) == (64 * 256 + 1) // 2 + 257 + 4 * 2


def _rows() -> dict:
    setup = {"batch": 8, "prompts_per_step": 2, "generations_per_prompt": 4, "completion_tokens_min": 8,
             "completion_tokens_max": 8, "gradient_checkpointing": True, "optimizer_steps": 6,
             "timed_steps": 5, "warmup_steps": 1, "learning_rate": 1e-4}
    return {
        "ours": {"inventory": {"bases": {"policy": 10}, "adapters": {"policy.default": 2, "policy.reward": 2},
                               "heads": {"policy.v_head": 1, "reward_model.head_module": 1}},
                 "policy_lora_params": 1, "setup": dict(setup)},
        "trl": {"inventory": {"bases": {"policy": 10, "reward_model": 9}, "adapters": {"policy.default": 2},
                              "heads": {"reward_model.score": 1}},
                "policy_lora_params": 1, "setup": dict(setup)},
        "four_4bit": {"inventory": {"bases": {"policy": 10, "ref": 10, "critic": 10, "reward_model": 9},
                                    "adapters": {"policy.default": 2, "critic.default": 2},
                                    "heads": {"value_head": 1, "reward_model.score": 1}},
                      "policy_lora_params": 1, "setup": dict(setup)},
    }


def test_check_variants_passes_the_intended_differences_and_fails_the_others():
    check = _import("gpu_bench_floor").check_variants
    assert len(check(_rows())) == 6  # 3 inventories, no ref copy, same LoRA, same set-up
    broken = []
    rows = _rows()
    rows["trl"]["inventory"]["adapters"]["policy.ref"] = 2  # TRL's copy of a wrapped adapter
    broken.append(rows)
    rows = _rows()
    rows["ours"]["inventory"]["bases"]["ref"] = 10  # a second base in ours
    broken.append(rows)
    rows = _rows()
    del rows["four_4bit"]["inventory"]["bases"]["critic"]
    broken.append(rows)
    rows = _rows()
    rows["trl"]["policy_lora_params"] = 2
    broken.append(rows)
    rows = _rows()
    rows["trl"]["setup"]["completion_tokens_min"] = 5  # TRL stopped early
    broken.append(rows)
    rows = _rows()
    rows["four_4bit"]["inventory"]["bases"]["policy"] = 20  # not the same 4-bit base
    broken.append(rows)
    for rows in broken:
        with pytest.raises(AssertionError):
            check(rows)


@pytest.mark.slow
def test_cpu_tiny_mode_writes_a_row_per_variant(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny", "--steps", "5", "--warmup", "1",
         "--completion", "8", "--budget", "500", "--json", str(out), "--root", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=700, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    bench = _import("gpu_qlora_ppo")

    rows = {r["variant"]: r for r in report["rows"]}
    assert len(report["rows"]) == len(bench.VARIANTS) and set(rows) == set(bench.VARIANTS)
    made = report["meta"]["made"]["tiny"]
    assert made["params"] == QUANTIZED + OTHER and made["floor"]["bytes"] == sum(HAND_FLOOR.values())
    for row in report["rows"]:
        assert set(bench.ROW_KEYS) <= set(row), row
        assert row["shape"] == "tiny" and row["device"] == "cpu"
        if row["variant"] not in RUNS_ON_CPU:  # levers: no accelerator / liger missing here
            assert row["status"] in ("ok", "not installed") or row["status"].startswith("skipped"), row
    for name in RUNS_ON_CPU:
        row = rows[name]
        assert row["status"] == "ok", row.get("stderr_tail") or row["status"]
        assert len(row["step_times_s"]) == 5 and len(row["warmup_times_s"]) == 1
        assert all(math.isfinite(t) and t > 0 for t in row["step_times_s"])
        assert row["step_time_min_s"] == min(row["step_times_s"]) <= row["step_time_s"]
        assert row["peak_bytes"] > 0 and row["memory_kind"] == "cpu_peak_rss_above_imports"
        assert row["vs_floor"] == pytest.approx(row["peak_bytes"] / made["floor"]["bytes"])
        assert row["setup"] == rows["ours"]["setup"]
        assert row["loss_finite"]
    assert rows["ours"]["setup"]["optimizer_steps"] == 6
    setup = rows["ours"]["setup"]
    assert setup["completion_tokens_min"] == setup["completion_tokens_max"] == 8
    checks = report["checks"]["tiny"]
    assert "failed" not in checks and len(checks["passed"]) >= 7, checks
    ours, trl, four4 = rows["ours"], rows["trl"], rows["four_4bit"]
    assert ours["quantized_4bit"] and trl["quantized_4bit"] and four4["quantized_4bit"]
    assert ours["linear4bit_names"] == trl["linear4bit_names"] == made["floor"]["quantized_linear_names"]
    assert ours["value_loss_logged"] and ours["rm_adapter_reward_logged"]  # GAE critic + RM adapter
    assert not trl["value_loss_logged"] and len(trl["reward_funcs"]) == 2  # the python reward + the RM
    assert trl["ref_model"] is None  # the reference is the policy with its adapter disabled
    assert ours["policy_lora_params"] == trl["policy_lora_params"] == four4["policy_lora_params"] == LORA
    mine, theirs, four = ours["inventory"], trl["inventory"], four4["inventory"]
    assert set(mine["bases"]) == {"policy"} and set(mine["adapters"]) == {"policy.default", "policy.reward"}
    assert set(theirs["bases"]) == {"policy", "reward_model"}
    assert set(theirs["adapters"]) == {"policy.default"}
    assert set(four["bases"]) == {"policy", "ref", "critic", "reward_model"}
    assert set(four["adapters"]) == {"policy.default", "critic.default"}
    assert mine["bases"]["policy"] == theirs["bases"]["policy"] == four["bases"]["policy"]
    assert four["bases"]["policy"] == four["bases"]["ref"] == four["bases"]["critic"]
    assert theirs["bases"]["reward_model"] == four["bases"]["reward_model"]
    bf16 = rows["four_bf16"]["inventory"]
    assert bf16["adapters"] == {} and bf16["bases"]["policy"] == bf16["bases"]["ref"] == 2 * made["params"]
    assert all(v > 0 for inv in (bf16, mine, theirs, four) for part in inv.values() for v in part.values())
    # the printout: every variant's inventory, the floor, the markdown table (header, separator, rows)
    assert proc.stdout.count("  inventory ") == len(RUNS_ON_CPU) and "floor tiny:" in proc.stdout
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(report["rows"])
