"""Policy optimisation through TRL's GRPOTrainer: estimators as plugins, value head, KL, QLoRA.

References are independent of the trainer: TRL's own GRPOTrainer (grpo path), hand-written
formulas (RLOO, REINFORCE, Ziegler's KL controller), the textbook backward GAE recursion in
plain Python, and log-probabilities of a freshly loaded base model (the reference policy).
"""
from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402

from rlhf_plugins.errors import ConfigError, DataError, PluginError, UnknownComponentError  # noqa: E402
from rlhf_plugins.rewarding import completion_text  # noqa: E402
from rlhf_plugins.stages.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller  # noqa: E402

K = 2  # num_generations


def vowel_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """A deterministic reward that varies across random completions."""
    return [float(sum(ch in "aeiou" for ch in completion_text(c)) % 4) for c in completions]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("ppo-model"), seed=3)


@pytest.fixture(scope="module")
def rows():
    from rlhf_plugins.data import synth

    return synth.rl_dataset(4, seed=0)


def _tokenizer(path: Path):
    from rlhf_plugins import registry
    from rlhf_plugins.models import load_tokenizer

    tok = load_tokenizer(path)
    tok.chat_template = registry().chat_templates.get("chatml").jinja
    return tok


def _trl_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs = dict(max_steps=1, per_device_train_batch_size=4, num_generations=K,
                  max_completion_length=6, gradient_checkpointing=False, logging_steps=1,
                  save_strategy="no", learning_rate=1e-2, seed=0, beta=0.0, temperature=1.0)
    kwargs.update(overrides)
    return kwargs


def _rollout(trainer, rows, seed: int = 123) -> dict[str, Any]:
    """One TRL rollout (generation + scoring + advantages) on a fixed batch, in train mode."""
    trainer.model.train()
    inputs = [dict(row) for row in rows for _ in range(K)]  # TRL's layout: groups of K
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(inputs)


def _our_trainer(tiny_dir, rows, tmp_path, estimator: str, **trainer_kwargs):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    args = build_grpo_config(_trl_kwargs(), tmp_path / f"ours-{estimator}",
                             advantage_estimator=estimator, **trainer_kwargs)
    return PolicyOptimizationTrainer(load_causal_lm(tiny_dir), [vowel_reward], args,
                                     train_dataset=rows, processing_class=_tokenizer(tiny_dir))


# --------------------------------------------------------------------------------------------
# KL controller
# --------------------------------------------------------------------------------------------

def test_adaptive_kl_controller_follows_ziegler_update():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 > target: error 9/6 - 1 = 0.5, clipped to 0.2
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    # KL 6.6: error 0.1 (not clipped)
    expected = 0.1 * (1 + 0.2 * 256 / 10000) * (1 + 0.1 * 100 / 10000)
    assert ctl.update(6.6, 100) == pytest.approx(expected)
    # KL 0: error -1 clipped to -0.2 -> the coefficient shrinks
    expected *= 1 - 0.2 * 500 / 10000
    assert ctl.update(0.0, 500) == pytest.approx(expected)
    # a NaN measurement changes nothing; the target is a fixed point
    assert ctl.update(float("nan"), 100) == pytest.approx(expected)
    assert ctl.update(6.0, 10_000) == pytest.approx(expected)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and fixed.last_kl == 100.0


def test_kl_controller_rejects_bad_settings():
    with pytest.raises(ConfigError, match="beta > 0"):
        make_kl_controller(0.0, target=1.0)
    with pytest.raises(ConfigError, match="kl_target"):
        make_kl_controller(0.1, target=-1.0)
    with pytest.raises(ConfigError, match="kl_horizon"):
        make_kl_controller(0.1, target=1.0, horizon=0)
    assert isinstance(make_kl_controller(0.1), FixedKLController)


# --------------------------------------------------------------------------------------------
# Value head: values come from the hidden state before each completion token
# --------------------------------------------------------------------------------------------

