"""Reward-model stage: TRL RewardTrainer equivalence, save/reload, adapter attach, CLI, MC labels."""
from __future__ import annotations

import copy
import json
import time

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402
from helpers_tokenizers import make_tokenizer  # noqa: E402

from rlhf_plugins import registry  # noqa: E402

PREFS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.\n\nThe answer is {a + b}.",
     "rejected": f"{a} + {b} = {a + b + d}.\n\nThe answer is {a + b + d}.", "margin": 0.25 * d}
    for a, b, d in [(2, 3, 1), (10, 7, 2), (4, 4, 1), (12, 30, 3), (5, 9, 1), (21, 2, 2), (8, 8, 4),
                    (3, 14, 1)]
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tpl():
    return registry().chat_templates.get("chatml")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rm-stage"), tokenizer=tok)


def _args(out, **kw):
    from trl import RewardConfig

    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3,
                logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False, seed=0,
                save_strategy="no", dataloader_pin_memory=False, use_cpu=True)
    base.update(kw)
    return RewardConfig(**base)


# --- TRL RewardTrainer equivalence -------------------------------------------------------------

@pytest.mark.parametrize("loss", ["pairwise", "margin"])
def test_bradley_terry_matches_trl_reward_trainer(tmp_path, tiny_dir, tok, tpl, loss):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer

    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.reward_model.data import encode_rows
    from rlhf_plugins.stages.reward_model.model import RewardModel
    from rlhf_plugins.stages.reward_model.trainer import RewardHeadTrainer

    head = registry().reward_heads.get("bradley_terry", loss=loss)
    rows = PREFS if loss == "margin" else [{k: v for k, v in r.items() if k != "margin"} for r in PREFS]
    feats = encode_rows(rows, head, tok, tpl).features
    columns = {"chosen_ids": [f["completions_ids"][0] for f in feats],
               "rejected_ids": [f["completions_ids"][1] for f in feats]}
    if loss == "margin":
        columns["margin"] = [f["margin"] for f in feats]
    # TRL's sequence-classification model reads the last *non-pad* token: with SmolLM2's
    # pad == eos it would read the token before the end-of-turn token, so TRL gets a tokenizer
    # whose pad is a token that never occurs in the data. Ours reads the attention mask.
    trl_tok = make_tokenizer("smollm2", pad="<|endoftext|>")
    torch.manual_seed(123)
    trl_model = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=1,
                                                                   dtype=torch.float32)
    backbone = load_causal_lm(tiny_dir)
    ours = RewardModel(backbone, head, tokenizer=tok, template=tpl)
    with torch.no_grad():
        ours.head_module.score.weight.copy_(trl_model.score.weight)

    ids = columns["chosen_ids"] + columns["rejected_ids"]
    initial = [float(ours.scores_for(torch.tensor([x]))[0]) for x in ids]
    trl_trainer = RewardTrainer(model=trl_model, args=_args(tmp_path / "trl"),
                                train_dataset=Dataset.from_dict(columns), processing_class=trl_tok)
    trl_trainer.train()
    our_trainer = RewardHeadTrainer(ours, _args(tmp_path / "ours"), train_dataset=feats,
                                    processing_class=tok)
    our_trainer.train()

    def losses(trainer):
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    def accuracies(trainer):
        return [e["accuracy"] for e in trainer.state.log_history if "accuracy" in e]

    assert len(losses(our_trainer)) == 6
    assert losses(our_trainer) == pytest.approx(losses(trl_trainer), rel=1e-4, abs=1e-5)
    assert accuracies(our_trainer) == pytest.approx(accuracies(trl_trainer))
    # the final models score the same sequences the same
    trl_model.eval()
    with torch.no_grad():
        trl_scores = [float(trl_model(input_ids=torch.tensor([x])).logits[0, 0]) for x in ids]
    our_scores = [float(ours.scores_for(torch.tensor([x]))[0]) for x in ids]
    assert our_scores == pytest.approx(trl_scores, abs=1e-4)
    assert our_scores != pytest.approx(initial, abs=1e-3)  # training did move the scores


