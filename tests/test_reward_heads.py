"""Reward head components: label construction, last attended token, every loss path, metrics."""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers_models import make_tiny_model_dir  # noqa: E402
from helpers_tokenizers import make_tokenizer  # noqa: E402

from rlhf_plugins import ConfigError, DataError, UnknownComponentError, registry  # noqa: E402

PROMPT = "What is 15% of 80?"
STEPS = ["15% = 0.15.", "0.15 * 80 = 1.2.", "The answer is 1.2."]  # the course notes' example


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")  # bos <|im_start|>, eos = pad = <|im_end|>


@pytest.fixture(scope="module")
def tpl():
    return registry().chat_templates.get("chatml")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rm-heads"), tokenizer=tok)


def _model(tiny_dir, tok, tpl, head, lora=True, seed=0):
    from rlhf_plugins.models import LoraSettings, apply_lora, load_causal_lm
    from rlhf_plugins.stages.reward_model.model import RewardModel

    backbone = load_causal_lm(tiny_dir)
    if lora:
        backbone = apply_lora(backbone, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(seed)
    model = RewardModel(backbone, head, tokenizer=tok, template=tpl, template_name="chatml")
    with torch.no_grad():  # a non-trivial head so every position matters
        for p in model.head_module.parameters():
            p.normal_(0, 0.5)
    return model


def _offsets(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


# --- label construction on the course notes' example -----------------------------------------

def test_prm_labels_sit_on_the_last_token_of_each_step(tok, tpl):
    head = registry().reward_heads.get("prm")
    feats = head.encode({"prompt": PROMPT, "steps": STEPS, "labels": [1, -1, -1]},
                        tokenizer=tok, template=tpl)
    text = tpl.render_text([{"role": "user", "content": PROMPT},
                            {"role": "assistant", "content": "\n\n".join(STEPS)}], tokenizer=tok)
    ids, offsets = _offsets(tok, text)
    # Independent reference: the token whose character span ends where each step ends.
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    expected, cursor = [], start
    for step in STEPS:
        end = text.index(step, cursor) + len(step)
        expected.append(next(i for i, (a, b) in enumerate(offsets) if a < end <= b))
        cursor = end
    assert feats["input_ids"] == ids[:len(feats["input_ids"])]
    assert tok.decode(feats["input_ids"][-1:]) == "<|im_end|>"  # cut after the end-of-turn token
    labelled = [i for i, lab in enumerate(feats["labels"]) if lab != -100]
    assert labelled == expected
    assert [feats["labels"][i] for i in labelled] == [2, 0, 0]  # +1 -> 2, -1 -> 0
    assert [i for i, m in enumerate(feats["step_mask"]) if m] == expected
    for pos, step in zip(expected, STEPS):
        assert tok.decode(feats["input_ids"][:pos + 1]).endswith(step)


def test_orm_label_is_broadcast_to_completion_tokens_and_end_of_turn(tok, tpl):
    head = registry().reward_heads.get("orm")
    row = {"prompt": [{"role": "user", "content": PROMPT}],
           "completion": [{"role": "assistant", "content": "\n\n".join(STEPS)}], "label": 0}
    feats = head.encode(row, tokenizer=tok, template=tpl)
    text = tpl.render_text(row["prompt"] + row["completion"], tokenizer=tok)
    ids, offsets = _offsets(tok, text)
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    eot = text.index("<|im_end|>", start) + len("<|im_end|>")
    expected = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= eot]
    labelled = [i for i, lab in enumerate(feats["labels"]) if lab != -100]
    assert labelled == expected and len(feats["input_ids"]) == expected[-1] + 1
    assert all(feats["labels"][i] == 0.0 for i in labelled)
    assert tok.convert_ids_to_tokens(feats["input_ids"][expected[-1]]) == "<|im_end|>"
    assert feats["score_mask"] == [int(lab != -100) for lab in feats["labels"]]
    feats1 = head.encode({**row, "label": 1}, tokenizer=tok, template=tpl)
    assert [feats1["labels"][i] for i in labelled] == [1.0] * len(labelled)


# --- last attended token ----------------------------------------------------------------------

def test_last_attended_token_with_pad_equal_eos_left_and_right(tok):
    from rlhf_plugins.head_data import last_attended_index, pad_batch

    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    feats = [{"input_ids": [5, 6, 7, eos]}, {"input_ids": [8, eos]}, {"input_ids": [9, 10, 11, 12, 13, eos]}]
    for side in ("right", "left"):
        batch = pad_batch(feats, tok.pad_token_id, side)
        idx = last_attended_index(batch["attention_mask"]).tolist()
        for row, i in zip(batch["input_ids"].tolist(), idx):
            assert row[i] == eos
        width = batch["input_ids"].shape[1]
        expected = [len(f["input_ids"]) - 1 for f in feats] if side == "right" else [width - 1] * 3
        assert idx == expected
    # "last non-pad token" (what sequence-classification models do) misses the eos here.
    right = pad_batch(feats, tok.pad_token_id, "right")
    non_pad = (right["input_ids"] != tok.pad_token_id).long()
    wrong = (torch.arange(right["input_ids"].shape[1]) * non_pad).argmax(-1).tolist()
    assert wrong == [len(f["input_ids"]) - 2 for f in feats]


def test_bt_scores_identical_for_left_right_padding_and_alone(tiny_dir, tok, tpl):
    from rlhf_plugins.head_data import pad_batch

    head = registry().reward_heads.get("bradley_terry")
    model = _model(tiny_dir, tok, tpl, head).eval()
    rows = [{"prompt": PROMPT, "completion": c} for c in ("12", "The answer is 12.", "\n\n".join(STEPS))]
    feats = [head.encode_for_scoring(r, tokenizer=tok, template=tpl) for r in rows]
    alone = [float(model.scores_for(torch.tensor([f["input_ids"]]))[0]) for f in feats]
    for side in ("right", "left"):
        batch = pad_batch(feats, tok.pad_token_id, side)
        got = model.scores_for(batch["input_ids"], batch["attention_mask"]).tolist()
        assert got == pytest.approx(alone, abs=1e-5)
    # and the score really is read at the end-of-turn token: changing the token before it moves it
    outs = model(input_ids=torch.tensor([feats[0]["input_ids"]]))
    assert float(outs[0, -1]) == pytest.approx(alone[0], abs=1e-6)
    assert float(outs[0, -2]) != pytest.approx(alone[0], abs=1e-6)


# --- loss paths on a tiny model ---------------------------------------------------------------

def _alone(model, ids):
    return model(input_ids=torch.tensor([ids]))[0]


def _grads_flow(model, loss):
    model.zero_grad()
    loss.backward()
    head_grad = sum(float(p.grad.abs().sum()) for p in model.head_module.parameters() if p.grad is not None)
    lora_grad = sum(float(p.grad.abs().sum()) for n, p in model.backbone.named_parameters()
                    if "lora_" in n and p.grad is not None)
    return head_grad > 0 and lora_grad > 0


PREFS = [{"prompt": PROMPT, "chosen": "15% of 80 is 12.\n\nThe answer is 12.",
          "rejected": "The answer is 1.2.", "margin": 1.5},
         {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.\n\nThe answer is 4.",
          "rejected": "2 + 2 = 5.\n\nThe answer is 5.", "margin": 0.5}]
RANKED = [{"prompt": PROMPT, "completions": ["The answer is 12.", "Hmm. The answer is 12.",
                                            "The answer is 1.2."]},
          {"prompt": "What is 2 + 2?", "completions": ["The answer is 4.", "The answer is 5."]}]


@pytest.mark.parametrize("loss", ["pairwise", "margin"])
def test_bt_pairwise_and_margin_loss(tiny_dir, tok, tpl, loss):
    head = registry().reward_heads.get("bradley_terry", loss=loss)
    model = _model(tiny_dir, tok, tpl, head)
    rows = PREFS if loss == "margin" else [{k: v for k, v in r.items() if k != "margin"} for r in PREFS]
    batch = head.collate(rows, tok, tpl)
    n = len(rows)
    assert batch["input_ids"].shape[0] == 2 * n  # TRL's layout: chosen block, then rejected block
    loss_value = head.compute_loss(model(batch["input_ids"], batch["attention_mask"]), batch)
    ref = 0.0
    for r in rows:
        f = head.encode(r, tokenizer=tok, template=tpl)
        c, j = (float(_alone(model, ids)[-1]) for ids in f["completions_ids"])
        ref += math.log1p(math.exp(j - c + r.get("margin", 0.0)))  # softplus form
    assert float(loss_value) == pytest.approx(ref / n, rel=1e-4)
    assert _grads_flow(model, loss_value)


@pytest.mark.parametrize("loss", ["balanced", "plackett_luce", "pairwise"])
def test_bt_ranked_losses(tiny_dir, tok, tpl, loss):
    head = registry().reward_heads.get("bradley_terry", loss=loss)
    model = _model(tiny_dir, tok, tpl, head)
    batch = head.collate(RANKED, tok, tpl)
    value = head.compute_loss(model(batch["input_ids"], batch["attention_mask"]), batch)
    per_prompt, all_pairs = [], []
    for r in RANKED:
        f = head.encode(r, tokenizer=tok, template=tpl)
        s = [float(_alone(model, ids)[-1]) for ids in f["completions_ids"]]
        pairs = [math.log1p(math.exp(s[b] - s[a])) for a in range(len(s)) for b in range(a + 1, len(s))]
        all_pairs += pairs
        if loss == "plackett_luce":  # -log prod_k exp(s_k) / sum_{j>=k} exp(s_j)
            per_prompt.append(-sum(s[k] - math.log(sum(math.exp(x) for x in s[k:]))
                                   for k in range(len(s) - 1)))
        else:
            per_prompt.append(sum(pairs) / len(pairs))
    ref = sum(all_pairs) / len(all_pairs) if loss == "pairwise" else sum(per_prompt) / len(per_prompt)
    assert float(value) == pytest.approx(ref, rel=1e-4)
    assert _grads_flow(model, value)


def test_plackett_luce_equals_pairwise_for_preference_rows(tiny_dir, tok, tpl):
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in PREFS]
    values = []
    for loss in ("pairwise", "plackett_luce", "balanced"):
        head = registry().reward_heads.get("bradley_terry", loss=loss)
        model = _model(tiny_dir, tok, tpl, head)
        batch = head.collate(rows, tok, tpl)
        values.append(float(head.compute_loss(model(batch["input_ids"], batch["attention_mask"]), batch)))
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)


