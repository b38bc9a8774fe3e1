"""The pipeline report: intervals up front, small-multiple curves, raw trainer metrics tucked away."""
from __future__ import annotations

import pytest

from rlhf_plugins.report import accuracy_table, reward_model_line, running_mean, write_report
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


def test_reward_model_line_compares_with_the_pre_training_value():
    metrics = {"heldout.pairwise_accuracy": 0.725, "heldout_before.pairwise_accuracy": 0.7,
               "heldout.pairs": 40}
    line = reward_model_line({"sft": {"metrics": {}}, "reward_model": {"metrics": metrics}})
    lo, hi = wilson_interval(29, 40)  # 0.725 * 40 pairs ranked right
    assert "40 pairs: 0.700" in line and f"0.725 [{lo:.3f}, {hi:.3f}] after" in line
    assert "(above its pre-training value)" in line
    metrics["heldout.pairwise_accuracy"] = 0.6
    assert "(not above its pre-training value)" in reward_model_line({"rm": {"metrics": metrics}})
    assert reward_model_line({"sft": {"metrics": {"train_loss": 0.1}}}) == ""
    assert "ties every pair" not in line
    metrics.update({"heldout_before.pairwise_accuracy": 0.5, "heldout_before.tied_pairs": 39})
    assert "ties every pair" not in reward_model_line({"rm": {"metrics": metrics}})  # one not tied
    metrics["heldout_before.tied_pairs"] = 40
    assert "0.500 [" in (tied := reward_model_line({"rm": {"metrics": metrics}}))
    assert "before training (the untrained head ties every pair) -> 0.600" in tied


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


def test_generation_stops_at_an_answer_line_pattern():
    """A stop pattern ends greedy generation early (a tiny model that would run to the limit)."""
    import re

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers_tokenizers import make_tokenizer
    from rlhf_plugins.data.problems import ANSWER_STOP_PATTERN
    from rlhf_plugins.generation import HFGenerator

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, max_position_embeddings=128))
    prompt = tok("hello", add_special_tokens=False)["input_ids"]
    gen = HFGenerator(model, tok, stop_ids=[], max_new_tokens=12, temperature=0.0)
    free = gen.generate([prompt], [0], 1)[0][0]
    assert free.finish_reason == "length" and free.num_tokens == 12
    # stop once the text so far contains its first two characters: a pattern that must hit
    target = re.escape(free.text[:2])
    stopped = HFGenerator(model, tok, stop_ids=[], max_new_tokens=12, temperature=0.0,
                          stop_patterns=[target]).generate([prompt], [0], 1)[0][0]
    assert stopped.finish_reason == "stop" and stopped.num_tokens < 12
    assert stopped.text == free.text[:2]
    assert re.search(ANSWER_STOP_PATTERN, "so\n\nThe answer is 12.5.\nThe answer")
    assert re.search(ANSWER_STOP_PATTERN, "The answer is 12.5").__class__ is type(None)


# --- issue 31: the report says only what happened -------------------------------------------

def _gated_evals():
    """base -> sft -> rejection_sampling -> ppo, with ppo not kept by the gate: its held-out
    result is rejection sampling's, marked as the pipeline marks it (gate.carried_eval)."""
    from rlhf_plugins.stages.gate import carried_eval, decide

    evals = {name: e for name, e in _evals().items() if name != "ppo"}
    rs = [i % 5 == 0 or i % 3 == 1 for i in range(200)]
    evals["rejection_sampling"] = {"accuracy": sum(rs) / 200, "n": 200, "correct": rs,
                                   "accuracy_by_kind": {"add": 0.5}}
    for name, e in evals.items():
        e["samples"] = [{"prompt": "2 + 3?", "answer": "5", "correct": name != "base",
                         "completion": f"answer of {name}"}]
    verdict = decide([True] * 3 + [False] * 7, [True] * 2 + [False] * 8, "better")
    evals["ppo"] = carried_eval(evals["rejection_sampling"], verdict, "rejection_sampling")
    return evals