# --- saving, reloading, attaching ---------------------------------------------------------------

ROWS = [{"prompt": "What is 2 + 2?", "completion": "The answer is 4."},
        {"prompt": "What is 15% of 80?", "completion": "15% = 0.15.\n\n0.15 * 80 = 12.\n\nThe answer is 12."},
        {"prompt": "Hi", "completion": "Hello!"}]


def _trained_lora_rm(tmp_path, tiny_dir, tok, tpl, head_name="bradley_terry"):
    from rlhf_plugins.models import LoraSettings, apply_lora, load_causal_lm
    from rlhf_plugins.stages.reward_model.data import encode_rows
    from rlhf_plugins.stages.reward_model.model import RewardModel
    from rlhf_plugins.stages.reward_model.trainer import RewardHeadTrainer

    head = registry().reward_heads.get(head_name)
    backbone = apply_lora(load_causal_lm(tiny_dir), LoraSettings(r=4, alpha=8, dropout=0.0))
    model = RewardModel(backbone, head, tokenizer=tok, template=tpl, template_name="chatml",
                        base_model=str(tiny_dir))
    rows = head.synthetic_rows(8, 0, "train")
    trainer = RewardHeadTrainer(model, _args(tmp_path / "train", max_steps=3, learning_rate=1e-2),
                                train_dataset=encode_rows(rows, head, tok, tpl).features)
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("head_name", ["bradley_terry", "prm"])
def test_saved_lora_reward_model_reloads_with_identical_scores(tmp_path, tiny_dir, tok, tpl, head_name):
    from rlhf_plugins.stages.reward_model.artifact import load_reward_model, read_meta
    from rlhf_plugins.stages.reward_model.scoring import score

    model, trainer = _trained_lora_rm(tmp_path, tiny_dir, tok, tpl, head_name)
    rows = ROWS if head_name != "prm" else [{"prompt": r["prompt"], "completion": r["completion"]}
                                            for r in ROWS]
    before = score(model, rows, progress=False)
    trainer.save_model(str(tmp_path / "rm"))
    meta = read_meta(tmp_path / "rm")
    assert meta["head"] == head_name and meta["adapter"] is True and meta["template"] == "chatml"
    assert (tmp_path / "rm" / "adapter_model.safetensors").is_file()
    # a standard peft classification adapter: the head is its `score` (modules_to_save)
    assert meta["hf_class"] == ("sequence_classification" if head_name == "bradley_terry"
                                else "token_classification")
    assert "score" in json.loads((tmp_path / "rm" / "adapter_config.json").read_text())["modules_to_save"]
    reloaded = load_reward_model(tmp_path / "rm")
    after = score(reloaded, rows, progress=False)
    assert after == pytest.approx(before, abs=1e-6)
    # the head was trained: a fresh head on the same adapter scores differently
    fresh = registry().reward_heads.get(head_name).build_module(32)
    assert not torch.equal(fresh.score.weight, reloaded.head_module.score.weight.cpu())


def test_full_finetune_save_and_reload(tmp_path, tiny_dir, tok, tpl):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.reward_model.artifact import load_reward_model
    from rlhf_plugins.stages.reward_model.data import encode_rows
    from rlhf_plugins.stages.reward_model.model import RewardModel
    from rlhf_plugins.stages.reward_model.scoring import score
    from rlhf_plugins.stages.reward_model.trainer import RewardHeadTrainer

    head = registry().reward_heads.get("orm", aggregation="mean")
    model = RewardModel(load_causal_lm(tiny_dir), head, tokenizer=tok, template=tpl,
                        template_name="chatml", base_model=str(tiny_dir))
    feats = encode_rows(head.synthetic_rows(8, 0, "train"), head, tok, tpl).features
    RewardHeadTrainer(model, _args(tmp_path / "t", max_steps=2), train_dataset=feats).train()
    before = score(model, ROWS, progress=False)
    from rlhf_plugins.stages.reward_model.artifact import save_reward_model

    save_reward_model(model, tmp_path / "rm")
    reloaded = load_reward_model(tmp_path / "rm")
    assert reloaded.head.options["aggregation"] == "mean"
    assert score(reloaded, ROWS, progress=False) == pytest.approx(before, abs=1e-6)