def test_value_capture_reads_hidden_state_before_each_completion_token(tiny_dir):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.value_head import ValueHead, capture_values

    model = load_causal_lm(tiny_dir)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    t = 4
    with capture_values(model, head, t) as capture:
        model(input_ids=ids)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    expected = hidden[:, -t - 1:-1] @ head.summary.weight[0] + head.summary.bias[0]
    torch.testing.assert_close(capture.values(), expected)
    # outside the block nothing is captured any more
    model(input_ids=ids)
    assert len(capture.chunks) == 1


def test_rollout_values_come_from_generation_without_an_extra_forward(tiny_dir, rows, tmp_path):
    """PPO's rollout values are read from generate's own forwards (KV cache, left-padded prompts
    of different lengths) and equal the values of a full forward over prompt + completion."""
    from rlhf_plugins.stages.ppo.value_head import capture_values

    trainer = _our_trainer(tiny_dir, rows, tmp_path, "gae")
    torch.nn.init.normal_(trainer.value_head.summary.weight, std=0.5)
    calls = []
    forward = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: calls.append(1) or forward(*a, **k)
    out = _rollout(trainer, rows)
    assert calls == []  # no policy forward besides generation
    assert len(set(out["prompt_mask"].sum(1).tolist())) > 1  # prompts really were left-padded
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    t = out["completion_ids"].size(1)
    with torch.no_grad(), capture_values(trainer.model, trainer.value_head, t) as capture:
        trainer.model(input_ids=ids, attention_mask=attention)
    mask = out["completion_mask"].bool()
    assert mask.sum() > 0 and capture.values()[mask].abs().max() > 1e-3
    torch.testing.assert_close(out["old_values"][mask], capture.values()[mask], atol=1e-4, rtol=1e-4)


def test_kl_in_reward_takes_the_policy_logps_from_trls_rollout_forward(tiny_dir, rows, tmp_path):
    """KL in the reward with rollouts reused (num_iterations 2): TRL's own rollout forward gives
    the policy's log-probs and generation the values, so the only extra forward is the
    reference's (two in all, not three), with the numbers a full policy forward gives."""
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    args = build_grpo_config(_trl_kwargs(beta=0.1, num_iterations=2), tmp_path / "kl-reward",
                             advantage_estimator="gae", kl_penalty="reward")
    trainer = PolicyOptimizationTrainer(load_causal_lm(tiny_dir), [vowel_reward], args,
                                        train_dataset=rows, processing_class=_tokenizer(tiny_dir))
    torch.nn.init.normal_(trainer.value_head.summary.weight, std=0.5)
    calls = []
    forward = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda model, *a, **k: (
        calls.append(model is trainer.ref_model) or forward(model, *a, **k))
    out = _rollout(trainer, rows)
    assert calls == [False, True]  # TRL's policy forward (old log-probs), then our reference's
    assert out["old_per_token_logps"] is not None
    calls.clear()
    # the same rollout with nothing reused: a full policy forward for log-probs and values
    full = trainer._rollout_statistics({k: v for k, v in out.items() if k != "old_per_token_logps"},
                                       True, None)
    assert calls == [False, True]
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(out["old_per_token_logps"][mask], full["logps"][mask])
    torch.testing.assert_close(out["old_values"][mask], full["values"][mask], atol=1e-4, rtol=1e-4)
    reused = trainer._rollout_statistics(out, True, out["old_values"])
    assert reused["logps"] is out["old_per_token_logps"]
    torch.testing.assert_close(reused["ref_logps"][mask], full["ref_logps"][mask])


