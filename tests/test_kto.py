"""The `kto` stage: unpaired rows encoded by our template + masking plugins (checked by hand), the
KTO loss TRL's trainer computes on our masks (checked against the paper's formula on log-probs
computed here), the CLI + saved template, rows from graded samples, bad configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_bad_inputs import run_main, write_jsonl, write_yaml
from helpers_direct import completion_logps, hand_batch, token_ids
from helpers_models import make_tiny_model_dir
from rlhf_plugins import registry
from rlhf_plugins.stages.kto.data import encode_unpaired, labelled_samples
from rlhf_plugins.stages.kto.run import prepare_kto
from rlhf_plugins.stages.kto.settings import KTOSettings

torch = pytest.importorskip("torch")

FAST_TRL = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=2,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                gradient_checkpointing=False, bf16=False, seed=0)
LORA = {"r": 2, "alpha": 4, "dropout": 0.0}
ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
         "completion": [{"role": "assistant", "content": f"The answer is {i + 1 + (i % 2) * 5}."}],
         "label": i % 2 == 0} for i in range(8)]

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("kto-model"), hidden_size=64,
                               intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from rlhf_plugins.models import load_tokenizer

    return load_tokenizer(tiny_dir)



def test_unpaired_row_mask_by_hand_and_pairs_are_unpaired(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    nl = token_ids(tokenizer, "\n")
    rows = [{"prompt": "Sum?", "completion": "Four", "label": True},
            {"prompt": "Sum?", "chosen": "Four", "rejected": "Five"}]
    ds, dropped = encode_unpaired(rows, tokenizer, "chatml", "final_turn")
    prompt = [start] + token_ids(tokenizer, "user\nSum?") + [end] + nl + [start] + token_ids(tokenizer, "assistant\n")
    assert dropped.dropped == 0 and len(ds) == 3
    for row, text, label in zip(ds, ("Four", "Four", "Five"), (True, True, False)):
        content = token_ids(tokenizer, text)
        assert row["prompt_ids"] == prompt and row["label"] is label
        assert row["completion_ids"] == content + [end] + nl
        assert row["completion_mask"] == [1] * len(content) + [1, 0]  # EOT trained, \n not


def test_trl_kto_loss_runs_on_our_masks(tmp_path, tiny_dir):
    """TRL's KTO loss on a batch = the paper's formula (Eq. 7, KL from the rotated completions)
    on log-probs computed here from our columns: policy with its adapter, reference with it
    disabled (after a training step, so they differ)."""
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    settings = KTOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA, eval_before=False)
    beta, wd, wu = 0.3, 1.5, 0.5
    prepared = prepare_kto(settings, dict(FAST_TRL, max_steps=1, beta=beta, desirable_weight=wd,
                                          undesirable_weight=wu), tmp_path / "out")
    trainer = prepared.trainer
    trainer.train()
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(4)]
    # the KL completions are the completions rotated by one within the batch, masks alongside
    assert [r["KL_completion_ids"] for r in rows] == [rows[3]["completion_ids"]] + [
        r["completion_ids"] for r in rows[:3]]
    assert [r["KL_completion_mask"] for r in rows] == [rows[3]["completion_mask"]] + [
        r["completion_mask"] for r in rows[:3]]
    assert "ref" not in trainer.model.peft_config
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    pad = prepared.tokenizer.pad_token_id
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        main, kl_batch = hand_batch(rows, ["completion"], pad), hand_batch(rows, ["KL_completion"], pad)
        assert torch.equal(batch["completion_mask"], main[2])
        assert torch.equal(batch["KL_completion_mask"], kl_batch[2])
        logps, kl_logps = completion_logps(model, *main)[0], completion_logps(model, *kl_batch)[0]
        with model.disable_adapter():
            ref, ref_kl = completion_logps(model, *main)[0], completion_logps(model, *kl_batch)[0]
    kl = (kl_logps - ref_kl).mean().clamp(min=0)
    labels = torch.tensor([r["label"] for r in rows])
    ratio = logps - ref
    chosen = wd * (1 - torch.sigmoid(beta * (ratio[labels] - kl)))
    rejected = wu * (1 - torch.sigmoid(beta * (kl - ratio[~labels])))
    assert ratio.abs().max() > 1e-4
    assert got == pytest.approx(torch.cat([chosen, rejected]).mean().item(), rel=1e-4, abs=1e-6)


def test_cli_trains_and_the_adapter_loads_in_plain_peft_with_the_template(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "kto.yaml", {
        "model": str(tiny_dir), "dataset": str(data), "template": "zephyr", "masking": "final_turn",
        "lora": LORA, "eval_size": 2, "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": 5e-2, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "seed": 0})
    code, stdout, err = run_main(["kto", "--config", cfg, "--output-dir", out])
    assert code == 0, err
    assert f"saved adapter to {out}" in stdout
    assert AutoTokenizer.from_pretrained(out).chat_template == registry().chat_templates.get("zephyr").jinja
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    m = json.loads((out / "kto_metrics.json").read_text())
    assert m["train_rows"] == 6 and m["eval_rows"] == 2 and m["global_step"] == 2
    assert isinstance(m["eval_loss_before"], float) and isinstance(m["eval_loss"], float)


@pytest.mark.parametrize("config, where", [
    ({"masking": "final"}, "'final'"),
    ({"per_device_train_batch_size": 1}, "kto.yaml: per_device_train_batch_size: "),
    ({"train_sampling_strategy": "random"}, "kto.yaml: train_sampling_strategy: "),
    ({"chat_template_path": "x.jinja"}, "kto.yaml: chat_template_path: unknown field (did you mean 'template'?)"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, tiny_dir, config, where):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = write_yaml(tmp_path / "kto.yaml", {"model": str(tiny_dir), "dataset": str(data), **config})
    code, _, err = run_main(["kto", "--config", cfg, "--output-dir", tmp_path / "out"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and where in err, err
    assert not (tmp_path / "out").exists()


def test_graded_samples_are_labelled_by_the_verifier(tmp_path):
    from rlhf_plugins.stage_api import StageContext
    from rlhf_plugins.stages.kto.stage import KTOStage

    samples = [{"prompt_index": p, "completion_index": j, "prompt": [{"role": "user", "content": f"q{p}"}],
                "completion": [{"role": "assistant", "content": f"a{p}{j}"}],
                "reward": [1.0, 0.0, None][j]} for p in range(4) for j in range(3)]
    train, held = labelled_samples(samples, min_reward=0.5)
    assert [r["label"] for r in train] == [True, False] * 2  # ungraded (None) samples left out
    assert {r["prompt_index"] for r in held} == {0, 3} and len(held) == 4
    ctx = StageContext(name="kto", policy="m", samples=str(write_jsonl(tmp_path / "all.jsonl", samples)),
                       data={"preference": "x", "preference_eval": "y"}, data_dir=tmp_path / "data")
    stage = KTOStage()
    stage.prepare(ctx)
    defaults = stage.defaults(ctx)
    assert defaults["dataset"].endswith("kto_samples_train.jsonl")
    assert defaults["eval_dataset"].endswith("kto_samples_heldout.jsonl")
    written = [json.loads(x) for x in Path(defaults["dataset"]).read_text().splitlines()]
    assert written == train


# --- reference: precomputed, and QLoRA's 4-bit base with the adapter disabled ------------------

def test_precompute_ref_log_probs_are_the_base_models(tmp_path, tiny_dir):
    """`precompute_ref_log_probs: true`: TRL's one reference pass stores, per row, the summed
    log-probs of our masked completion tokens under the base model (computed here with a plain
    forward), and training runs on those columns."""
    from rlhf_plugins.models import load_causal_lm

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    settings = KTOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA, eval_before=False)
    prepared = prepare_kto(settings, dict(FAST_TRL, precompute_ref_log_probs=True), tmp_path / "out")
    ds = prepared.trainer.train_dataset
    assert "ref_logps" in ds.column_names
    rows = [ds[i] for i in range(len(ds))]
    base = load_causal_lm(str(tiny_dir)).eval()
    with torch.no_grad():
        ref, _ = completion_logps(base, *hand_batch(rows, ["completion"], prepared.tokenizer.pad_token_id))
    assert ds["ref_logps"] == pytest.approx(ref.tolist(), rel=1e-4)
    prepared.trainer.train()  # trains on the precomputed column


@pytest.mark.slow
def test_qlora_kto_reference_is_the_4bit_base_with_the_adapter_disabled(tmp_path, tiny_dir):
    """QLoRA: no second model and no reference adapter copy; the reference log-probs TRL uses are
    the 4-bit policy's with its adapter disabled, after training moved the adapter."""
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    settings = KTOSettings(model=str(tiny_dir), dataset=str(data), lora=LORA,
                           quantization={"quant_type": "nf4"}, eval_before=False)
    prepared = prepare_kto(settings, dict(FAST_TRL, max_steps=2), tmp_path / "out")
    trainer = prepared.trainer
    trainer.train()
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    pad = prepared.tokenizer.pad_token_id
    with torch.no_grad():
        got, _ = trainer.compute_ref_log_probs(trainer.model, batch)
        ids, att, mask = hand_batch(rows, ["completion"], pad)
        with trainer.model.disable_adapter():
            ref, _ = completion_logps(trainer.model, ids, att, mask)
        policy, _ = completion_logps(trainer.model, ids, att, mask)
    assert got.tolist() == pytest.approx(ref.tolist(), abs=1e-2)
    # the adapter moved (by ~0.27 here): 10x the tolerance, so the policy would not pass as the reference
    assert (policy - ref).abs().max() > 0.1