def test_attach_reward_adapter_on_a_policy_with_the_same_base(tmp_path, tiny_dir, tok, tpl):
    from rlhf_plugins.models import LoraSettings, apply_lora, load_causal_lm
    from rlhf_plugins.stages.reward_model.artifact import attach_reward_adapter, load_reward_model
    from rlhf_plugins.stages.reward_model.scoring import score

    model, trainer = _trained_lora_rm(tmp_path, tiny_dir, tok, tpl)
    trainer.save_model(str(tmp_path / "rm"))
    reference = score(load_reward_model(tmp_path / "rm"), ROWS, progress=False)

    torch.manual_seed(7)
    policy = apply_lora(load_causal_lm(tiny_dir), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a policy adapter that really changes the outputs
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([tok("The answer is 4.")["input_ids"]])
    policy_logits = policy(input_ids=ids).logits.detach()
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}

    scorer = attach_reward_adapter(policy, tmp_path / "rm", adapter_name="reward")
    assert score(scorer, ROWS, progress=False) == pytest.approx(reference, abs=1e-5)
    assert policy.active_adapter == "default"
    assert {n: p.requires_grad for n, p in policy.named_parameters() if n in flags} == flags
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reward." in n)
    assert torch.allclose(policy(input_ids=ids).logits, policy_logits, atol=1e-6)
    # as a TRL-style reward function
    f = scorer.as_reward_function()
    assert f([r["prompt"] for r in ROWS], [r["completion"] for r in ROWS]) == pytest.approx(reference, abs=1e-5)


# --- the stage and its CLI -------------------------------------------------------------------------