# --------------------------------------------------------------------------------------------
# Reward validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, message", [
    ([1.0], "returned 1 rewards for 2"),
    ([1.0, float("nan")], "NaN/inf"),
    ([float("inf"), 0.0], "NaN/inf"),
    ([1.0, "high"], "non-number"),
])
def test_validated_reward_function_names_the_culprit(output, message):
    from rlhf_plugins.stages.ppo.options import validated_reward_function

    def my_bad_reward(prompts, completions, **_):
        return output

    wrapped = validated_reward_function(my_bad_reward)
    assert wrapped.__name__ == "my_bad_reward"
    with pytest.raises(DataError, match=message) as info:
        wrapped(prompts=["a", "b"], completions=["x", "y"], completion_ids=[[1], [2]])
    assert "my_bad_reward" in str(info.value)


def test_validated_reward_function_allows_none_and_passes_columns():
    from rlhf_plugins.stages.ppo.options import validated_reward_function

    def partial_reward(prompts, completions, answer, **_):
        return [None if a is None else float(c == a) for c, a in zip(completions, answer)]

    wrapped = validated_reward_function(partial_reward)
    assert wrapped(prompts=["p", "p"], completions=["4", "5"], answer=["4", None]) == [1.0, None]


def test_bad_reward_function_stops_training_with_its_name(tiny_dir, rows, tmp_path):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    def nan_reward(prompts, completions, **_):
        return [float("nan")] * len(completions)

    args = build_grpo_config(_trl_kwargs(), tmp_path / "bad", advantage_estimator="grpo")
    trainer = PolicyOptimizationTrainer(load_causal_lm(tiny_dir), [nan_reward], args,
                                        train_dataset=rows, processing_class=_tokenizer(tiny_dir))
    with pytest.raises(DataError, match="nan_reward"):
        trainer.train()


# --------------------------------------------------------------------------------------------
# Errors before any model is loaded
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch):
    """Make any model/tokenizer load fail loudly: config errors must come first."""
    import rlhf_plugins.models as models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was validated")

    for name in ("load_causal_lm", "load_tokenizer", "resolve_model", "load_peft_model"):
        monkeypatch.setattr(models, name, forbidden)


@pytest.mark.parametrize("settings, trl, error, match", [
    ({"advantage_estimator": "gea"}, {}, UnknownComponentError, "gea"),
    ({"reward_functions": ["exact_answr"]}, {}, UnknownComponentError, "exact_answr"),
    ({"advantage_estimator": "gae", "critic": "none"}, {}, ConfigError, "needs values"),
    ({}, {"per_device_train_batch_size": 3, "num_generations": 2}, ConfigError, "divisible"),
    ({}, {"generation_batch_size": 8, "num_generations": 3}, ConfigError, "num_generations"),
    ({"kl_penalty": "everywhere"}, {}, ConfigError, "kl_penalty"),
    ({"kl_target": 6.0}, {"beta": 0.0}, ConfigError, "beta > 0"),
    ({"estimator_options": {"scale": "global"}, "advantage_estimator": "grpo"}, {}, ConfigError, "scale"),
    ({}, {"scale_rewards": "batch"}, ConfigError, "scale_rewards"),
])
def test_config_errors_come_before_any_model_loads(no_model_loading, tmp_path, settings, trl, error, match):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import run_ppo

    base = {"reward_functions": ["exact_answer"], "num_examples": 4}
    base.update(settings)
    with pytest.raises(error, match=match):
        run_ppo(PPOSettings(**base), _trl_kwargs(**trl), tmp_path / "out")


def test_settings_errors():
    from rlhf_plugins.stages.ppo.settings import PPOSettings

    with pytest.raises(ConfigError, match="at least one reward"):
        PPOSettings()
    with pytest.raises(ConfigError, match="QLoRA"):
        PPOSettings(reward_functions=["exact_answer"], quantization={"load_in_4bit": True})
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        PPOSettings(reward_functions=["exact_answer"], reward_adapter="somewhere")