def test_orm_loss_and_aggregations(tiny_dir, tok, tpl):
    head = registry().reward_heads.get("orm")
    model = _model(tiny_dir, tok, tpl, head)
    rows = [{"prompt": PROMPT, "completion": "\n\n".join(STEPS), "label": 0},
            {"prompt": PROMPT, "completion": "The answer is 12.", "label": 1}]
    batch = head.collate(rows, tok, tpl)
    outputs = model(batch["input_ids"], batch["attention_mask"])
    value = head.compute_loss(outputs, batch)
    terms, per_row = [], []
    for r in rows:
        f = head.encode(r, tokenizer=tok, template=tpl)
        logits = _alone(model, f["input_ids"])
        ps = [1 / (1 + math.exp(-float(logits[i]))) for i, m in enumerate(f["score_mask"]) if m]
        y = float(r["label"])
        terms += [-(y * math.log(p) + (1 - y) * math.log(1 - p)) for p in ps]
        per_row.append(ps)
    assert float(value) == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    expected = {"last": [ps[-1] for ps in per_row], "mean": [sum(ps) / len(ps) for ps in per_row],
                "min": [min(ps) for ps in per_row], "product": [math.prod(ps) for ps in per_row]}
    for agg, ref in expected.items():
        got = registry().reward_heads.get("orm", aggregation=agg).sequence_scores(outputs, batch)
        assert got.tolist() == pytest.approx(ref, rel=1e-4), agg
    assert _grads_flow(model, value)


