"""Reward models as standard transformers artifacts, in and out, and one score per scorer.

- an RM trained by the rm stage loads with plain AutoModelFor{Sequence,Token}Classification (+
  PeftModel) and scores like the project (1e-4); its tokenizer renders the training template;
- reward_model.json records template and quantization; every loader honours them;
- a transformers sequence-classification RM directory works as `reward_model` in sample,
  best-of-n and ppo, and one RM gives identical scores in all three.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402
from helpers_tokenizers import make_tokenizer  # noqa: E402

from rlhf_plugins import registry  # noqa: E402

ROWS = [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": "Hello! How are you doing today?"},
        {"prompt": "What is 12 * 7?", "completion": "It is 84."}]
EOT = "<|im_end|>"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "report_to": "none", "save_strategy": "no", "logging_steps": 1}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rm-artifacts"), tokenizer=tok)


def _messages(row):
    prompt = row["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return prompt + [{"role": "assistant", "content": row["completion"]}]


def _plain_inputs(tokenizer, rows):
    """What a transformers user writes: the saved chat template, cut after the end-of-turn."""
    texts = [tokenizer.apply_chat_template(_messages(r), tokenize=False) for r in rows]
    texts = [t[:t.rindex(EOT) + len(EOT)] for t in texts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _train_rm(tmp_path, tiny_dir, head="bradley_terry", **extra):
    from rlhf_plugins.stages.reward_model.train import rm_from_config

    config = {"model": str(tiny_dir), "head": head, "num_examples": 8, "num_eval_examples": 4,
              **FAST, **extra}
    return rm_from_config(config, output_dir=tmp_path / f"rm-{head}")


@pytest.mark.parametrize("lora", [True, False], ids=["adapter", "full"])
def test_bradley_terry_rm_loads_as_plain_sequence_classifier(tmp_path, tiny_dir, lora):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_plugins.stages.reward_model.artifact import load_reward_model, read_meta
    from rlhf_plugins.stages.reward_model.scoring import score

    result = _train_rm(tmp_path, tiny_dir, **({"lora": LORA} if lora else {}))
    out = result.output_dir
    ours = score(result.model, ROWS, progress=False)
    meta = read_meta(out)
    assert meta["hf_class"] == "sequence_classification" and meta["num_labels"] == 1
    assert meta["template"] == "chatml" and "quantization" in meta and meta["quantization"] is None

    tokenizer = AutoTokenizer.from_pretrained(out)
    chatml = registry().chat_templates.get("chatml")
    # the saved tokenizer renders the training template (no base-model default system prompt)
    assert tokenizer.chat_template == chatml.jinja
    for row in ROWS:
        assert tokenizer.apply_chat_template(_messages(row), tokenize=False) == \
            chatml.render_text(_messages(row), tokenizer=tokenizer)
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)

    if lora:
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").is_file()
        base = AutoModelForSequenceClassification.from_pretrained(
            str(tiny_dir), num_labels=1, pad_token_id=tokenizer.pad_token_id)
        plain = PeftModel.from_pretrained(base, str(out))
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        plain = AutoModelForSequenceClassification.from_pretrained(str(out))
    plain.eval()
    with torch.no_grad():
        theirs = plain(**_plain_inputs(tokenizer, ROWS)).logits[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=1e-4)
    # and the project reloads it with the same scores
    assert score(load_reward_model(out), ROWS, progress=False) == pytest.approx(ours, abs=1e-5)


@pytest.mark.parametrize("head", ["orm", "prm"])
def test_token_heads_load_as_plain_token_classifiers(tmp_path, tiny_dir, head):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from rlhf_plugins.stages.reward_model.artifact import read_meta

    result = _train_rm(tmp_path, tiny_dir, head=head, lora=LORA)
    out, model = result.output_dir, result.model
    meta = read_meta(out)
    assert meta["hf_class"] == "token_classification"
    assert meta["num_labels"] == (3 if head == "prm" else 1)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForTokenClassification.from_pretrained(str(tiny_dir), num_labels=meta["num_labels"])
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    inputs = _plain_inputs(tokenizer, ROWS[:1])
    with torch.no_grad():
        logits = plain(**inputs).logits
        ours = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(logits.reshape(ours.shape), ours, atol=1e-4, rtol=1e-4)


def test_recorded_quantization_is_how_every_loader_loads(tmp_path, tok):
    from rlhf_plugins.models import is_quantized
    from rlhf_plugins.stages.reward_model.artifact import load_reward_model, read_meta
    from rlhf_plugins.stages.reward_model.scoring import score

    model_dir = make_tiny_model_dir(tmp_path, tokenizer=tok, hidden_size=64, intermediate_size=128)
    result = _train_rm(tmp_path, model_dir, lora=LORA, quantization={"quant_type": "nf4"})
    trained = score(result.model, ROWS, progress=False)
    meta = read_meta(result.output_dir)
    assert meta["quantization"]["load_in_4bit"] is True and meta["quantization"]["quant_type"] == "nf4"
    recorded = load_reward_model(result.output_dir)
    assert is_quantized(recorded.backbone.get_base_model())
    assert score(recorded, ROWS, progress=False) == pytest.approx(trained, abs=1e-4)
    # the dict saved in reward_model.json is accepted as `quantization` (was an AttributeError)
    as_dict = load_reward_model(result.output_dir, quantization=meta["quantization"])
    assert score(as_dict, ROWS, progress=False) == pytest.approx(trained, abs=1e-4)
    full = load_reward_model(result.output_dir, quantization=None)
    assert not is_quantized(full.backbone.get_base_model())


# --- any transformers sequence-classification RM, and one score per scorer ---------------------------

def _hf_rm_dir(tmp_path, tok) -> Path:
    """A tiny random LlamaForSequenceClassification saved with a chat-templated tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    out = tmp_path / "hf-rm"
    model.save_pretrained(out)
    saved = make_tokenizer("smollm2", chat_template=registry().chat_templates.get("chatml").jinja)
    saved.save_pretrained(out)
    return out