def test_yaml_config_splits_ours_and_trl(tmp_path):
    from rlhf_plugins.stages.ppo.train import load_ppo_config

    path = tmp_path / "ppo.yaml"
    path.write_text("output_dir: out\nadvantage_estimator: rloo\nreward_functions:\n"
                    "  - {name: exact_answer, weight: 2.0}\nlora: {r: 4}\nbeta: 0.05\n"
                    "num_generations: 4\nkl_penalty: reward\n")
    settings, trl, out = load_ppo_config(path, overrides=["lora.r=8", "max_steps=3"])
    assert settings.advantage_estimator == "rloo" and settings.kl_penalty == "reward"
    assert settings.lora.r == 8 and trl == {"beta": 0.05, "num_generations": 4, "max_steps": 3}
    assert out == "out"
    path.write_text("output_dir: out\nreward_functions: [exact_answer]\nadvantage_estimatr: gae\n")
    with pytest.raises(ConfigError, match="did you mean 'advantage_estimator'"):
        load_ppo_config(path)


# --------------------------------------------------------------------------------------------
# Advantages: the grpo path equals TRL, other estimators replace them
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_rollout(tiny_dir, rows, tmp_path_factory):
    """Plain TRL GRPOTrainer's rollout on the fixed batch (the reference)."""
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_plugins.models import load_causal_lm

    kwargs = _trl_kwargs()
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, use_cpu=True,
                      report_to="none", dataloader_pin_memory=False, **kwargs)
    trainer = GRPOTrainer(load_causal_lm(tiny_dir), [vowel_reward], args, train_dataset=rows,
                          processing_class=_tokenizer(tiny_dir))
    return _rollout(trainer, rows)


def test_grpo_estimator_reproduces_trl_advantages(trl_rollout, tiny_dir, rows, tmp_path):
    ours = _rollout(_our_trainer(tiny_dir, rows, tmp_path, "grpo"), rows)
    assert torch.equal(ours["completion_ids"], trl_rollout["completion_ids"])  # same samples
    assert trl_rollout["advantages"].abs().sum() > 0  # the rewards vary: a real comparison
    torch.testing.assert_close(ours["advantages"], trl_rollout["advantages"], atol=1e-6, rtol=1e-5)


def test_estimator_swap_by_name_changes_advantages(trl_rollout, tiny_dir, rows, tmp_path):
    trainer = _our_trainer(tiny_dir, rows, tmp_path, "rloo")
    out = _rollout(trainer, rows)
    assert torch.equal(out["completion_ids"], trl_rollout["completion_ids"])
    rewards = [float(r) for r in trainer._last_rewards_per_func[:, 0]]
    expected = []
    for g in range(0, len(rewards), K):  # leave-one-out baseline, by hand
        group = rewards[g:g + K]
        expected += [r - (sum(group) - r) / (K - 1) for r in group]
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), atol=1e-6, rtol=0)
    assert not torch.allclose(out["advantages"], trl_rollout["advantages"])

    reinforce = _rollout(_our_trainer(tiny_dir, rows, tmp_path, "reinforce"), rows)
    torch.testing.assert_close(reinforce["advantages"], torch.tensor(rewards))


def test_loss_receives_the_estimators_advantages(tiny_dir, rows, tmp_path):
    trainer = _our_trainer(tiny_dir, rows, tmp_path, "reinforce")
    seen: list[torch.Tensor] = []
    produced: list[torch.Tensor] = []
    compute_loss, rollout = trainer._compute_loss, trainer._generate_and_score_completions

    def recording_loss(model, inputs):
        seen.append(inputs["advantages"].detach().clone())
        return compute_loss(model, inputs)

    def recording_rollout(inputs):
        out = rollout(inputs)
        produced.append(trainer._last_rewards_per_func[:, 0].clone())
        return out

    trainer._compute_loss, trainer._generate_and_score_completions = recording_loss, recording_rollout
    trainer.train()
    assert len(seen) == 1 and len(produced) == 1
    # reinforce: the advantage of each completion is its reward (TRL shuffles the batch)
    assert sorted(seen[0].tolist()) == pytest.approx(sorted(produced[0].tolist()))


