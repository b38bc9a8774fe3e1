"""TRL's dataset formats per stage, the same dataset field names everywhere, held-out PPO prompts."""
from __future__ import annotations

import json

import pytest

from helpers_tokenizers import make_tokenizer

from rlhf_plugins import registry
from rlhf_plugins.errors import ConfigError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")


# --- SFT: language modelling and prompt-completion, standard and conversational ---------------------

def test_sft_accepts_every_trl_sft_format(tok):
    pytest.importorskip("datasets")
    from rlhf_plugins.stages.sft.dataset import build_sft_dataset

    user, assistant = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    rows = [{"messages": [user, assistant]},                                  # conversational LM
            {"prompt": [user], "completion": [assistant]},                    # conversational p-c
            {"prompt": "Hi", "completion": "Hello!"},                         # standard p-c
            {"text": "The sky is blue."}]                                     # standard LM
    ds = build_sft_dataset(rows, tok, "chatml", "all_assistant_turns")
    ids, masks = ds["input_ids"], ds["assistant_masks"]
    # the three conversations are the same conversation
    assert ids[0] == ids[1] == ids[2] and masks[0] == masks[1] == masks[2]
    # plain text: tokenized as is plus eos, every token trained (TRL's language modelling)
    assert ids[3] == tok("The sky is blue.")["input_ids"] + [tok.eos_token_id]
    assert masks[3] == [1] * len(ids[3])


def test_sft_stage_trains_on_plain_string_prompt_completion_with_an_eval_split(tmp_path):
    pytest.importorskip("torch")
    from datasets import Dataset, DatasetDict

    from helpers_models import make_tiny_model_dir
    from rlhf_plugins.stages.sft.train import sft_from_config

    model = make_tiny_model_dir(tmp_path)
    data = DatasetDict({
        "train": Dataset.from_list([{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}."}
                                    for i in range(6)]),
        "test": Dataset.from_list([{"prompt": "What is 9 + 1?", "completion": "10."}])})
    data.save_to_disk(str(tmp_path / "data"))
    config = {"model": str(model), "dataset": str(tmp_path / "data"), "split": "train",
              "eval_split": "test", "max_steps": 1, "per_device_train_batch_size": 2,
              "report_to": "none", "save_strategy": "no"}
    result = sft_from_config(config, output_dir=tmp_path / "sft")
    assert result.metrics["train_rows"] == 6 and result.metrics["eval_rows"] == 1
    with pytest.raises(ConfigError, match="training split"):
        sft_from_config({**config, "eval_split": "train"}, output_dir=tmp_path / "sft2")
    with pytest.raises(ConfigError, match="either 'split' or 'dataset_split'"):
        sft_from_config({**config, "dataset_split": "train"}, output_dir=tmp_path / "sft3")


# --- reward models: preference (explicit / implicit prompt), unpaired preference, stepwise --------

def _encoded(path, head_name, tok):
    from rlhf_plugins.stages.reward_model.data import encode_rows
    from rlhf_plugins.stages.reward_model.data import load_rows

    head = registry().reward_heads.get(head_name)
    rows, where = load_rows(str(path), split="train", head=head, num_examples=None, seed=0)
    return encode_rows(rows, head, tok, registry().chat_templates.get("chatml"), strict=True,
                       where=where)


def test_reward_heads_accept_trls_preference_unpaired_and_stepwise_formats(tmp_path, tok):
    pytest.importorskip("torch")
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    good, bad = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    explicit = _jsonl(tmp_path / "explicit.jsonl", [{"prompt": user, "chosen": good, "rejected": bad}])
    implicit = _jsonl(tmp_path / "implicit.jsonl", [{"chosen": user + good, "rejected": user + bad}])
    standard = _jsonl(tmp_path / "standard.jsonl",
                      [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}])
    feats = [_encoded(p, "bradley_terry", tok).features[0]["completions_ids"]
             for p in (explicit, implicit, standard)]
    assert feats[0] == feats[1] == feats[2]

    unpaired = _jsonl(tmp_path / "unpaired.jsonl", [  # standard
        {"prompt": "What is 2 + 2?", "completion": "4", "label": True},
        {"prompt": "What is 2 + 2?", "completion": "5", "label": False}])
    conversational = _jsonl(tmp_path / "unpaired_conv.jsonl", [
        {"prompt": user, "completion": good, "label": True},
        {"prompt": user, "completion": bad, "label": False}])
    orm, orm_conv = _encoded(unpaired, "orm", tok), _encoded(conversational, "orm", tok)
    assert [f["outcome"] for f in orm.features] == [1.0, 0.0]
    assert [f["input_ids"] for f in orm.features] == [f["input_ids"] for f in orm_conv.features]

    stepwise = _jsonl(tmp_path / "stepwise.jsonl", [
        {"prompt": "Which number is larger, 9.11 or 9.9?",
         "completions": ["The fractional part of 9.11 is 0.11.", "0.11 < 0.9, so 9.9 is larger."],
         "labels": [True, True]},
        {"prompt": "What is 3 * 4?", "completions": ["3 * 4 = 7.", "The answer is 7."],
         "labels": [False, False]}])
    prm = _encoded(stepwise, "prm", tok)
    assert [f["step_labels"] for f in prm.features] == [[1, 1], [-1, -1]]