def test_rm_cli_writes_model_metrics_and_plot(tmp_path, tiny_dir, capsys):
    import yaml

    from rlhf_plugins.cli.main import main
    from rlhf_plugins.stages.reward_model.artifact import load_reward_model
    from rlhf_plugins.stages.reward_model.scoring import score

    data = tmp_path / "prefs.jsonl"
    rows = copy.deepcopy(PREFS)
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})  # dropped, counted
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(tiny_dir), "head": "bradley_terry", "loss": "margin", "dataset": str(data),
              "eval_size": 3, "bad_rows": "skip", "max_bad_fraction": 0.2,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_steps": 4,
              "per_device_train_batch_size": 2, "logging_steps": 1, "eval_strategy": "steps",
              "eval_steps": 2, "save_steps": 2, "report_to": "none", "learning_rate": 5e-3}
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["rm", "--config", str(path), "--output-dir", str(out)]) == 0
    assert "saved bradley_terry reward model" in capsys.readouterr().out
    metrics = json.loads((out / "rm_metrics.json").read_text())
    assert metrics["train_data"]["dropped"] == 1 and metrics["train_data"]["kept"] + \
        metrics["eval_data"]["kept"] == 8
    assert "chosen == rejected" in metrics["train_data"]["first_error"]
    # the same count in every stage's form: per reason, with the row's line (the 9th)
    assert metrics["dropped_rows"] == 1 and metrics["dropped"] == {"invalid": 1}
    assert metrics["dropped_first_rows"] == {"invalid": [9]}
    held = metrics["heldout"]
    assert held["pairs"] == 3 and 0.0 <= held["pairwise_accuracy"] <= 1.0
    # the trainer's exact eval accuracy and the scorer's held-out accuracy agree
    assert metrics["eval_accuracy"] == pytest.approx(held["pairwise_accuracy"])
    assert (out / "rm_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["global_step"] == 4 and any("eval_loss" in e for e in metrics["log_history"])
    model = load_reward_model(out)
    assert len(score(model, ROWS, progress=False)) == 3
    # errors are one line + exit 2
    assert main(["rm", "--config", str(path), "--output-dir", str(out), "--set", "los=margin"]) == 2
    assert "did you mean 'loss'" in capsys.readouterr().err
    assert main(["rm", "--config", str(path), "--output-dir", str(out), "--set", "loss=hinge"]) == 2
    assert "loss must be one of" in capsys.readouterr().err


def test_rm_stage_resumes_from_checkpoint(tmp_path, tiny_dir):
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    config = {"model": str(tiny_dir), "head": "orm", "num_examples": 8, "num_eval_examples": 4,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_steps": 2,
              "per_device_train_batch_size": 4, "save_steps": 1, "report_to": "none"}
    config["max_steps"] = 3
    first = rm_from_config(config, output_dir=tmp_path / "o")
    assert (tmp_path / "o" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    import shutil

    from helpers_bad_inputs import as_interrupted

    shutil.rmtree(tmp_path / "o" / "checkpoint-3")  # as if killed before the last save
    as_interrupted(tmp_path / "o")  # ... which leaves the run unfinished
    # the same config resumes (a changed one would start afresh: tests/test_resume_safety.py)
    second = rm_from_config(config, output_dir=tmp_path / "o")
    steps = [e["step"] for e in second.metrics["log_history"] if "loss" in e]
    assert second.metrics["global_step"] == 3 and min(steps, default=3) >= 3
    assert "heldout_before" in first.metrics and "heldout_before" not in second.metrics


def test_rm_stage_without_the_trainer_eval_trains_and_scores_the_same(tmp_path, tiny_dir):
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    config = {"model": str(tiny_dir), "head": "bradley_terry", "num_examples": 8, "num_eval_examples": 4,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_steps": 2, "learning_rate": 1e-2,
              "per_device_train_batch_size": 4, "save_strategy": "no", "report_to": "none", "seed": 0}
    with_eval = rm_from_config(config, output_dir=tmp_path / "a").metrics
    without = rm_from_config({**config, "trainer_eval": False}, output_dir=tmp_path / "b").metrics
    assert "eval_loss" in with_eval and "eval_loss" not in without and "eval_accuracy" not in without
    # skipping TRL's evaluate pass changes neither the training nor the held-out scorer's numbers
    assert without["heldout"]["pairwise_accuracy"] == with_eval["heldout"]["pairwise_accuracy"]
    assert without["heldout"]["mean_margin"] == pytest.approx(with_eval["heldout"]["mean_margin"], abs=1e-6)
    assert without["heldout"]["mean_margin"] != 0.0  # the head trained (it starts at zero)
    assert with_eval["eval_accuracy"] == pytest.approx(with_eval["heldout"]["pairwise_accuracy"])


# --- Monte Carlo PRM labels ---------------------------------------------------------------------

def test_mc_step_labels_hard_and_soft():
    from rlhf_plugins.stages.reward_model.train import mc_step_labels

    steps = ["15% = 0.15.", "0.15 * 80 = 1.2.", "The answer is 1.2."]
    calls = []

    def sample(prompt, prefix, n):  # a scripted policy: continues from whatever value it sees
        calls.append(prefix)
        value = "1.2" if "1.2" in prefix else "12"
        return [f"So the answer is {value}.\n\nThe answer is {value}."] * (n // 2) + \
               ["I am not sure."] * (n - n // 2)

    reward = registry().reward_functions.get("exact_answer")
    row = {"prompt": [{"role": "user", "content": "What is 15% of 80?"}], "steps": steps, "answer": "12"}
    hard = mc_step_labels([row], sample, reward, num_rollouts=4, progress=False)[0]
    assert hard["mc_success_rates"] == [0.5, 0.0, 0.0] and hard["labels"] == [1, -1, -1]
    assert len(calls) == 2 and calls[0] == "15% = 0.15.\n\n"  # the last step needs no rollouts
    soft = mc_step_labels([row], sample, reward, num_rollouts=4, mode="soft", progress=False)[0]
    assert soft["labels"] == [0.5, 0.0, 0.0]
    strict = mc_step_labels([row], sample, reward, num_rollouts=4, threshold=0.5, progress=False)[0]
    assert strict["labels"] == [-1, -1, -1]  # "most succeed" needs > 50%


# --- integration on the embedded default model ---------------------------------------------------

@pytest.mark.slow
def test_qlora_bradley_terry_on_default_model_beats_chance(tmp_path):
    from rlhf_plugins.models import default_model_path
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    from rlhf_plugins.data import synth

    model_dir = default_model_path()
    # Half the rejected answers ramble, half carry an arithmetic error (the synthetic task's two
    # preference kinds); a 135M model separates the first kind within a CPU-sized run.
    data = {}
    for split, n in (("train", 96), ("test", 48)):
        data[split] = tmp_path / f"pref_{split}.jsonl"
        synth.write_jsonl(data[split], synth.preference_rows(n, 1, split, rambling_fraction=0.5))
    started = time.time()
    config = {"model": str(model_dir), "head": "bradley_terry", "dataset": str(data["train"]),
              "eval_dataset": str(data["test"]), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "quantization": {"quant_type": "nf4"}, "num_train_epochs": 1,
              "per_device_train_batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2,
              "logging_steps": 2, "max_length": 256, "save_strategy": "no", "seed": 0,
              "report_to": "none"}
    result = rm_from_config(config, output_dir=tmp_path / "rm")
    elapsed = time.time() - started
    held = result.metrics["heldout"]
    print(f"QLoRA BT RM: held-out pairwise accuracy {held['pairwise_accuracy']:.3f} "
          f"(before {result.metrics['heldout_before']['pairwise_accuracy']:.3f}) on "
          f"{held['pairs']} pairs in {elapsed:.0f}s")
    assert held["pairs"] == 48
    # chance is 0.5 (binomial sd 0.072 on 48 pairs): 0.65 is more than 2 sd above it. (The
    # randomly initialised head can already sit above chance - a random projection of the last
    # hidden state correlates with answer length - so "before" is reported, not compared.)
    assert held["pairwise_accuracy"] >= 0.65


def test_heldout_metrics_per_wrong_answer_kind(tiny_dir, tok, tpl):
    """Preference rows with `rejected_kind` / outcome rows with `completion_kind` get per-kind
    metrics, computed from the same scores as the overall ones (checked against score())."""
    from rlhf_plugins.data import synth
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.reward_model.scoring import score
    from rlhf_plugins.stages.reward_model.data import evaluate_rows
    from rlhf_plugins.stages.reward_model.model import RewardModel

    torch.manual_seed(0)
    for head_name in ("bradley_terry", "orm"):
        head = registry().reward_heads.get(head_name)
        rm = RewardModel(load_causal_lm(tiny_dir), head, tokenizer=tok, template=tpl)
        if head_name == "bradley_terry":
            rows = synth.preference_rows(12, 0, rambling_fraction=0.3, unsupported_fraction=0.4)
            metrics = evaluate_rows(rm, rows)
            chosen = score(rm, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows], progress=False)
            rejected = score(rm, [{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows], progress=False)
            for kind in {r["rejected_kind"] for r in rows}:
                hits = [1.0 if c > j else 0.5 if c == j else 0.0
                        for c, j, r in zip(chosen, rejected, rows) if r["rejected_kind"] == kind]
                assert metrics[f"pairwise_accuracy/{kind}"] == pytest.approx(sum(hits) / len(hits))
        else:
            rows = synth.outcome_rows(4, 0, per_prompt=3, unsupported_fraction=0.5)
            metrics = evaluate_rows(rm, rows)
            scores = score(rm, rows, progress=False)
            assert metrics["best_of_n_prompts"] == 4  # candidates grouped by prompt
            for kind in {r["completion_kind"] for r in rows}:
                hits = [(s > 0.5) == (r["label"] == 1) for s, r in zip(scores, rows)
                        if r["completion_kind"] == kind]
                assert metrics[f"accuracy/{kind}"] == pytest.approx(sum(hits) / len(hits))