# --------------------------------------------------------------------------------------------
# PPO (GAE + value head + per-token KL) in 4-bit, end to end
# --------------------------------------------------------------------------------------------

def _gae_reference(rewards, values, mask, gamma, lam):
    """Textbook backward recursion over each row's real tokens, in plain Python."""
    advantages = []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        real = [i for i, m in enumerate(m_row) if m]
        row = [0.0] * len(m_row)
        running = 0.0
        for k in reversed(range(len(real))):
            i = real[k]
            next_v = v_row[real[k + 1]] if k + 1 < len(real) else 0.0
            delta = r_row[i] + gamma * next_v - v_row[i]
            running = delta + gamma * lam * running
            row[i] = running
        advantages.append(row)
    return advantages


def _count_4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_ppo_gae_step_in_4bit_end_to_end(tiny_dir, rows, tmp_path):
    from rlhf_plugins.models import QuantSettings, load_causal_lm
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo

    beta, gamma, lam = 0.2, 1.0, 0.9
    settings = PPOSettings(model=str(tiny_dir), reward_functions=[vowel_reward],
                           advantage_estimator="gae", gamma=gamma, lam=lam, vf_coef=0.5,
                           value_clip=0.2, kl_penalty="reward", lora={"r": 4, "alpha": 8},
                           quantization={"load_in_4bit": True})
    prepared = prepare_ppo(settings, _trl_kwargs(max_steps=2, beta=beta, learning_rate=5e-2),
                           tmp_path / "ppo", train_dataset=rows)
    trainer = prepared.trainer
    assert _count_4bit(trainer.model) > 0 and trainer.value_head is not None
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    records: list[dict[str, Any]] = []
    rollout_stats, rollout = trainer._rollout_statistics, trainer._generate_and_score_completions

    def recording_stats(output, need_logps, values=None):
        stats = rollout_stats(output, need_logps, values)
        records.append({"stats": {k: None if v is None else v.clone() for k, v in stats.items()}})
        return stats

    def recording_rollout(inputs):
        out = rollout(inputs)
        records[-1].update(out={k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()},
                           rewards=trainer._total_rewards().clone())
        return out

    trainer._rollout_statistics, trainer._generate_and_score_completions = recording_stats, recording_rollout
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert len(records) == 2  # one rollout per step (steps_per_generation = 1)

    for record in records:
        out, stats = record["out"], record["stats"]
        mask = out["completion_mask"]
        k1 = (stats["logps"] - stats["ref_logps"]) * mask
        token_rewards = (-beta * k1).tolist()
        for i, row in enumerate(mask.tolist()):
            real = [j for j, m in enumerate(row) if m]
            if real:
                token_rewards[i][real[-1]] += float(record["rewards"][i])
        values = (stats["values"] * mask).tolist()
        expected = torch.tensor(_gae_reference(token_rewards, values, mask.tolist(), gamma, lam))
        assert out["advantages"].shape == mask.shape  # token-level advantages reach TRL's loss
        torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["returns"], (expected + stats["values"]) * mask, atol=1e-5, rtol=1e-5)
    # first rollout: fresh adapter (policy == reference) -> KL exactly 0; then the policy moved
    assert torch.count_nonzero(records[0]["stats"]["logps"] - records[0]["stats"]["ref_logps"]) == 0
    assert torch.count_nonzero(records[1]["stats"]["logps"] - records[1]["stats"]["ref_logps"]) > 0
    assert any(not torch.equal(lora_before[n], p) for n, p in trainer.model.named_parameters()
               if n in lora_before)
    assert trainer.value_head.summary.weight.abs().sum() > 0  # the critic trained
    logged = [h for h in trainer.state.log_history if "value_loss" in h]
    assert logged and all(math.isfinite(h["value_loss"]) for h in logged)
    assert all("kl" in h and "kl_coef" in h for h in logged)

    # The reference is the base: log-probs of a freshly loaded 4-bit base, computed by hand.
    out = records[1]["out"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    t = out["completion_ids"].size(1)
    base = load_causal_lm(tiny_dir, quantization=QuantSettings(load_in_4bit=True))
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=attention).logits[:, -t - 1:-1].float()
    expected_ref = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][..., None])[..., 0]
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(records[1]["stats"]["ref_logps"][mask], expected_ref[mask],
                               atol=1e-4, rtol=1e-4)