def test_prm_loss_and_aggregations(tiny_dir, tok, tpl):
    head = registry().reward_heads.get("prm")
    model = _model(tiny_dir, tok, tpl, head)
    rows = [{"prompt": PROMPT, "steps": STEPS, "labels": [1, -1, -1]},
            {"prompt": "What is 2 + 2?", "steps": ["2 + 2 = 4.", "The answer is 4."], "labels": [1, 0]}]
    batch = head.collate(rows, tok, tpl)
    outputs = model(batch["input_ids"], batch["attention_mask"])
    value = head.compute_loss(outputs, batch)
    terms, p_correct = [], []
    for r in rows:
        f = head.encode(r, tokenizer=tok, template=tpl)
        logits = _alone(model, f["input_ids"])
        pos = [i for i, m in enumerate(f["step_mask"]) if m]
        ps = []
        for i, lab in zip(pos, r["labels"]):
            z = [float(x) for x in logits[i]]
            lse = math.log(sum(math.exp(x) for x in z))
            terms.append(lse - z[lab + 1])
            ps.append(math.exp(z[2] - lse))
        p_correct.append(ps)
    assert float(value) == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    expected = {"min": [min(p) for p in p_correct], "mean": [sum(p) / len(p) for p in p_correct],
                "product": [math.prod(p) for p in p_correct], "last": [p[-1] for p in p_correct]}
    for agg, ref in expected.items():
        got = registry().reward_heads.get("prm", aggregation=agg).sequence_scores(outputs, batch)
        assert got.tolist() == pytest.approx(ref, rel=1e-4), agg
    assert head.step_predictions(outputs, batch) == [
        [max(range(3), key=lambda c: float(_alone(model, f["input_ids"])[i][c])) - 1
         for i, m in enumerate(f["step_mask"]) if m]
        for f in (head.encode(r, tokenizer=tok, template=tpl) for r in rows)]
    assert _grads_flow(model, value)