def test_hf_sequence_classifier_scores_as_transformers_does(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    from rlhf_plugins.stages.reward_model.artifact import load_reward_model
    from rlhf_plugins.stages.reward_model.scoring import score

    rm_dir = _hf_rm_dir(tmp_path, tok)
    scorer = load_reward_model(rm_dir)
    assert scorer.head_name == "bradley_terry" and scorer.template_name == "tokenizer"
    plain = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    expected = []
    for row in ROWS:  # one at a time: transformers' own rule, no padding involved
        with torch.no_grad():
            expected.append(float(plain(**_plain_inputs(scorer.tokenizer, [row])).logits[0, 0]))
    assert score(scorer, ROWS, progress=False) == pytest.approx(expected, abs=1e-5)


def _ours_rm_dir(tmp_path, tiny_dir) -> Path:
    return _train_rm(tmp_path, tiny_dir, lora=LORA).output_dir


@pytest.mark.parametrize("kind", ["transformers", "ours"])
def test_one_rm_one_score_in_sample_best_of_n_and_ppo(tmp_path, tiny_dir, tok, kind):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo
    from rlhf_plugins.stages.rejection_sampling.run import best_of_n, run_sampling
    from rlhf_plugins.stages.rejection_sampling.settings import SamplingSettings

    rm_dir = _hf_rm_dir(tmp_path, tok) if kind == "transformers" else _ours_rm_dir(tmp_path, tiny_dir)
    prompts = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]}
               for a, b in [(2, 3), (10, 7), (4, 4)]]
    common = dict(model=str(tiny_dir), reward_model=str(rm_dir), num_samples=2, max_new_tokens=8,
                  batch_size=8, temperature=1.0, seed=3)
    sampled = run_sampling(SamplingSettings(**common, selection="top_per_prompt"),
                           tmp_path / "sample", rows=prompts)
    best = best_of_n(SamplingSettings(**common), tmp_path / "bon", rows=prompts)
    rows = [r for r in sampled.rows if r["completion"][0]["content"].strip()]
    assert rows, "the tiny policy produced only empty completions"
    key = lambda r: (r["prompt_index"], r["completion_index"])  # noqa: E731
    bon = {key(r): r["rewards"]["reward_model"] for r in best.rows}
    assert [bon[key(r)] for r in rows] == [r["rewards"]["reward_model"] for r in rows]

    from datasets import Dataset

    settings = PPOSettings(model=str(tiny_dir), reward_model=str(rm_dir), lora=LORA,
                           advantage_estimator="grpo", critic="none")
    prepared = prepare_ppo(settings, {"max_steps": 1, "per_device_train_batch_size": 2,
                                      "num_generations": 2, "max_completion_length": 4,
                                      "report_to": "none", "save_strategy": "no"},
                           tmp_path / "ppo", train_dataset=Dataset.from_list(prompts))
    reward = prepared.trainer.reward_funcs[-1]
    assert reward.__name__ == "reward_model"
    # TRL's call: conversational prompts and completions
    values = reward(prompts=[r["prompt"] for r in rows],
                    completions=[r["completion"] for r in rows])
    assert values == pytest.approx([r["rewards"]["reward_model"] for r in rows], abs=1e-6)
    if kind == "ours":  # an adapter on the policy's base, same quantization: attached, not copied
        assert prepared.reward_scorer.backbone is prepared.trainer.model
        assert set(prepared.trainer.model.peft_config) == {"default", "reward"}
    else:
        assert prepared.reward_scorer.backbone is not prepared.trainer.model