def test_a_gated_out_stage_carries_the_model_actually_used(tmp_path):
    evals = _gated_evals()
    stages = {name: {"metrics": {}, "wall_time_s": 1.0} for name in ("sft", "rejection_sampling", "ppo")}
    report = write_report(tmp_path, {"config": "q.yaml", "evals": evals, "stages": stages,
                                     "plugins": []}).read_text()
    label = "rejection_sampling's model; ppo not kept"
    table, samples = report[:report.index("![accuracy]")], report[report.index("## Sample completions"):]
    lo, hi = wilson_interval(sum(evals["rejection_sampling"]["correct"]), 200)
    assert f"| {label} | {evals['ppo']['accuracy']:.4g} | [{lo:.3f}, {hi:.3f}] | 200 | +0.000 " in table
    assert "| ppo |" not in table and "| ppo (" not in table
    assert f"Final ({label}) vs SFT" in table
    by_kind = report[report.index("Accuracy by problem kind"):report.index("| stage |")]
    assert f"| {label} | 0.5 |" in by_kind and "| ppo |" not in by_kind
    # the stages table: ppo ran, its model was not kept
    assert "| ppo | 1 |  | ran; model not kept (the pipeline went on with rejection_sampling's model) |" in report
    # the sample completions are rejection sampling's model's, and say so
    assert f"- *{label}* (correct): `answer of rejection_sampling`" in samples
    assert "*ppo*" not in samples and "- *base* (wrong): `answer of base`" in samples


def test_the_accuracy_chart_marks_a_not_kept_stage_and_says_what_it_shows():
    import matplotlib.pyplot as plt

    from rlhf_plugins.report import accuracy_caption, accuracy_figure

    evals = _gated_evals()
    fig = accuracy_figure(evals)
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == [
            "base", "sft", "rejection_sampling", "rejection_sampling's model;\nppo not kept"]
        from matplotlib.container import BarContainer

        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [b.get_hatch() for b in bars] == [None, None, None, "//"]
        assert bars[3].get_facecolor() != bars[2].get_facecolor()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["not kept by the gate"]
        caption = ax.get_xlabel().replace("\n", " ")
        assert caption.startswith("bars: accuracy on the same 200 held-out problems; whiskers: 95% "
                                  "Wilson interval; hatched: a stage the validation gate did not keep")
        # the whiskers are the Wilson intervals of the counts of right answers
        whiskers = bars.errorbar.lines[2][0].get_segments()
        for (x_lo, y_lo), (x_hi, y_hi) in whiskers:
            assert x_lo == x_hi
        expected = [wilson_interval(sum(e["correct"]), 200) for e in evals.values()]
        got = [(seg[0][1], seg[1][1]) for seg in whiskers]
        assert [y for pair in got for y in pair] == pytest.approx([y for pair in expected for y in pair],
                                                                  abs=1e-12)
        assert [b.get_height() for b in bars] == [e["accuracy"] for e in evals.values()]
    finally:
        plt.close(fig)
    without_gate = {k: v for k, v in evals.items() if k != "ppo"}
    assert "hatched" not in accuracy_caption(without_gate)
    fig = accuracy_figure(without_gate)
    assert fig.axes[0].get_legend() is None and not any(b.get_hatch() for b in fig.axes[0].patches)
    plt.close(fig)


def test_the_report_states_the_chart_caption(tmp_path):
    report = write_report(tmp_path, {"evals": _gated_evals(), "stages": {}, "plugins": []}).read_text()
    assert ("![accuracy](accuracy.png)\n\n*bars: accuracy on the same 200 held-out problems; whiskers: "
            "95% Wilson interval; hatched:") in report


def test_reward_model_intervals_come_from_the_counts_not_a_rounded_mean():
    """8 pairs: 4 ranked right and 1 tied is 0.5625 (a tie counts half); rounding 4.5 to an even
    count gave the line the 0.500 interval ("0.562 [0.215, 0.785]")."""
    metrics = {"heldout_before.pairwise_accuracy": 0.5, "heldout_before.pairs": 8,
               "heldout_before.tied_pairs": 8, "heldout.pairwise_accuracy": 0.5625,
               "heldout.pairs": 8, "heldout.tied_pairs": 1}
    line = reward_model_line({"reward_model": {"metrics": metrics}})
    half = wilson_interval(4, 8)
    assert f"[{half[0]:.3f}, {half[1]:.3f}]" == "[0.215, 0.785]"
    lo, hi = wilson_interval(4.5, 8)  # by hand: (p + z^2/2n) / (1 + z^2/n) +- ...
    assert f"0.562 [{lo:.3f}, {hi:.3f}] (4 right, 1 tied) after" in line
    assert line.count("[0.215, 0.785]") == 1  # only the untrained head's 0.500
    assert "0.500 [0.215, 0.785] (0 right, 8 tied) before training (the untrained head ties every pair)" in line
    assert "a tied pair counts half" in line
    # the Wilson interval of 4.5 right of 8, computed here from the formula
    import math
    z, n, p = 1.959963984540054, 8, 4.5 / 8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half_width, centre + half_width))


