"""The pipeline report: intervals up front, small-multiple curves, raw trainer metrics tucked away."""
from __future__ import annotations

from rlhf_plugins.report import accuracy_table, running_mean, write_report
from rlhf_plugins.stats import compare, wilson_interval


def _evals():
    base = [False] * 200
    sft = [i % 5 == 0 for i in range(200)]            # 40 correct
    ppo = [i % 5 == 0 or i % 7 == 1 for i in range(200)]
    return {"base": {"accuracy": 0.0, "n": 200, "correct": base},
            "sft": {"accuracy": sum(sft) / 200, "n": 200, "correct": sft},
            "ppo": {"accuracy": sum(ppo) / 200, "n": 200, "correct": ppo}}


def test_accuracy_table_has_wilson_intervals_and_paired_changes():
    evals = _evals()
    text = accuracy_table(evals, {"sft": {"wall_time_s": 12.5}})
    lo, hi = wilson_interval(40, 200)
    assert f"[{lo:.3f}, {hi:.3f}]" in text
    c = compare(evals["sft"]["correct"], evals["ppo"]["correct"])
    assert f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" in text
    assert "Final (ppo) vs SFT on the same 200 problems" in text
    assert ("excludes zero" in text) == c["excludes_zero"]


def test_running_mean_by_hand():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_report_puts_key_numbers_first_and_raw_metrics_in_an_appendix(tmp_path):
    history = [{"step": i, "loss": 1.0 / i, "reward": 0.1 * i} for i in range(1, 12)]
    stages = {"sft": {"wall_time_s": 3.0, "peak_memory_mb": 900.0, "log_history": history,
                      "metrics": {"train_loss": 0.4, "total_flos": 1e9, "epoch": 1.0}}}
    report = write_report(tmp_path, {"config": "q.yaml", "evals": _evals(), "stages": stages,
                                     "plugins": []}).read_text()
    assert report.index("## Key numbers") < report.index("## Stages")
    appendix = report[report.index("<details>"):]
    assert "total_flos" in appendix and "total_flos" not in report[:report.index("<details>")]
    assert "train_loss" in report[:report.index("<details>")]
    assert (tmp_path / "curves_sft.png").is_file() and (tmp_path / "accuracy.png").is_file()
