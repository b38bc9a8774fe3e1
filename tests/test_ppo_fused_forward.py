"""PPO's value head under TRL's own training forward (the fused LM head), as TRL calls it.

TRL 1.16's GRPOTrainer patches the policy with ``add_fused_lm_head``: its
``_get_per_token_logps_and_entropies`` calls ``model(..., labels=..., fused_lm_head=True)`` and
gets per-token log-probs back, with no logits and no hidden states. Our critic therefore reads
nothing from that output: a forward hook on the transformer body (``backbone_of(model)``, the
``base_model`` module TRL's fused forward calls) computes the values from its
``last_hidden_state``. These tests run that exact TRL method (and our ``_compute_loss`` on a
real rollout) on a LoRA policy and check the values against an independent plain forward; if a
later TRL stops calling the body through a module we can hook, or stops handing it the whole
sequence, they fail with a message that says which of those went missing.
"""
from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402

K = 2  # generations per prompt


def _vowel_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    from rlhf_plugins.rewarding import completion_text

    return [float(sum(ch in "aeiou" for ch in completion_text(c)) % 4) for c in completions]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """Our PPO trainer (GAE + value head) on a LoRA policy, built the way the stage builds it."""
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import prepare_ppo

    root = tmp_path_factory.mktemp("fused")
    settings = PPOSettings(model=str(make_tiny_model_dir(root, seed=11)), reward_functions=[_vowel_reward],
                           num_examples=4, eval_before=False, advantage_estimator="gae",
                           lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trl = dict(max_steps=1, per_device_train_batch_size=4, num_generations=K, max_completion_length=6,
               gradient_checkpointing=False, logging_steps=1, save_strategy="no", learning_rate=1e-2,
               seed=0, beta=0.0, temperature=1.0)
    trainer = prepare_ppo(settings, trl, root / "run").trainer
    torch.nn.init.normal_(trainer.value_head.summary.weight, std=0.5)
    torch.nn.init.constant_(trainer.value_head.summary.bias, 0.1)
    return trainer


def _causal_lm(model: Any) -> Any:
    from rlhf_plugins.models import unwrap

    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _reference_values(trainer, ids, attention, t: int) -> torch.Tensor:
    """``head(h)`` at the positions before each completion token, from a plain (unfused) forward."""
    with torch.no_grad():
        hidden = trainer.model(input_ids=ids, attention_mask=attention,
                               output_hidden_states=True).hidden_states[-1]
    weight, bias = trainer.value_head.summary.weight[0], trainer.value_head.summary.bias[0]
    return hidden[:, -t - 1:-1].float() @ weight + bias


def _batch(trainer, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vocab = _causal_lm(trainer.model).config.vocab_size
    ids = torch.randint(3, vocab, (3, 10))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded prompt, as TRL builds them
    return ids, attention


def test_values_come_from_trls_fused_forward(trainer):
    """TRL's ``_get_per_token_logps_and_entropies`` (fused LM head) feeds the value head."""
    from rlhf_plugins.models import backbone_of
    from rlhf_plugins.stages.ppo.value_head import capture_values

    causal_lm = _causal_lm(trainer.model)
    calls: list[dict[str, Any]] = []

    def record(module: Any, args: Any, kwargs: dict, output: Any) -> None:
        calls.append({"fused": kwargs.get("fused_lm_head", False), "output": output})

    t = 4
    ids, attention = _batch(trainer, t)
    handle = causal_lm.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), capture_values(trainer.model, trainer.value_head, t) as capture:
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t)
    finally:
        handle.remove()

    # The premise: this is TRL's fused path, whose output has log-probs and no logits/hidden states.
    assert calls, "TRL's _get_per_token_logps_and_entropies no longer calls the causal LM's forward"
    assert calls[0]["fused"], ("TRL's _get_per_token_logps_and_entropies no longer passes "
                               "fused_lm_head=True: update this test to TRL's current training forward")
    output = calls[0]["output"]
    assert getattr(output, "log_probs", None) is not None and getattr(output, "logits", None) is None, (
        "TRL's fused forward output changed (expected log_probs and no logits)")
    assert getattr(output, "hidden_states", None) is None  # so the critic cannot read them there

    # What the critic reads: one call of the transformer body, over the whole sequence.
    body = backbone_of(trainer.model)
    assert capture.chunks, (
        f"TRL's fused forward did not call the transformer body {type(body).__name__} "
        "(rlhf_plugins.models.backbone_of, transformers' `base_model`): the value head's forward "
        "hook saw nothing, so PPO's critic has no hidden states to read")
    values = capture.values()
    assert values.shape == (ids.size(0), t), (
        f"the transformer body's last_hidden_state no longer covers prompt + completion "
        f"(values {tuple(values.shape)}, expected {(ids.size(0), t)})")
    torch.testing.assert_close(values.float(), _reference_values(trainer, ids, attention, t),
                               atol=1e-5, rtol=1e-5)
    # and TRL's log-probs are those of the same forward (a plain log-softmax over the logits)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -t - 1:-1].float()
    expected = torch.log_softmax(logits / trainer.temperature, -1).gather(-1, ids[:, -t:, None])[..., 0]
    torch.testing.assert_close(logps.float(), expected, atol=1e-4, rtol=1e-4)


def test_value_loss_trains_the_head_through_trls_loss_forward(trainer):
    """A real rollout, then our ``_compute_loss``: TRL's fused forward gives the policy term, the
    hook the values; the logged value loss equals PPO's clipped value loss on reference values."""
    from rlhf_plugins.data import synth
    from rlhf_plugins.losses import value_loss

    rows = synth.rl_dataset(2, seed=0)
    trainer.model.train()
    torch.manual_seed(123)
    out = trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(K)])
    assert "returns" in out and "old_values" in out, "GAE's returns did not reach the loss inputs"
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    trainer.value_head.zero_grad(set_to_none=True)
    trainer._metrics["train"]["value_loss"].clear()
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    grad = trainer.value_head.summary.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0, "the value loss did not reach the value head"
    logged = trainer._metrics["train"]["value_loss"]
    assert len(logged) == 1, "the loss forward computed no value loss"

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    t = out["completion_ids"].size(1)
    expected = value_loss(_reference_values(trainer, ids, attention, t), out["returns"],
                          out["completion_mask"], old_values=out["old_values"], clip=trainer.value_clip)
    assert logged[0] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_missing_backbone_call_is_a_clear_error(trainer):
    """If nothing calls the transformer body, asking for values says so (no silent zeros)."""
    from rlhf_plugins.stages.ppo.value_head import capture_values

    with capture_values(trainer.model, trainer.value_head, 3) as capture:
        pass
    with pytest.raises(RuntimeError, match="fused LM head"):
        capture.values()