def test_accuracy_intervals_count_the_right_answers():
    # a mean that does not round back to its count (as a rounded or recomputed mean would not)
    evals = {"sft": {"accuracy": 0.4, "n": 5, "correct": [True, True, True, False, False]}}
    lo, hi = wilson_interval(3, 5)
    assert f"[{lo:.3f}, {hi:.3f}]" in accuracy_table(evals)
    lo, hi = wilson_interval(0.35 * 40, 40)  # no per-problem answers: the mean as it is
    assert f"[{lo:.3f}, {hi:.3f}]" in accuracy_table({"sft": {"accuracy": 0.35, "n": 40}})


def _panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_a_series_with_few_points_is_drawn_as_labelled_points_not_a_line():
    """PPO logs rollout metrics only on generation steps: 2 points 8 steps apart are no trend."""
    import matplotlib.pyplot as plt

    from rlhf_plugins.report import MIN_LINE_POINTS, curves_figure

    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    history[0].update({"reward": 0.25, "kl": 0.0})
    history[8].update({"reward": 0.375, "kl": 0.0123})
    fig = curves_figure("ppo", history)
    try:
        reward = _panel(fig, "reward")
        (points,) = reward.lines  # one unconnected series, no running mean
        assert points.get_linestyle() == "None" and points.get_marker() == "o"
        assert list(points.get_xdata()) == [1.0, 9.0] and list(points.get_ydata()) == [0.25, 0.375]
        assert [t.get_text() for t in reward.texts] == ["0.25", "0.375"]  # each point's value
        assert [t.get_text() for t in reward.get_legend().get_texts()] == ["2 logged points (no line)"]
        assert [t.get_text() for t in _panel(fig, "kl").texts] == ["0", "0.0123"]
        loss = _panel(fig, "loss")  # 10 points: a line with its running mean
        assert [line.get_linestyle() for line in loss.lines] == ["-", "-"]
        assert len(loss.lines[0].get_xdata()) == 10 and not loss.texts
    finally:
        plt.close(fig)
    # the threshold: MIN_LINE_POINTS - 1 points are points, MIN_LINE_POINTS a line
    short = [{"step": s, "reward": float(s)} for s in range(MIN_LINE_POINTS - 1)]
    fig = curves_figure("x", short + [{"step": 99, "loss": 1.0}])
    assert _panel(fig, "reward").lines[0].get_linestyle() == "None"
    plt.close(fig)
    fig = curves_figure("x", [{"step": s, "reward": float(s)} for s in range(MIN_LINE_POINTS)])
    assert _panel(fig, "reward").lines[0].get_linestyle() == "-"
    plt.close(fig)


def test_a_stage_that_produced_nothing_is_a_warning_not_ran(tmp_path):
    stages = {"sft": {"metrics": {"train_rows": 256}, "wall_time_s": 2.0},
              "rejection_sampling": {"metrics": {"selected": 0, "completions": 64, "selected_prompts": 0},
                                     "wall_time_s": 3.0}}
    report = write_report(tmp_path, {"evals": {}, "stages": stages, "plugins": []}).read_text()
    head = report[:report.index("## Key numbers")]
    assert "> **Warning:** rejection_sampling produced nothing usable: 0 selected samples (`selected`).\n" in head
    assert ("| rejection_sampling | 3 |  | **warning:** ran, produced nothing usable: 0 selected samples "
            "(`selected`) |") in report
    assert "| sft | 2 |  | ran |" in report and "sft produced" not in report
    # the same stage up to date (skipped) still warns; 0 pairs does too; a stage with output does not
    stages["rejection_sampling"]["skipped"] = True
    stages["dpo"] = {"metrics": {"data.train_pairs": 0}}
    report = write_report(tmp_path, {"evals": {}, "stages": stages, "plugins": []}).read_text()
    assert "**warning:** skipped (output up to date), produced nothing usable" in report
    assert "> **Warning:** dpo produced nothing usable: 0 training pairs (`data.train_pairs`)." in report
    stages = {"rejection_sampling": {"metrics": {"selected": 5, "all_nan_prompts": 0}}}
    report = write_report(tmp_path, {"evals": {}, "stages": stages, "plugins": []}).read_text()
    assert "Warning" not in report and "| ran |" in report
