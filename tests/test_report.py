"""The pipeline report: intervals up front, small-multiple curves, raw trainer metrics tucked away."""
from __future__ import annotations

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
    assert "tie" not in line
    metrics.update({"heldout_before.pairwise_accuracy": 0.5, "heldout_before.tied_pairs": 39})
    assert "tie" not in reward_model_line({"rm": {"metrics": metrics}})  # one pair not tied
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