# --- prompt-only: sample and ppo; held-out PPO prompts are never training prompts ----------------

def _ppo_settings(**kw):
    from rlhf_plugins.stages.ppo.settings import PPOSettings

    return PPOSettings(reward_functions=["exact_answer"], **kw)


def test_ppo_eval_prompts_are_carved_from_training_and_excluded(tmp_path):
    from rlhf_plugins.stages.ppo.prompts import held_out_prompts, load_prompt_rows

    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    rows += [{"prompt": "What is 3 + 3?", "answer": "6"}]  # a duplicate of row 4
    path = _jsonl(tmp_path / "prompts.jsonl", rows)
    settings = _ppo_settings(dataset=str(path), eval_examples=5, dataset_seed=1)
    train, _ = load_prompt_rows(settings)
    train, held = held_out_prompts(settings, train)
    key = lambda p: json.dumps([{"role": "user", "content": p}] if isinstance(p, str) else p)  # noqa: E731
    assert len(train) == 16 and 1 <= len(held) <= 5
    assert not {key(p) for p in held["prompt"]} & {key(p) for p in train["prompt"]}
    # the first rows are no longer the eval rows (the old behaviour)
    assert list(held["prompt"]) != [r["prompt"] for r in rows[:len(held)]]
    # the same seed carves the same split
    again = held_out_prompts(settings, load_prompt_rows(settings)[0])[1]
    assert list(again["prompt"]) == list(held["prompt"])


def test_ppo_eval_split_and_eval_dataset(tmp_path):
    pytest.importorskip("datasets")
    from datasets import Dataset, DatasetDict

    from rlhf_plugins.stages.ppo.prompts import held_out_prompts, load_prompt_rows
    from rlhf_plugins.stages.ppo.train import load_ppo_config

    DatasetDict({"train": Dataset.from_list([{"prompt": f"train {i}"} for i in range(6)]),
                 "test": Dataset.from_list([{"prompt": f"test {i}"} for i in range(3)] +
                                           [{"prompt": "train 0"}])}).save_to_disk(str(tmp_path / "d"))
    settings, _, _ = load_ppo_config({"dataset": str(tmp_path / "d"), "split": "train",
                                      "eval_split": "test", "reward_functions": ["exact_answer"]},
                                     output_dir=tmp_path / "o")
    train, held = held_out_prompts(settings, load_prompt_rows(settings)[0])
    assert len(train) == 6 and sorted(held["prompt"]) == ["test 0", "test 1", "test 2"]
    other = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "elsewhere"}])
    # `eval_dataset` is a field of every training command now (it was unknown to ppo)
    settings, _, _ = load_ppo_config({"dataset": str(tmp_path / "d"), "reward_functions": ["exact_answer"]},
                                     output_dir=tmp_path / "o", overrides=[f"eval_dataset={other}",
                                                                           "eval_split=train"])
    assert list(held_out_prompts(settings, load_prompt_rows(settings)[0])[1]["prompt"]) == ["elsewhere"]
    with pytest.raises(ConfigError, match="training split"):
        held_out_prompts(_ppo_settings(dataset=str(tmp_path / "d"), eval_split="train"), train)


def test_dataset_fields_are_named_the_same_in_every_command():
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.reward_model.settings import RMSettings
    from rlhf_plugins.stages.rejection_sampling.settings import SamplingSettings
    from rlhf_plugins.stages.sft.settings import SFTSettings
    import dataclasses

    for cls in (SFTSettings, RMSettings, PPOSettings, SamplingSettings):
        names = {f.name for f in dataclasses.fields(cls)}
        assert {"dataset", "dataset_config", "dataset_split"} <= names, cls
        if cls is not SamplingSettings:  # sampling has no evaluation
            assert {"eval_split", "eval_dataset"} <= names, cls
    from rlhf_plugins.config import build_dataclass

    assert build_dataclass(SamplingSettings, {"split": "test", "reward_functions": ["format"]}
                           ).dataset_split == "test"