def test_value_head_is_saved_with_checkpoints(tiny_dir, rows, tmp_path):
    from rlhf_plugins.stages.ppo.value_head import VALUE_HEAD_FILE, ValueHead

    trainer = _our_trainer(tiny_dir, rows, tmp_path, "gae", vf_coef=1.0)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / VALUE_HEAD_FILE).is_file()
    head = ValueHead(trainer.value_head.summary.in_features)
    assert head.load(tmp_path / "saved")
    torch.testing.assert_close(head.summary.weight, trainer.value_head.summary.weight.cpu())
    # a full model's checkpoint stays a plain causal LM (no v_head.* tensors in it)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("v_head") for k in f.keys())


# --------------------------------------------------------------------------------------------
# QLoRA single base: policy, reference, critic and reward model share one copy of the base
# --------------------------------------------------------------------------------------------

def _make_reward_adapter(tiny_dir: Path, out: Path) -> Path:
    from peft import get_peft_model

    from rlhf_plugins import registry
    from rlhf_plugins.models import LoraSettings, load_causal_lm
    from rlhf_plugins.stages.reward_model.artifact import save_reward_model
    from rlhf_plugins.stages.reward_model.model import RewardModel

    base = load_causal_lm(tiny_dir)
    peft_model = get_peft_model(base, LoraSettings(r=4, alpha=8).to_peft())
    torch.manual_seed(7)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter (not the base)
    rm = RewardModel(peft_model, registry().reward_heads.get("bradley_terry"),
                     tokenizer=_tokenizer(tiny_dir), template=registry().chat_templates.get("chatml"),
                     base_model=str(tiny_dir))
    torch.nn.init.normal_(next(rm.head_module.parameters()), std=1.0)
    return save_reward_model(rm, out)


def _live_4bit_params() -> dict[int, Any]:
    import bitsandbytes as bnb

    gc.collect()
    return {id(o): o for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)}


def test_qlora_single_base_holds_the_base_weights_once(tiny_dir, rows, tmp_path):
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo

    artifact = _make_reward_adapter(tiny_dir, tmp_path / "rm")
    before = set(_live_4bit_params())
    settings = PPOSettings(model=str(tiny_dir), reward_functions=[vowel_reward],
                           reward_adapter=str(artifact), reward_adapter_weight=0.5,
                           advantage_estimator="gae", kl_penalty="loss",
                           lora={"r": 4, "alpha": 8}, quantization={"load_in_4bit": True})
    prepared = prepare_ppo(settings, _trl_kwargs(beta=0.1), tmp_path / "ppo", train_dataset=rows)
    trainer, scorer = prepared.trainer, prepared.reward_scorer
    model = trainer.model
    new = {k: v for k, v in _live_4bit_params().items() if k not in before}
    policy_4bit = {id(m.weight) for m in model.modules() if hasattr(m, "weight")
                   and type(m.weight).__name__ == "Params4bit"}
    # every 4-bit weight created by the run belongs to the policy's single base, once
    assert len(policy_4bit) == _count_4bit(model) > 0
    assert set(new) == policy_4bit
    assert len({p.data_ptr() for p in new.values()}) == len(new)
    # reference: the adapter-disabled base (no reference model, no "ref" adapter copy)
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "reward"}
    # critic: a head on the same backbone; reward model: second adapter + head on it
    assert trainer.value_head is model.v_head and scorer.backbone is model
    data_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in data_ptrs for p in scorer.backbone.parameters())

    # The reward adapter is really used when scoring (it is not the policy adapter)
    out = _rollout(trainer, rows)
    per_func = trainer._last_rewards_per_func
    assert per_func.shape[1] == 2 and torch.isfinite(per_func).all()
    assert model.active_adapter == "default" and model.training
    texts = ["Hello there", "The answer is 4."]
    from rlhf_plugins.stages.reward_model.scoring import score

    with_adapter = score(scorer, [{"prompt": [{"role": "user", "content": "hi"}], "completion": t}
                                  for t in texts], progress=False)
    with model.disable_adapter():
        base_scores = [float(scorer.head.sequence_scores(
            scorer.head_module(scorer.hidden_states(*_encode(scorer, t))), {"input_ids": _encode(scorer, t)[0],
                                                                         "attention_mask": _encode(scorer, t)[1]}))
            for t in texts]
    assert with_adapter != pytest.approx(base_scores)
    assert out["advantages"].shape == out["completion_mask"].shape
    trainer.train()  # a full step (rollout + PPO loss + value loss) runs on the shared base
    assert any("rewards/reward_adapter/mean" in h for h in trainer.state.log_history)


