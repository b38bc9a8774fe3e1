"""The `dpo` stage: pairs encoded by our template + masking plugins (checked by hand), the loss the
trainer optimises = the preference_losses component on independently computed log-probs, the
reference = the policy with its adapter disabled, CLI + saved template, formats and sources,
bad configs, a third-party loss, the pipeline (sft -> rejection_sampling -> dpo)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from helpers_bad_inputs import run_main, write_jsonl, write_yaml
from helpers_direct import completion_logps, hand_batch, token_ids
from helpers_models import make_tiny_model_dir
from rlhf_plugins import registry
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.stages.dpo.data import encode_pairs, pair_messages
from rlhf_plugins.stages.dpo.run import prepare_dpo, run_dpo
from rlhf_plugins.stages.dpo.settings import DPOSettings

torch = pytest.importorskip("torch")

FAST_TRL = dict(per_device_train_batch_size=2, per_device_eval_batch_size=8, max_steps=2,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                gradient_checkpointing=False, bf16=False, seed=0)
LORA = {"r": 2, "alpha": 4, "dropout": 0.0}

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
          "chosen": [{"role": "assistant", "content": f"The answer is {i + 1}."}],
          "rejected": [{"role": "assistant", "content": f"It is {i + 7}, I think."}]}
         for i in range(8)]

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("dpo-model"), hidden_size=64,
                               intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from rlhf_plugins.models import load_tokenizer

    return load_tokenizer(tiny_dir)



# --- encoding: the mask, checked against a hand-built expectation ---------------------------------

def test_pair_masks_train_each_completion_and_its_eot_never_the_prompt(tokenizer):
    """Multi-turn prompt (an earlier assistant turn that `all_assistant_turns` would train in
    SFT): only the completion's content + its <|im_end|> are trained; the prompt ends with the
    assistant header both completions share."""
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Sum?"}],
           "chosen": [{"role": "assistant", "content": "Four"}],
           "rejected": [{"role": "assistant", "content": "Five"}]}
    ds, dropped = encode_pairs([row], tokenizer, "chatml", "all_assistant_turns")
    got = ds[0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    nl = token_ids(tokenizer, "\n")
    # written out by hand: ChatML, special tokens as single ids
    prompt = ([start] + token_ids(tokenizer, "user\nHi") + [end] + nl + [start]
              + token_ids(tokenizer, "assistant\nHello") + [end] + nl + [start]
              + token_ids(tokenizer, "user\nSum?") + [end] + nl + [start] + token_ids(tokenizer, "assistant\n"))
    assert dropped.dropped == 0 and got["prompt_ids"] == prompt
    for key, text in (("chosen", "Four"), ("rejected", "Five")):
        content = token_ids(tokenizer, text)
        assert got[f"{key}_ids"] == content + [end] + nl
        assert got[f"{key}_mask"] == [1] * len(content) + [1, 0]  # EOT trained, trailing \n not


def test_collator_completion_mask_is_ours(tokenizer):
    from rlhf_plugins.stages.dpo.trainer import MaskedPreferenceCollator

    ds, _ = encode_pairs(PAIRS[:2], tokenizer, "chatml", "all_assistant_turns")
    rows = [ds[0], ds[1]]
    batch = MaskedPreferenceCollator(pad_token_id=0)(rows)
    width = batch["input_ids"].shape[1]
    for i, (row, key) in enumerate([(rows[0], "chosen"), (rows[1], "chosen"),
                                    (rows[0], "rejected"), (rows[1], "rejected")]):
        mask = [0] * len(row["prompt_ids"]) + row[f"{key}_mask"]
        assert batch["completion_mask"][i].tolist() == mask + [0] * (width - len(mask))
        ids = row["prompt_ids"] + row[f"{key}_ids"]
        assert batch["input_ids"][i, :len(ids)].tolist() == ids


@pytest.mark.parametrize("row", [
    {"chosen": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2."}],
     "rejected": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "3."}]},
    {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."},
    {"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
     "chosen": [{"role": "assistant", "content": "2."}],
     "rejected": [{"role": "assistant", "content": "3."}]},
], ids=["implicit-conversational", "explicit-standard", "explicit-conversational"])
def test_trl_formats_encode_the_same_pair(tokenizer, row):
    prompt, chosen, rejected = pair_messages(row)
    assert prompt == [{"role": "user", "content": "What is 1 + 1?"}]
    assert chosen == [{"role": "assistant", "content": "2."}]
    assert rejected == [{"role": "assistant", "content": "3."}]
    reference = {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}
    assert encode_pairs([row], tokenizer)[0][0] == encode_pairs([reference], tokenizer)[0][0]


def test_sources_file_saved_dataset_and_hub_code_path(tmp_path, tokenizer):
    """A JSONL file, a `save_to_disk` directory and a dataset folder read by `load_dataset` (the
    hub-id code path) give the same encoded pairs."""
    import datasets

    from rlhf_plugins.stages.dpo.data import load_preference_rows

    file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", PAIRS)
    encoded = []
    for source in (file, tmp_path / "saved", tmp_path / "hub"):
        rows, _ = load_preference_rows(DPOSettings(dataset=str(source)))
        encoded.append(encode_pairs(rows, tokenizer)[0].to_list())
    assert encoded[0] == encoded[1] == encoded[2] and len(encoded[0]) == len(PAIRS)


def test_bad_rows_name_the_row(tmp_path, tokenizer):
    rows = PAIRS[:2] + [{"prompt": "Hi", "chosen": "Yo"}]
    with pytest.raises(DataError, match=r"row 3: missing field\(s\) rejected"):
        encode_pairs(rows, tokenizer, where="pairs.jsonl")
    class Nothing:
        name = "nothing"
        description = "trains no token (test component)"

        def mask(self, encoded):
            return [0] * len(encoded.input_ids)

    with pytest.raises(DataError, match="row 1: .*no completion token is trained"):
        encode_pairs(PAIRS[:1], tokenizer, masking=Nothing())


# --- the loss the trainer optimises ---------------------------------------------------------------

@pytest.mark.parametrize("loss, options, rpo_alpha", [
    ("sigmoid", {"beta": 0.5}, 0.0),
    ("ipo", {"beta": 0.3}, 0.0),
    ("robust", {"label_smoothing": 0.2}, 0.7),
    ("simpo", {"beta": 2.0, "gamma": 0.3}, 0.0),
])
def test_trainer_loss_is_the_component_on_the_same_logps(tmp_path, tiny_dir, loss, options, rpo_alpha):
    """compute_loss = the component's mean per-pair loss (+ rpo_alpha * mean chosen-token NLL) on
    log-probs computed here: policy with its LoRA adapter, reference with it disabled (trained a
    step first so the two differ); a reference_free loss runs no reference forward."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    settings = DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA, loss=loss,
                           loss_options=options, rpo_alpha=rpo_alpha, eval_before=False)
    prepared = prepare_dpo(settings, dict(FAST_TRL, max_steps=1), tmp_path / "out")
    trainer = prepared.trainer
    trainer.train()
    model = trainer.model
    assert "ref" not in model.peft_config  # the reference is the base, not a copied adapter
    rows = [prepared.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    if trainer.reference_free:
        def no_reference(*args, **kwargs):
            raise AssertionError("a reference forward ran for a reference_free loss")
        trainer.compute_ref_log_probs = no_reference
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        ids, att, mask = hand_batch(rows, ("chosen", "rejected"), prepared.tokenizer.pad_token_id)
        logps, per_token = completion_logps(model, ids, att, mask)
        with model.disable_adapter():
            ref, _ = completion_logps(model, ids, att, mask)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    lengths = mask[:, 1:].sum(-1).float().chunk(2)
    component = registry().preference_losses.get(loss, **options)
    want = component(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=lengths[0],
                     rejected_lengths=lengths[1]).losses.mean()
    if rpo_alpha:
        chosen_mask = mask[:3, 1:].bool()
        want = want + rpo_alpha * -per_token[:3][chosen_mask].mean()
    assert (chosen - ref_chosen).abs().max() > 1e-4  # the adapter moved: policy != reference
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_weighted_losses_sum(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    settings = DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA,
                           loss=["sigmoid", "bco_pair"], loss_weights=[0.25, 2.0],
                           loss_options={"bco_pair": {"beta": 0.3}})
    prepared = prepare_dpo(settings, dict(FAST_TRL, beta=0.2), tmp_path / "out")
    (sig, w1), (bco, w2) = prepared.trainer.preference_losses
    assert (sig.name, sig.beta, w1, bco.name, bco.beta, w2) == ("sigmoid", 0.2, 0.25, "bco_pair", 0.3, 2.0)
    trainer = prepared.trainer
    batch = trainer.data_collator([prepared.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        f = trainer.policy_and_reference_logps(trainer.model, batch)
    args = (f["chosen_logps"], f["rejected_logps"], *f["ref"])
    assert got.item() == pytest.approx((0.25 * sig(*args).losses.mean()
                                        + 2.0 * bco(*args).losses.mean()).item(), rel=1e-5)


def test_precompute_ref_log_probs_are_the_base_models(tmp_path, tiny_dir):
    from rlhf_plugins.models import load_causal_lm

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    settings = DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA)
    prepared = prepare_dpo(settings, dict(FAST_TRL, precompute_ref_log_probs=True), tmp_path / "out")
    ds = prepared.trainer.train_dataset
    rows = [{k: ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_mask",
                                    "rejected_mask")} for i in range(len(ds))]
    base = load_causal_lm(str(tiny_dir)).eval()
    ids, att, mask = hand_batch(rows, ("chosen", "rejected"), prepared.tokenizer.pad_token_id)
    with torch.no_grad():
        ref, _ = completion_logps(base, ids, att, mask)
    chosen, rejected = ref.chunk(2)
    assert ds["ref_chosen_logps"] == pytest.approx(chosen.tolist(), rel=1e-4)
    assert ds["ref_rejected_logps"] == pytest.approx(rejected.tolist(), rel=1e-4)
    prepared.trainer.train()  # trains on the precomputed columns


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_full_fine_tuning_reference_is_the_starting_model(tmp_path, tiny_dir, loss):
    """Without LoRA the reference is a frozen copy of the starting model (TRL's), and none is
    kept for a reference_free loss; one step trains and moves the policy off the reference."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    prepared = prepare_dpo(DPOSettings(model=str(tiny_dir), dataset=str(data), loss=loss),
                           dict(FAST_TRL, max_steps=1), tmp_path / "out")
    trainer = prepared.trainer
    assert (trainer.ref_model is None) == (loss == "simpo")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    if trainer.ref_model is not None:
        for name, param in trainer.ref_model.named_parameters():
            assert torch.equal(param, before[name])


# --- a third-party loss by name -----------------------------------------------------------------

def test_a_third_party_preference_loss_is_used_by_name(tmp_path, tiny_dir, rlhf_plugin):
    from rlhf_plugins.sdk import PreferenceObjective, option
    from rlhf_plugins.testing import component_plugin

    calls = []

    @dataclass(frozen=True)
    class Squared(PreferenceObjective):
        name: ClassVar[str] = "squared_margin"
        description: ClassVar[str] = "(1 - beta * delta)^2 (test plugin)"
        target: float = option(1.0, help="the margin aimed at")

        def pair_losses(self, chosen: Any, rejected: Any, **lengths: Any) -> Any:
            calls.append(chosen.shape[0])
            return (self.target - self.beta * (chosen - rejected)) ** 2

    rlhf_plugin(component_plugin("preference_losses", Squared()))
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    result = run_dpo(DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA,
                                 loss="squared_margin", loss_options={"target": 2.0}),
                     FAST_TRL, tmp_path / "out")
    assert calls and result.metrics["loss"] == ["squared_margin"]
    first = next(e for e in result.metrics["log_history"] if "loss" in e)
    # at step 1 the policy is the reference (fresh adapter): every delta is 0, loss = target^2
    assert first["loss"] == pytest.approx(4.0, rel=1e-4)


# --- the CLI: adapter + template, metrics ---------------------------------------------------------

def test_cli_trains_and_the_adapter_loads_in_plain_peft_with_the_template(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "dpo.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "template": "zephyr",
        "masking": "final_turn", "lora": LORA, "eval_size": 2, "rpo_alpha": 0.5,
        "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 5e-2,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0})
    code, stdout, err = run_main(["dpo", "--config", cfg, "--output-dir", out])
    assert code == 0, err
    assert f"saved adapter to {out}" in stdout and "eval_preference_accuracy=" in stdout
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == registry().chat_templates.get("zephyr").jinja
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    m = json.loads((out / "dpo_metrics.json").read_text())
    assert m["eval_pairs"] == 2 and m["train_pairs"] == 6 and m["global_step"] == 3
    for key in ("eval_preference_accuracy_before", "eval_preference_accuracy",
                "eval_reward_margin_before", "eval_reward_margin", "train_reward_accuracy",
                "train_reward_margin", "eval_logp_accuracy_before"):
        assert isinstance(m[key], float), key
    # before training the policy is the reference: every implicit reward is 0, no pair won
    assert m["eval_preference_accuracy_before"] == 0.0 and m["eval_reward_margin_before"] == 0.0
    assert m["eval_reward_margin"] != 0.0
    assert any("nll_loss" in e for e in m["log_history"])
    record = json.loads((out / "stage_done.json").read_text()) if (out / "stage_done.json").exists() \
        else None
    assert record is None or record["stage"] == "dpo"


@pytest.mark.parametrize("config, where", [
    ({"loss": "sigmoidd"}, "loss: unknown preference_losses component 'sigmoidd'"),
    ({"loss_options": {"beta": -1}}, "loss_options: "),
    ({"loss_options": {"gama": 1}}, "loss_options: "),
    ({"loss": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "loss_weights: expected 2"),
    ({"loss_type": ["ipo"]}, "loss_type: not supported here: use `loss`"),
    ({"loss": "simpo", "precompute_ref_log_probs": True}, "precompute_ref_log_probs: "),
])
def test_bad_loss_config_is_one_line_exit_2(tmp_path, tiny_dir, config, where):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    cfg = write_yaml(tmp_path / "dpo.yaml", {"model": str(tiny_dir), "dataset": str(data), **config})
    code, _, err = run_main(["dpo", "--config", cfg, "--output-dir", tmp_path / "out"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"dpo.yaml: {where}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, where", [
    ({"loss": "nope"}, "dpo.loss: unknown preference_losses component 'nope'"),
    ({"loss_options": {"beta": 0}}, "dpo.loss_options: "),
])
def test_pipeline_names_dpo_loss(tmp_path, tiny_dir, section, where):
    cfg = write_yaml(tmp_path / "p.yaml", {"model": str(tiny_dir), "output_dir": str(tmp_path / "run"),
                                           "stages": ["sft", "dpo"], "dpo": section})
    code, _, err = run_main(["pipeline", cfg])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert where in err


def test_settings_reject_bad_shapes():
    with pytest.raises(ConfigError, match="loss: expected"):
        DPOSettings(loss=[])
    with pytest.raises(ConfigError, match="loss_options: with a list"):
        DPOSettings(loss=["sigmoid", "ipo"], loss_options={"beta": 0.1})
    with pytest.raises(ConfigError, match="rpo_alpha"):
        DPOSettings(rpo_alpha=-1)


# --- QLoRA ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_qlora_dpo_reference_is_the_4bit_base_with_the_adapter_disabled(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    settings = DPOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA,
                           quantization={"quant_type": "nf4"}, eval_before=False)
    prepared = prepare_dpo(settings, dict(FAST_TRL, max_steps=2), tmp_path / "out")
    trainer = prepared.trainer
    trainer.train()
    assert "ref" not in trainer.model.peft_config
    batch = trainer.data_collator([prepared.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        f = trainer.policy_and_reference_logps(trainer.model, batch)
        ids, att, mask = hand_batch([prepared.train_dataset[i] for i in range(2)],
                                    ("chosen", "rejected"), prepared.tokenizer.pad_token_id)
        with trainer.model.disable_adapter():
            ref, _ = completion_logps(trainer.model, ids, att, mask)
    assert torch.cat(f["ref"]).tolist() == pytest.approx(ref.tolist(), rel=1e-3)


# --- the pipeline ---------------------------------------------------------------------------------

def test_dpo_prepare_pairs_graded_samples(tmp_path):
    """Graded samples -> per prompt (passing, failing) pairs, at most max_pairs_per_prompt."""
    from rlhf_plugins.stage_api import StageContext
    from rlhf_plugins.stages.dpo.stage import DPOStage

    samples = []
    for p in range(6):
        for j, reward in enumerate([1.0, 0.0, 0.0, 1.0]):
            samples.append({"prompt_index": p, "completion_index": j,
                            "prompt": [{"role": "user", "content": f"q{p}"}],
                            "completion": [{"role": "assistant", "content": f"a{p}{j}"}],
                            "reward": reward})
    path = write_jsonl(tmp_path / "all.jsonl", samples)
    ctx = StageContext(name="dpo", policy="m", samples=str(path), data={"preference": "x",
                       "preference_eval": "y"}, section={"max_pairs_per_prompt": 3},
                       data_dir=tmp_path / "data")
    stage = DPOStage()
    stage.prepare(ctx)
    defaults = stage.defaults(ctx)
    train = [json.loads(x) for x in Path(defaults["dataset"]).read_text().splitlines()]
    held = [json.loads(x) for x in Path(defaults["eval_dataset"]).read_text().splitlines()]
    assert {r["prompt_index"] for r in held} == {0, 3} and len(train) == 4 * 3
    for r in train + held:
        assert r["chosen_reward"] == 1.0 and r["rejected_reward"] == 0.0
    assert defaults["merge"] is True and defaults["model"] == "m"
    # a section naming its own dataset gets neither the pairs nor the task's evaluation rows
    ctx.section = {"dataset": "mine.jsonl"}
    assert not {"dataset", "eval_dataset"} & set(stage.defaults(ctx))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_pipeline_sft_rejection_sampling_then_direct_alignment(tmp_path, stage):
    from test_pipeline import FAST, run_pipeline, tiny_config

    model = make_tiny_model_dir(tmp_path / "m")
    section = {"max_steps": 2, "per_device_train_batch_size": 2, "num_examples": 8, **FAST}
    if stage == "dpo":
        section["rpo_alpha"] = 0.5
    config = tiny_config(model, tmp_path / "run", stages=["sft", "rejection_sampling", stage],
                         **{stage: section})
    run_pipeline(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "rejection_sampling", stage]
    assert stage in summary["evals"]  # the pipeline evaluated the stage's policy
    record = summary["stages"][stage]
    assert record["metrics"]["global_step"] == 2 and record["components"]["template"] == "chatml"
    assert record["outputs"]["policy"].endswith("merged")


@pytest.mark.slow
def test_pipeline_sample_and_grade_only_then_dpo_starts_from_the_sft_model(tmp_path):
    """examples/direct_alignment.yaml's shape: rejection sampling with `finetune: false` only
    draws and grades samples; it is not evaluated again (its policy is the SFT model) and DPO
    trains the SFT model (on pairs of those samples; this random model's have none, so the
    task's pairs)."""
    from test_pipeline import FAST, run_pipeline, tiny_config

    model = make_tiny_model_dir(tmp_path / "m")
    config = tiny_config(model, tmp_path / "run", stages=["sft", "rejection_sampling", "dpo"],
                         dpo={"max_steps": 2, "per_device_train_batch_size": 2, "rpo_alpha": 0.5, **FAST})
    config["rejection_sampling"] = {**config["rejection_sampling"], "finetune": False}
    del config["rejection_sampling"]["sft"]
    pipeline, _ = run_pipeline(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["evals"]) == {"base", "sft", "dpo"}
    assert not (tmp_path / "run" / "rejection_sampling" / "sft").exists()
    sft_policy = summary["stages"]["sft"]["outputs"]["policy"]
    assert summary["stages"]["rejection_sampling"]["outputs"]["evaluate"] is False
    adapter = json.loads((tmp_path / "run" / "dpo" / "adapter_config.json").read_text())
    base = adapter["base_model_name_or_path"]
    assert (tmp_path / "run" / "dpo" / base).resolve() == Path(sft_policy).resolve()