def test_prm_custom_delimiter(tok, tpl):
    head = registry().reward_heads.get("prm", delimiter="\n")
    f = head.encode({"prompt": PROMPT, "steps": STEPS, "labels": [1, 1, 0]}, tokenizer=tok, template=tpl)
    pos = [i for i, m in enumerate(f["step_mask"]) if m]
    assert len(pos) == 3 and all(tok.decode(f["input_ids"][:p + 1]).endswith(s) for p, s in zip(pos, STEPS))
    assert "\n\n" not in tok.decode(f["input_ids"])  # steps joined with the configured delimiter


def test_value_loss_with_and_without_clip(tiny_dir, tok, tpl):
    head = registry().reward_heads.get("value")
    model = _model(tiny_dir, tok, tpl, head)
    rows = [{"prompt": PROMPT, "completion": "The answer is 12.", "reward": 0.73},
            {"prompt": PROMPT, "completion": "The answer is 1.2.", "reward": -1.0}]
    batch = head.collate(rows, tok, tpl)
    values = model(batch["input_ids"], batch["attention_mask"])
    loss = head.compute_loss(values, batch)
    sq = []
    for r in rows:
        f = head.encode(r, tokenizer=tok, template=tpl)
        v = _alone(model, f["input_ids"])
        sq += [(float(v[i]) - r["reward"]) ** 2 for i, m in enumerate(f["mask"]) if m]
    assert float(loss) == pytest.approx(0.5 * sum(sq) / len(sq), rel=1e-4)
    old = values.detach() + 1.0
    clipped = registry().reward_heads.get("value", clip=0.2)
    got = clipped.compute_loss(values, {**batch, "old_values": old})
    v, R, m = values.detach(), batch["returns"], batch["mask"].float()
    ref = 0.5 * ((torch.maximum((v - R) ** 2, (old + (v - old).clamp(-0.2, 0.2) - R) ** 2) * m).sum() / m.sum())
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    assert _grads_flow(model, loss)


# --- data validation and options --------------------------------------------------------------