def _encode(scorer, text):
    feats = scorer.head.encode_for_scoring({"prompt": [{"role": "user", "content": "hi"}],
                                            "completion": text}, tokenizer=scorer.tokenizer,
                                           template=scorer.template)
    ids = torch.tensor([feats["input_ids"]])
    return ids, torch.ones_like(ids)


def test_plugin_error_from_reward_function_is_named(tiny_dir, rows, tmp_path):
    from rlhf_plugins.stages.ppo.options import validated_reward_function

    def crashing_reward(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(PluginError, match="crashing_reward"):
        validated_reward_function(crashing_reward)(prompts=["p"], completions=["c"])


def test_trainer_options_live_in_its_config_class_and_are_checked_there(tmp_path):
    """`PolicyOptimizationTrainer(model, reward_funcs, args)` takes no option that its config
    (`PolicyOptimizationConfig(GRPOConfig)`) holds; the config checks them once, when built."""
    import dataclasses
    import inspect
    import pickle

    from trl import GRPOConfig

    from rlhf_plugins.errors import ConfigError
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.config import PolicyOptimizationConfig
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    ours = {f.name for f in dataclasses.fields(PolicyOptimizationConfig)} - \
        {f.name for f in dataclasses.fields(GRPOConfig)}
    assert {"advantage_estimator", "critic", "kl_penalty", "whiten_advantages", "policy_loss",
            "group_filter", "gamma", "lam", "vf_coef", "value_clip"} <= ours
    params = set(inspect.signature(PolicyOptimizationTrainer.__init__).parameters)
    assert params == {"self", "model", "reward_funcs", "args", "kwargs"}
    with pytest.raises(ConfigError, match="critic must be one of"):
        build_grpo_config(_trl_kwargs(), tmp_path / "a", critic="bogus")
    with pytest.raises(ConfigError, match="needs values, but critic is 'none'"):
        build_grpo_config(_trl_kwargs(), tmp_path / "b", advantage_estimator="gae", critic="none")
    with pytest.raises(ConfigError, match="needs `args`: a PolicyOptimizationConfig"):
        PolicyOptimizationTrainer(None, [vowel_reward], GRPOConfig(output_dir=str(tmp_path / "c"), use_cpu=True,
                                                                   bf16=False, report_to="none"))
    args = build_grpo_config(_trl_kwargs(), tmp_path / "d", advantage_estimator="rloo",
                             estimator_options={})
    estimator, loss, group_filter = args.components()
    assert estimator.name == "rloo" and loss is None and group_filter is None
    assert args.components()[0] is estimator  # resolved once per config
    assert args.to_dict()["advantage_estimator"] == "rloo"
    assert pickle.loads(pickle.dumps(args)).components()[0].name == "rloo"
