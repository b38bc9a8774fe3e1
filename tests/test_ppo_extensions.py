"""Issue 15 in the PPO trainer: plugin policy losses, estimator capabilities (reward components,
greedy baseline), dense step rewards (functions and a PRM) and group filters (DAPO).

References are independent of the trainer: TRL's own GRPOTrainer ``_compute_loss`` on the same
batch (bit-equal loss and gradients), the pure math of :mod:`rlhf_plugins.advantage_math`,
:func:`rlhf_plugins.step_rewards.batch_token_rewards`, the textbook GAE recursion, and greedy
generations made by hand.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402
from test_ppo import K, _gae_reference, _rollout, _tokenizer, _trl_kwargs, vowel_reward  # noqa: E402

from rlhf_plugins import hookimpl  # noqa: E402
from rlhf_plugins.errors import ConfigError, UnknownComponentError  # noqa: E402
from rlhf_plugins.rewarding import completion_text  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("ppo-ext-model"), seed=3)


@pytest.fixture(scope="module")
def rows():
    from rlhf_plugins.data import synth

    return synth.rl_dataset(4, seed=0)


def _trainer(tiny_dir, rows, tmp_path, estimator="grpo", reward_funcs=None, trl=None, weights=None,
             **kwargs):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    args = build_grpo_config(_trl_kwargs(**(trl or {})), tmp_path / f"ours-{estimator}", weights,
                             advantage_estimator=estimator, **kwargs)
    return PolicyOptimizationTrainer(load_causal_lm(tiny_dir), reward_funcs or [vowel_reward], args,
                                     train_dataset=rows, processing_class=_tokenizer(tiny_dir))


def _loss_and_grads(trainer, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


# --------------------------------------------------------------------------------------------
# 1. policy_loss: ppo_clip reproduces GRPOTrainer exactly
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trl_options, loss_options, exact", [
    ({}, {}, True),  # TRL's default loss_type dapo: token_mean over the generation batch
    ({"loss_type": "grpo"}, {"agg": "seq_mean_token_mean"}, True),
    ({"loss_type": "dr_grpo"}, {"agg": "seq_mean_token_sum_norm"}, True),
    ({"beta": 0.04}, {}, False),  # TRL adds the KL per token before its sum: equal up to rounding
], ids=["dapo", "grpo", "dr_grpo", "dapo-beta"])
def test_ppo_clip_reproduces_grpo_trainer_loss_and_gradients(tiny_dir, rows, tmp_path, trl_options,
                                                             loss_options, exact):
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_plugins.models import load_causal_lm

    kwargs = _trl_kwargs(**trl_options)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none",
                      dataloader_pin_memory=False, **kwargs)
    plain = GRPOTrainer(load_causal_lm(tiny_dir), [vowel_reward], args, train_dataset=rows,
                        processing_class=_tokenizer(tiny_dir))
    inputs = _rollout(plain, rows)
    assert inputs["advantages"].abs().sum() > 0 and inputs["completion_mask"].sum() > 4
    # Off-policy old log-probs (as after an earlier update): ratios != 1, so the clip acts.
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps = plain._get_per_token_logps_and_entropies(plain.model, ids, attention,
                                                         inputs["completion_ids"].size(1))[0]
    generator = torch.Generator().manual_seed(0)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    ours_kwargs = {k: v for k, v in trl_options.items() if k != "loss_type"}
    ours = _trainer(tiny_dir, rows, tmp_path, "grpo", trl=ours_kwargs, policy_loss="ppo_clip",
                    policy_loss_options=loss_options)
    for name, value in plain.model.state_dict().items():  # same weights, same batch
        assert torch.equal(value, ours.model.state_dict()[name])
    expected_loss, expected_grads = _loss_and_grads(plain, inputs)
    loss, grads = _loss_and_grads(ours, inputs)
    assert set(grads) == set(expected_grads) and expected_loss != 0
    assert any(g.abs().sum() > 0 for g in expected_grads.values())
    if exact:
        assert torch.equal(loss, expected_loss)
        assert all(torch.equal(grads[n], expected_grads[n]) for n in grads)
    else:
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
        for n in grads:
            torch.testing.assert_close(grads[n], expected_grads[n], rtol=1e-5, atol=1e-7)
    logged = ours._metrics["train"]
    assert "entropy" in logged and logged["policy_loss/clip_frac"][-1] > 0


# --------------------------------------------------------------------------------------------
# Helpers: a restricted vocabulary makes steps (spaces) frequent in random completions
# --------------------------------------------------------------------------------------------

ALLOWED = ["a", "b", "e", "Ġ"]  # byte-level BPE: "Ġ" is the space


def _few_letters(tiny_dir) -> dict[str, Any]:
    """TRL generation_kwargs keeping only a few letters, the space and the end of turn."""
    tok = _tokenizer(tiny_dir)
    allowed = set(tok.convert_tokens_to_ids(ALLOWED)) | {tok.convert_tokens_to_ids("<|im_end|>")}
    return {"generation_kwargs": {"suppress_tokens": [i for i in range(len(tok)) if i not in allowed]},
            "max_completion_length": 8}


def a_count(prompts: list, completions: list, **_: Any) -> list[float]:
    """Number of 'a' in the completion."""
    return [float(completion_text(c).count("a")) for c in completions]


def step_reward(prompts: list, completions: list, **_: Any) -> list[Any]:
    """Step rewards: +1 at the end of the first word, (#a - 1) at the end; None when empty."""
    out: list[Any] = []
    for c in completions:
        text = completion_text(c)
        if not text.strip():
            out.append(None)
            continue
        words = text.split(" ")
        first = len(words[0]) if words[0] else len(text)
        out.append([(max(first, 1), 1.0), (len(text), text.count("a") - 1.0)])
    return out


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(before: dict[str, torch.Tensor], model) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


# --------------------------------------------------------------------------------------------
# Step rewards: validated with the function named; TRL sees their sum
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, message", [
    ([[(0, 1.0)], 1.0], "end_char_offset is not an integer >= 1"),
    ([[(2, float("nan"))], 1.0], "value is nan"),
    ([[(2, 1.0, 3)], 1.0], "not an \\(end_char_offset, value\\) pair"),
    ([[(1.5, 1.0)], None], "end_char_offset is not an integer"),
])
def test_bad_step_rewards_name_the_function(output, message):
    from rlhf_plugins.errors import DataError
    from rlhf_plugins.stages.ppo.options import validated_reward_function

    def my_steps(prompts, completions, **_):
        return output

    with pytest.raises(DataError, match=message) as info:
        validated_reward_function(my_steps)(prompts=["p", "p"], completions=["ab", "cd"])
    assert "my_steps" in str(info.value)