@pytest.mark.parametrize("head_name,row,needle", [
    ("bradley_terry", {"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
    ("bradley_terry", {"prompt": "q", "chosen": "a", "rejected": ""}, "empty completion"),
    ("bradley_terry", {"prompt": "q", "completions": ["only one"]}, "at least 2"),
    ("orm", {"prompt": "q", "completion": "a", "label": 2}, "label"),
    ("orm", {"prompt": "q", "completion": "   ", "label": 1}, "empty completion"),
    ("prm", {"prompt": "q", "steps": ["a", "b"], "labels": [1]}, "1 labels for 2 steps"),
    ("prm", {"prompt": "q", "steps": ["a", "b"], "labels": [1, 5]}, "unknown step label"),
    ("prm", {"prompt": "q", "steps": ["a", ""], "labels": [1, 1]}, "empty step"),
])
def test_bad_rows_raise_data_error(tok, tpl, head_name, row, needle):
    with pytest.raises(DataError, match=needle):
        registry().reward_heads.get(head_name).encode(row, tokenizer=tok, template=tpl)


def test_chosen_equal_rejected_after_truncation(tok, tpl):
    head = registry().reward_heads.get("bradley_terry")
    row = {"prompt": "q", "chosen": "The answer is 12. Yes.", "rejected": "The answer is 12. No."}
    head.encode(row, tokenizer=tok, template=tpl)  # fine without truncation
    with pytest.raises(DataError, match="chosen == rejected after rendering/truncation"):
        head.encode(row, tokenizer=tok, template=tpl, max_length=12)


def test_encode_rows_drops_with_count_or_rejects_in_strict_mode(tok, tpl, caplog):
    from rlhf_plugins.stages.reward_model.data import encode_rows

    head = registry().reward_heads.get("prm")
    rows = [{"prompt": "q", "steps": ["a", "b"], "labels": [1, -1]},
            {"prompt": "q", "steps": ["a", "b"], "labels": [1]},
            {"prompt": "q", "steps": ["c"], "labels": [7]},
            {"prompt": "q", "steps": ["d"], "labels": [0]}]
    with caplog.at_level("WARNING"):
        out = encode_rows(rows, head, tok, tpl, where="steps.jsonl")
    assert out.kept == [0, 3] and out.dropped == 2
    assert out.first_error.startswith("steps.jsonl row 2: labels: 1 labels for 2 steps")  # 1-based
    assert "dropped 2 of 4 rows" in caplog.text and "steps.jsonl row 2" in caplog.text
    with pytest.raises(DataError, match="steps.jsonl row 2: labels"):
        encode_rows(rows, head, tok, tpl, strict=True, where="steps.jsonl")
    with pytest.raises(DataError, match="no usable rows"):
        encode_rows(rows[1:3], head, tok, tpl)


def test_head_options_are_validated():
    reg = registry().reward_heads
    assert reg.get("bradley_terry", loss="margin").options["loss"] == "margin"
    assert reg.get("bradley_terry").options["loss"] == "pairwise"  # configure returns a copy
    with pytest.raises(ConfigError, match="loss must be one of"):
        reg.get("bradley_terry", loss="hinge")
    with pytest.raises(ConfigError, match="did you mean 'aggregation'"):
        reg.get("orm", agregation="min")
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        reg.get("prm", aggregation="max")
    with pytest.raises(ConfigError, match="clip"):
        reg.get("value", clip=-1)
    with pytest.raises(UnknownComponentError):
        reg.get("bradley_terri")


def test_bt_head_starts_at_zero_so_untrained_pairs_tie(tiny_dir, tok, tpl):
    """The default head scores every row 0 (pairwise accuracy exactly 0.5, ties counted half);
    two Adam steps on one pair order it; `init: random` keeps nn.Linear's draw."""
    from rlhf_plugins.models import LoraSettings, apply_lora, load_causal_lm
    from rlhf_plugins.stages.reward_model.data import pairwise_accuracy
    from rlhf_plugins.stages.reward_model.model import RewardModel

    head = registry().reward_heads.get("bradley_terry")
    assert head.options["init"] == "zero"
    backbone = apply_lora(load_causal_lm(tiny_dir), LoraSettings(r=4, alpha=8, dropout=0.0))
    model = RewardModel(backbone, head, tokenizer=tok, template=tpl, template_name="chatml")
    pair = PREFS[1]
    ids = [head.encode_for_scoring({"prompt": pair["prompt"], "completion": pair[k]},
                                   tokenizer=tok, template=tpl)["input_ids"] for k in ("chosen", "rejected")]
    before = [float(model.scores_for(torch.tensor([i]))[0]) for i in ids]
    assert before == [0.0, 0.0] and pairwise_accuracy([before[0]], [before[1]]) == 0.5
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = head.collate([pair], tokenizer=tok, template=tpl, pad_token_id=tok.pad_token_id)
    for _ in range(2):
        opt.zero_grad()
        head.compute_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                          batch).backward()
        opt.step()
    after = [float(model.scores_for(torch.tensor([i]))[0]) for i in ids]
    assert after[0] > after[1]
    torch.manual_seed(0)
    random_head = registry().reward_heads.get("bradley_terry", init="random").build_module(8)
    assert float(random_head.score.weight.abs().sum()) > 0
    with pytest.raises(ConfigError, match="init must be one of"):
        registry().reward_heads.get("bradley_terry", init="normal")


# --- metrics ----------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    from rlhf_plugins.stages.reward_model.data import (outcome_metrics, pairwise_accuracy,
                                                       step_metrics)

    assert pairwise_accuracy([1.0, 2.0, 0.0, 3.0], [0.0, 2.0, 1.0, 1.0]) == pytest.approx(2.5 / 4)
    # prompt a: scores 0.9 (correct), 0.2 (wrong), 0.9 (wrong) -> top-1 tie: 0.5; pairs: (c,w1)=1, (c,w2)=0.5
    # prompt b: 0.1 (wrong), 0.8 (correct) -> top-1 1; pair 1.   prompt c: single row, ignored
    m = outcome_metrics([0.9, 0.2, 0.9, 0.1, 0.8, 0.7], [1, 0, 0, 0, 1, 1], ["a", "a", "a", "b", "b", "c"])
    assert m["best_of_n_top1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["best_of_n_random_baseline"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["within_prompt_pairwise_accuracy"] == pytest.approx(2.5 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)  # only the wrong 0.9 is misclassified at 0.5
    s = step_metrics([[1, -1, -1], [1, 1], [1, 1, -1]], [[1, -1, -1], [1, -1], [1, 1, 1]])
    assert s["step_accuracy"] == pytest.approx(6 / 8)
    # first errors: true 1 / 1 / -1, predicted 1 / -1 / 2 -> erroneous 1/2, correct 0/1
    assert s["first_error_accuracy"] == pytest.approx(1 / 3)
    assert s["first_error_accuracy_erroneous"] == 0.5 and s["first_error_accuracy_correct"] == 0.0
    assert s["first_error_f1"] == 0.0


def test_score_sorts_by_length_but_keeps_input_order(tiny_dir, tok, tpl):
    from rlhf_plugins.stages.reward_model.scoring import score

    head = registry().reward_heads.get("bradley_terry")
    model = _model(tiny_dir, tok, tpl, head).eval()
    rows = [{"prompt": PROMPT, "completion": "x" * n} for n in (3, 40, 1, 25, 9, 60, 2)]
    alone = [score(model, [r], batch_size=1, progress=False)[0] for r in rows]
    got, stats = score(model, rows, batch_size=3, progress=False, return_stats=True)
    assert got == pytest.approx(alone, abs=1e-5)
    unsorted, ustats = score(model, rows, batch_size=3, sort_by_length=False, progress=False,
                             return_stats=True)
    assert unsorted == pytest.approx(alone, abs=1e-5)
    assert stats["padded_tokens"] < ustats["padded_tokens"] and stats["tokens"] == ustats["tokens"]


def test_score_names_a_bad_row_by_its_number_or_its_files_line(tiny_dir, tok, tpl, tmp_path):
    """1-based, as every other row error: the 2nd row is `score: row 2`; rows of a data file
    (`where`) are named by the file's line, blank lines counted."""
    from rlhf_plugins.errors import DataError
    from rlhf_plugins.stages.reward_model.scoring import score

    model = _model(tiny_dir, tok, tpl, registry().reward_heads.get("bradley_terry")).eval()
    rows = [{"prompt": PROMPT, "completion": "yes"}, {"prompt": PROMPT}]
    with pytest.raises(DataError, match=r"^score: row 2: "):
        score(model, rows, progress=False)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=rf"^{data} row 4: "):
        score(model, rows, progress=False, where=str(data))