def test_step_rewards_are_summed_for_trl_and_kept_for_the_trainer():
    from rlhf_plugins.errors import DataError
    from rlhf_plugins.rewarding import call_reward_functions
    from rlhf_plugins.stages.ppo.options import validated_reward_function

    def steps(prompts, completions, **_):
        return [[(1, 0.5), (2, -2.0)], None, 3.0]

    wrapped = validated_reward_function(steps)
    assert wrapped(prompts=["p"] * 3, completions=["ab", "c", "d"]) == [-1.5, None, 3.0]
    assert wrapped.last_outputs == [[(1, 0.5), (2, -2.0)], None, 3.0]
    assert wrapped.last_texts == ["ab", "c", "d"]
    total, _ = call_reward_functions([steps], [2.0], ["p"] * 3, ["ab", "c", "d"], allow_step_rewards=True)
    assert total[0] == -3.0 and math.isnan(total[1]) and total[2] == 6.0
    with pytest.raises(DataError, match="non-number"):  # elsewhere (sampling, best-of-n) a list is an error
        call_reward_functions([steps], None, ["p"] * 3, ["ab", "c", "d"])


# --------------------------------------------------------------------------------------------
# 2. estimator capabilities: reward components (gdpo), greedy baseline (remax)
# --------------------------------------------------------------------------------------------

def test_gdpo_gets_reward_components_and_weights(tiny_dir, rows, tmp_path):
    from rlhf_plugins.advantage_math import gdpo

    def sometimes(prompts: list, completions: list, **_: Any) -> list[float | None]:
        return [None if i % 3 == 0 else float(len(completion_text(c)) % 3)
                for i, c in enumerate(completions)]

    trainer = _trainer(tiny_dir, rows, tmp_path, "gdpo", reward_funcs=[a_count, sometimes],
                       trl=_few_letters(tiny_dir), weights=[1.0, 0.5])
    out = _rollout(trainer, rows)
    components = trainer._last_rewards_per_func
    assert torch.isnan(components[:, 1]).any() and not torch.isnan(components[:, 0]).any()
    expected = gdpo(components, torch.tensor([1.0, 0.5]), K, mask=out["completion_mask"]).advantages
    assert out["advantages"].abs().sum() > 0
    torch.testing.assert_close(out["advantages"], expected.float(), atol=1e-6, rtol=1e-6)


def test_remax_gets_the_reward_of_a_greedy_completion_per_prompt(tiny_dir, rows, tmp_path):
    from trl.trainer.utils import pad

    trainer = _trainer(tiny_dir, rows, tmp_path, "remax")
    generations = []
    single_turn = trainer._generate_single_turn
    trainer._generate_single_turn = \
        lambda ids, *a, **k: generations.append(len(ids)) or single_turn(ids, *a, **k)
    out = _rollout(trainer, rows)
    assert generations == [len(rows) * K, len(rows)]  # the rollout, then one greedy per prompt
    rewards = trainer._total_rewards()
    baseline = rewards - out["advantages"]

    # the greedy completions, made by hand: one left-padded batch of the prompts, argmax decoding
    tok = trainer.processing_class
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    ids = pad([torch.tensor(p) for p in prompt_ids], padding_value=tok.pad_token_id, padding_side="left")
    attention = pad([torch.ones(len(p), dtype=torch.long) for p in prompt_ids], padding_value=0,
                    padding_side="left")
    with torch.no_grad():
        generated = trainer.model.generate(input_ids=ids, attention_mask=attention, do_sample=False,
                                           max_new_tokens=trainer.max_completion_length,
                                           eos_token_id=trainer.eos_token_ids,
                                           pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    texts = []
    for row in generated.tolist():
        cut = next((i for i, t in enumerate(row) if t in trainer.eos_token_ids), len(row) - 1)
        texts.append(tok.decode(row[:cut + 1], skip_special_tokens=True))
    expected = vowel_reward(None, [[{"role": "assistant", "content": t}] for t in texts])
    expected = torch.tensor([r for r in expected for _ in range(K)])
    torch.testing.assert_close(baseline, expected, atol=1e-6, rtol=0)
    torch.manual_seed(99)  # greedy: the same baseline whatever the sampling seed
    again = trainer._greedy_baseline_rewards([dict(row) for row in rows for _ in range(K)])
    torch.testing.assert_close(again, expected)
    assert trainer._metrics["train"]["greedy_baseline/reward_mean"]


# --------------------------------------------------------------------------------------------
# 3. dense step rewards
# --------------------------------------------------------------------------------------------

def _expected_tokens(trainer, out) -> torch.Tensor:
    from rlhf_plugins.step_rewards import batch_token_rewards

    raw, texts = trainer._last_reward_outputs[0]
    assert any(isinstance(r, list) and len(r) == 2 for r in raw)
    tokens, dense = batch_token_rewards(raw, out["completion_ids"], out["completion_mask"],
                                        trainer.processing_class, texts)
    assert dense
    return tokens


def _boundary_rows(out, tokens) -> list[tuple[int, int, int]]:
    """(row, first step-end token, last real token) of rows with two distinct step ends."""
    found = []
    for i, row in enumerate(tokens.tolist()):
        real = [t for t, m in enumerate(out["completion_mask"][i].tolist()) if m]
        ends = [t for t in real if row[t] != 0]
        if len(ends) == 2:
            found.append((i, ends[0], real[-1]))
    return found


def test_step_rewards_reach_reinforce_plus_plus_at_their_tokens(tiny_dir, rows, tmp_path):
    trainer = _trainer(tiny_dir, rows, tmp_path, "reinforce_plus_plus", reward_funcs=[step_reward],
                       trl=_few_letters(tiny_dir))
    out = _rollout(trainer, rows)
    tokens = _expected_tokens(trainer, out)
    mask = out["completion_mask"].bool()
    # returns-to-go (gamma = 1) by hand, then whitening over all real tokens of the batch
    returns = torch.zeros_like(tokens)
    for i in range(tokens.shape[0]):
        running = 0.0
        for t in reversed(range(tokens.shape[1])):
            if mask[i, t]:
                running += float(tokens[i, t])
                returns[i, t] = running
    real = returns[mask]
    expected = torch.where(mask, (returns - real.mean()) / (real.var() + 1e-8).sqrt(), torch.zeros(()))
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
    boundaries = _boundary_rows(out, tokens)
    assert boundaries, "no completion with two steps: the restricted vocabulary should give spaces"
    for i, end, last in boundaries:  # the advantage changes right after the first step's end
        assert out["advantages"][i, end] != out["advantages"][i, end + 1]
        assert end < last


def test_step_rewards_with_gae_follow_the_textbook_recursion_and_train(tiny_dir, rows, tmp_path):
    trainer = _trainer(tiny_dir, rows, tmp_path, "gae", reward_funcs=[step_reward],
                       trl=_few_letters(tiny_dir), lam=0.9)
    torch.nn.init.normal_(trainer.value_head.summary.weight, std=0.5)
    out = _rollout(trainer, rows)
    tokens = _expected_tokens(trainer, out)
    mask = out["completion_mask"]
    values = (out["old_values"] * mask).tolist()
    expected = torch.tensor(_gae_reference(tokens.tolist(), values, mask.tolist(), 1.0, 0.9))
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
    before = _trainable(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert any("rewards/step_reward/mean" in h for h in trainer.state.log_history)


def test_sequence_level_estimators_get_the_sum_of_step_rewards(tiny_dir, rows, tmp_path, caplog):
    from rlhf_plugins import registry

    trainer = _trainer(tiny_dir, rows, tmp_path, "rloo", reward_funcs=[step_reward],
                       trl=_few_letters(tiny_dir))
    with caplog.at_level(logging.INFO, logger="rlhf_plugins.stages.ppo.trainer"):
        out = _rollout(trainer, rows)
        _rollout(trainer, rows, seed=5)
    said = [r for r in caplog.records if "gets the sum of each completion's step rewards" in r.message]
    assert len(said) == 1  # once
    tokens = _expected_tokens(trainer, _rollout(trainer, rows))
    sums = tokens.nansum(dim=1)
    expected = registry().advantage_estimators.get("rloo")(sums, num_generations=K).advantages
    advantages = _rollout(trainer, rows)["advantages"]  # same seed as the tokens above
    per_row = torch.where(out["completion_mask"].bool(), advantages, torch.nan).nanmean(dim=1)
    torch.testing.assert_close(torch.nan_to_num(per_row), expected, atol=1e-5, rtol=1e-5)


def _make_prm_adapter(tiny_dir: Path, out: Path) -> Path:
    """A PRM artifact (LoRA adapter + 3-class step head) on the tiny base; steps end at each "a"
    (a frequent letter of the restricted vocabulary, so random completions have several)."""
    from peft import get_peft_model

    from rlhf_plugins import registry
    from rlhf_plugins.models import LoraSettings, load_causal_lm
    from rlhf_plugins.stages.reward_model.artifact import save_reward_model
    from rlhf_plugins.stages.reward_model.model import RewardModel

    peft_model = get_peft_model(load_causal_lm(tiny_dir), LoraSettings(r=4, alpha=8).to_peft())
    torch.manual_seed(7)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    rm = RewardModel(peft_model, registry().reward_heads.get("prm", delimiter="a"),
                     tokenizer=_tokenizer(tiny_dir), template=registry().chat_templates.get("chatml"),
                     base_model=str(tiny_dir))
    for p in rm.head_module.parameters():
        torch.nn.init.normal_(p, std=1.0)  # varied step predictions
    return save_reward_model(rm, out)


def test_a_prm_reward_adapter_gives_step_rewards_that_move_advantages_and_train(tiny_dir, rows, tmp_path):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo
    from rlhf_plugins.step_rewards import step_end_offsets

    artifact = _make_prm_adapter(tiny_dir, tmp_path / "prm")
    settings = PPOSettings(model=str(tiny_dir), reward_adapter=str(artifact), lora={"r": 4, "alpha": 8},
                           advantage_estimator="reinforce_plus_plus", prm_reward="probability")
    prepared = prepare_ppo(settings, _trl_kwargs(**_few_letters(tiny_dir)), tmp_path / "ppo",
                           train_dataset=rows)
    trainer = prepared.trainer
    out = _rollout(trainer, rows)
    raw, texts = trainer._last_reward_outputs[0]
    scored = [(r, t) for r, t in zip(raw, texts) if r is not None]
    assert scored and all(0.0 <= v <= 1.0 for r, _ in scored for _, v in r)  # P(correct) per step
    assert all([end for end, _ in r] == step_end_offsets(t, "a")[:len(r)] for r, t in scored)
    tokens = _expected_tokens(trainer, out)
    boundaries = _boundary_rows(out, tokens)
    assert boundaries, "no completion with two steps"
    for i, end, _ in boundaries:
        assert out["advantages"][i, end] != out["advantages"][i, end + 1]

    # `sign`: +1/0/-1 by the arg-max class, at the same offsets
    sign = prepare_ppo(PPOSettings(model=str(tiny_dir), reward_adapter=str(artifact), lora={"r": 4},
                                   advantage_estimator="reinforce_plus_plus", prm_reward="sign"),
                       _trl_kwargs(), tmp_path / "ppo-sign", train_dataset=rows).trainer
    sign_fn = sign.reward_funcs[0]
    signed = sign_fn(prompts=[rows[0]["prompt"]] * len(scored),
                     completions=[[{"role": "assistant", "content": t}] for _, t in scored])
    steps = sign_fn.last_outputs
    assert all(v in (-1.0, 0.0, 1.0) for s in steps for _, v in s)
    assert signed == [sum(v for _, v in s) for s in steps]  # TRL sees the sum of the steps
    assert all([e for e, _ in s] == [e for e, _ in r] for s, (r, _) in zip(steps, scored))

    before = _trainable(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert any("rewards/reward_adapter/mean" in h for h in trainer.state.log_history)


# --------------------------------------------------------------------------------------------
# 4. group filters (DAPO dynamic sampling)
# --------------------------------------------------------------------------------------------

def test_group_filter_drops_zero_variance_groups_from_estimate_and_loss(tiny_dir, rows, tmp_path):
    from rlhf_plugins import registry

    def first_groups_constant(prompts: list, completions: list, **_: Any) -> list[float]:
        """1.0 for the first two prompts' completions (zero variance), #a for the others."""
        return [1.0 if i < 2 * K else float(completion_text(c).count("a"))
                for i, c in enumerate(completions)]

    estimator = "reinforce_plus_plus_baseline"  # whitens over the batch: dropped rows must not count
    trainer = _trainer(tiny_dir, rows, tmp_path, estimator, reward_funcs=[first_groups_constant],
                       trl=_few_letters(tiny_dir), policy_loss="ppo_clip", group_filter="nonzero_variance")
    out = _rollout(trainer, rows)
    rewards = trainer._total_rewards()
    grouped = rewards.view(-1, K)
    keep_groups = (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0
    keep = keep_groups.repeat_interleave(K)
    assert not keep[:2 * K].any() and keep.any(), "the last two groups should vary (seeded)"
    dropped = ~keep
    assert torch.count_nonzero(out["completion_mask"][dropped]) == 0
    assert out["advantages"][dropped].abs().sum() == 0
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    metrics = trainer._metrics["train"]
    assert metrics["group_filter/dropped_fraction"][-1] == pytest.approx(float(dropped.sum()) / len(keep))

    # the estimator saw the kept groups only (its batch whitening ignores the dropped ones)
    ids, mask = out["completion_ids"], out["completion_mask"]
    full_mask = torch.zeros_like(mask)
    for i in range(len(ids)):  # the generated tokens up to the end of turn (what TRL masks in)
        row = ids[i].tolist()
        end = next((t for t, tok in enumerate(row) if tok in trainer.eos_token_ids), len(row) - 1)
        full_mask[i, :end + 1] = 1
    assert torch.equal(mask[keep], full_mask[keep])
    expected = registry().advantage_estimators.get(estimator)(rewards[keep], num_generations=K,
                                                              mask=full_mask[keep]).advantages
    torch.testing.assert_close(out["advantages"][keep], expected.float(), atol=1e-6, rtol=1e-6)

    # the loss normaliser counts the kept tokens only: same loss as on the kept rows alone
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, out)
    kept_inputs = {k: (v[keep] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in out.items()}
    loss_kept = trainer._compute_loss(trainer.model, kept_inputs)
    torch.testing.assert_close(loss, loss_kept, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. a third-party policy loss / estimator changes a PPO run with one config line
# --------------------------------------------------------------------------------------------

CALLS: list[str] = []


def _third_party_plugin() -> Any:
    from rlhf_plugins.policy_loss_base import PolicyObjective
    from rlhf_plugins.policy_objectives import aggregate
    from rlhf_plugins.sdk import AdvantageEstimator, Advantages, PolicyLoss, option

    @dataclass(frozen=True)
    class WeightedPG(PolicyObjective):
        """-scale * A * logp (a REINFORCE surrogate with a weight)."""

        name: ClassVar[str] = "test_weighted_pg"
        description: ClassVar[str] = "test: -scale * A * logp"
        scale: float = option(-3.0, help="weight of the surrogate")

        def objective_function(self):
            def weighted_pg(log_probs, old_log_probs, advantages, mask, *, agg, ref_log_probs=None,
                            kl_coef=0.0, norm_constant=None, scale):
                CALLS.append("loss")
                adv = advantages[:, None] if advantages.dim() == 1 else advantages
                per_token = -scale * adv * log_probs
                return PolicyLoss(aggregate(per_token, mask, agg, norm_constant=norm_constant),
                                  {"scale": float(scale)})
            return weighted_pg

    @dataclass(frozen=True)
    class AboveMean(AdvantageEstimator):
        """+1 above the batch mean reward, -1 below."""

        name: ClassVar[str] = "test_above_mean"
        description: ClassVar[str] = "test: sign(r - batch mean)"

        def __call__(self, rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95):
            CALLS.append("estimator")
            return Advantages(torch.sign(rewards - rewards.nanmean()).nan_to_num(0.0))

    class ThirdParty:
        @hookimpl
        def register_policy_losses(self, register):
            register(WeightedPG())

        @hookimpl
        def register_advantage_estimators(self, register):
            register(AboveMean())

        @hookimpl
        def register_reward_functions(self, register):
            register(a_count, name="test_a_count")

    return ThirdParty()


def _run_yaml(tiny_dir, tmp_path, name: str, line: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file

    from rlhf_plugins.stages.ppo.train import ppo_from_config

    trl = _few_letters(tiny_dir)
    text = (f"model: {tiny_dir}\nnum_examples: 4\nreward_functions: [test_a_count]\n"
            "advantage_estimator: grpo\nmax_steps: 1\nper_device_train_batch_size: 4\n"
            f"num_generations: {K}\nmax_completion_length: {trl['max_completion_length']}\n"
            "learning_rate: 0.05\nseed: 0\nbeta: 0.0\nsave_strategy: 'no'\nlogging_steps: 1\n"
            f"gradient_checkpointing: false\ngeneration_kwargs: {json.dumps(trl['generation_kwargs'])}\n")
    if line.startswith("advantage_estimator:"):
        text = text.replace("advantage_estimator: grpo\n", line + "\n")
    elif line:
        text += line + "\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    result = ppo_from_config(path, tmp_path / name)
    return result.metrics, load_file(str(tmp_path / name / "model.safetensors"))


def test_third_party_loss_and_estimator_change_a_run_with_one_config_line(tiny_dir, tmp_path, rlhf_plugin):
    rlhf_plugin(_third_party_plugin())
    base, base_weights = _run_yaml(tiny_dir, tmp_path, "base", "")
    again, again_weights = _run_yaml(tiny_dir, tmp_path, "again", "")
    assert all(torch.equal(base_weights[k], again_weights[k]) for k in base_weights)  # deterministic
    assert base["policy_loss"] == "trl:dapo" and CALLS == []

    loss_metrics, loss_weights = _run_yaml(tiny_dir, tmp_path, "loss", "policy_loss: test_weighted_pg")
    assert loss_metrics["policy_loss"] == "test_weighted_pg" and CALLS.count("loss") >= 1
    assert any(h.get("policy_loss/scale") == -3.0 for h in loss_metrics["log_history"])
    assert any(not torch.equal(base_weights[k], loss_weights[k]) for k in base_weights)

    CALLS.clear()
    est_metrics, est_weights = _run_yaml(tiny_dir, tmp_path, "est", "advantage_estimator: test_above_mean")
    assert est_metrics["advantage_estimator"] == "test_above_mean" and CALLS == ["estimator"]
    assert any(not torch.equal(base_weights[k], est_weights[k]) for k in base_weights)


# --------------------------------------------------------------------------------------------
# Configuration errors come before any model loads
# --------------------------------------------------------------------------------------------

from test_ppo import no_model_loading  # noqa: E402,F401  (the fixture)


@pytest.mark.parametrize("settings, trl, error, match", [
    ({"policy_loss": "ppo_clipp"}, {}, UnknownComponentError, "ppo_clipp"),
    ({"policy_loss": "ppo_clip", "policy_loss_options": {"clip_low": 2.0}}, {}, ConfigError, "clip_low"),
    ({"policy_loss": "ppo_clip", "policy_loss_options": {"clip_lo": 0.1}}, {}, ConfigError, "clip_lo"),
    ({"policy_loss_options": {"clip_low": 0.1}}, {}, ConfigError, "no policy_loss"),
    ({"policy_loss": "ppo_clip"}, {"loss_type": "grpo"}, ConfigError, "loss_type"),
    ({"policy_loss": "gspo"}, {"epsilon_high": 0.28}, ConfigError, "epsilon_high"),
    ({"group_filter": "nonzero_varianc"}, {}, UnknownComponentError, "nonzero_varianc"),
    ({"group_filter": "nonzero_variance", "group_filter_options": {"tolerance": -1}}, {}, ConfigError,
     "tolerance"),
    ({"group_filter": "nonzero_variance", "group_filter_refill": True}, {}, ConfigError, "refill"),
    ({"prm_reward": "max"}, {}, ConfigError, "prm_reward"),
    ({"advantage_estimator": "remax"}, {"use_vllm": True}, ConfigError, "use_vllm"),
])
def test_issue15_config_errors_come_before_any_model_loads(no_model_loading, tmp_path, settings, trl,
                                                           error, match):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import run_ppo

    base = {"reward_functions": ["exact_answer"], "num_examples": 4, "advantage_estimator": "grpo"}
    base.update(settings)
    with pytest.raises(error, match=match):
        run_ppo(PPOSettings(**base), _trl_kwargs(**trl), tmp_path / "out")


def test_a_policy_loss_breaking_its_contract_stops_the_run_naming_it(tiny_dir, tmp_path, rlhf_plugin):
    """The trainer calls the loss under rlhf_plugins/policy_loss_contract.py: a per-token loss is
    one ComponentError naming it (before: torch's "grad can be implicitly created only for
    scalar outputs" from TRL's backward)."""
    from rlhf_plugins.errors import ComponentError
    from rlhf_plugins.policy_loss_base import PolicyObjective
    from rlhf_plugins.sdk import PolicyLoss

    @dataclass(frozen=True)
    class PerToken(PolicyObjective):
        name: ClassVar[str] = "test_per_token_pg"
        description: ClassVar[str] = "test: forgets to aggregate"

        def __call__(self, log_probs, old_log_probs, advantages, mask, *, ref_log_probs=None, **kw):
            return PolicyLoss(-advantages[:, None] * log_probs * mask)

    class Plugin:
        @hookimpl
        def register_policy_losses(self, register):
            register(PerToken())

        @hookimpl
        def register_reward_functions(self, register):
            register(a_count, name="test_a_count")

    rlhf_plugin(Plugin())
    with pytest.raises(ComponentError, match=r"policy loss 'test_per_token_pg' returned a loss of shape "
                                             r"\[4, \d+\] .*expected one number"):
        _run_yaml(tiny_dir, tmp_path, "per_token", "policy_loss: test_per_token_pg")
