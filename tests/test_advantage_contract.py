"""The estimator shape contract (rlhf_plugins.advantage_contract), in the trainer and on its own.

An estimator that does not declare ``uses_token_rewards`` gets [B] rewards (each row's token
rewards summed over its real tokens); its output must be [B] or [B, T]. References: hand
computations (the docs' ``MeanBaseline`` under ``kl_penalty: reward`` and dense step rewards,
with log-probabilities from plain forwards of the policy and the reference), and the built-ins
called directly on [B, T] rewards as before the contract (results must not change).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

from helpers_models import make_tiny_model_dir  # noqa: E402
from test_docs import DOCS, _python_blocks  # noqa: E402
from test_ppo import K, _rollout, _tokenizer, _trl_kwargs, vowel_reward  # noqa: E402

from rlhf_plugins import hookimpl  # noqa: E402
from rlhf_plugins.advantage_contract import call_estimator  # noqa: E402
from rlhf_plugins.errors import ComponentError  # noqa: E402
from rlhf_plugins.rewarding import completion_text  # noqa: E402
from rlhf_plugins.sdk import AdvantageEstimator, Advantages  # noqa: E402


def docs_mean_baseline() -> type:
    """`MeanBaseline` exactly as docs/writing_plugins.md writes it (its block run as a reader would)."""
    from rlhf_plugins import decorators

    block = next(b for b in _python_blocks(DOCS / "writing_plugins.md") if "class MeanBaseline" in b)
    saved = {f: dict(c) for f, c in decorators._script.components.items()}
    try:
        namespace: dict = {}
        exec(compile(block, "writing_plugins.md", "exec", dont_inherit=True), namespace)  # noqa: S102
    finally:
        for fam, comps in saved.items():
            decorators._script.components[fam] = comps
    return namespace["MeanBaseline"]


def _batch(seed: int = 0) -> dict[str, Any]:
    """[B, T] token rewards and a mask with right padding, a hole and an empty row (B = 6, T = 5)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    rewards = torch.randn(6, 5, generator=g) * mask  # what the trainer passes: 0 on padding
    rewards[1, 3] = 7.0  # except where it does not: a value on padding must not count
    return {"rewards": rewards, "mask": mask, "values": torch.randn(6, 5, generator=g) * mask,
            "reward_components": torch.randn(6, 2, generator=g), "reward_weights": torch.tensor([1.0, 0.5]),
            "baseline_rewards": torch.randn(6, generator=g)}


def _extras(est: Any, batch: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if getattr(est, "needs_reward_components", False):
        extra.update(reward_components=batch["reward_components"], reward_weights=batch["reward_weights"])
    if getattr(est, "needs_greedy_baseline", False):
        extra["baseline_rewards"] = batch["baseline_rewards"]
    return extra


# --------------------------------------------------------------------------------------------
# The contract on its own
# --------------------------------------------------------------------------------------------

def test_docs_mean_baseline_gets_row_sums_of_token_rewards():
    batch = _batch()
    rewards, mask = batch["rewards"], batch["mask"]
    result = call_estimator(docs_mean_baseline()(), rewards, mask=mask, num_generations=2)
    # by hand: each row's sum over its real tokens, minus its group's (2 rows) mean, on real tokens
    sums = [sum(float(r) for r, m in zip(row, keep) if m) for row, keep in zip(rewards.tolist(), mask.tolist())]
    adv = [s - (sums[i - i % 2] + sums[i - i % 2 + 1]) / 2 for i, s in enumerate(sums)]
    expected = torch.tensor([[a * m for m in keep] for a, keep in zip(adv, mask.tolist())])
    torch.testing.assert_close(result.advantages, expected)
    assert result.returns is None
    # [B] rewards go through untouched, and [B] advantages stay [B]
    seq = call_estimator(docs_mean_baseline()(), torch.tensor(sums), mask=mask, num_generations=2)
    torch.testing.assert_close(seq.advantages, torch.tensor(adv))


@pytest.mark.parametrize("declares", [False, True])
def test_what_shape_an_estimator_gets(declares):
    seen: list[list[int]] = []

    @dataclass(frozen=True)
    class Spy(AdvantageEstimator):
        name: ClassVar[str] = "spy"
        uses_token_rewards: ClassVar[bool] = declares

        def __call__(self, rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95):
            seen.append(list(rewards.shape))
            return Advantages(torch.zeros(rewards.shape))

    batch = _batch()
    call_estimator(Spy(), batch["rewards"], mask=batch["mask"], num_generations=2)
    call_estimator(Spy(), batch["rewards"].sum(dim=1), mask=batch["mask"], num_generations=2)
    assert seen == ([[6, 5], [6]] if declares else [[6], [6]])


def test_builtin_results_do_not_change():
    """Every built-in, called through the contract, returns bit for bit what it returned when it
    was handed the [B, T] rewards itself (and [B] rewards as before)."""
    from rlhf_plugins import registry

    batch = _batch(seed=3)
    family = registry().advantage_estimators
    checked = []
    for name in family.names():
        if family.provenance(name).plugin == "__script__":
            continue
        est = family.get(name)
        for rewards in (batch["rewards"], batch["rewards"].sum(dim=1)):
            kwargs = dict(num_generations=2, mask=batch["mask"], values=batch["values"], gamma=0.9,
                          lam=0.8, **_extras(est, batch))
            before = est(rewards, **kwargs)
            after = call_estimator(est, rewards, **kwargs)
            assert torch.equal(after.advantages, before.advantages), (name, list(rewards.shape))
            assert (after.returns is None) == (before.returns is None), name
            if before.returns is not None:
                assert torch.equal(after.returns, before.returns), name
        checked.append(name)
    assert {"gae", "grpo", "rloo", "reinforce_plus_plus", "opo", "gdpo", "remax"} <= set(checked)


def _bad_plugin(advantages: Any, returns: Any = None, raw: Any = None) -> Any:
    @dataclass(frozen=True)
    class BadShape(AdvantageEstimator):
        name: ClassVar[str] = "bad_shape"

        def __call__(self, rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95):
            return raw if raw is not None else Advantages(advantages, returns)

    class Plugin:
        @hookimpl
        def register_advantage_estimators(self, register):
            register(BadShape())

    return Plugin()


@pytest.mark.parametrize("advantages, returns, raw, message", [
    (torch.zeros(30), None, None, r"advantages of shape \[30\] for rewards of shape \[6\]; expected "
                                  r"\[B\] = \[6\] or \[B, T\] = \[6, 5\]"),
    (torch.zeros(6, 6), None, None, r"advantages of shape \[6, 6\]"),
    (torch.zeros(6, 5, 1), None, None, r"advantages of shape \[6, 5, 1\]"),
    (torch.zeros(()), None, None, r"advantages of shape \[\] "),
    (torch.zeros(6), torch.zeros(6), None, r"returns of shape \[6\] for rewards of shape \[6\]; "
                                           r"expected None or \[B, T\] = \[6, 5\]"),
    (None, None, torch.zeros(6), r"returned Tensor, expected Advantages"),
])
def test_bad_estimator_output_is_a_component_error_naming_plugin_and_shapes(rlhf_plugin, advantages,
                                                                             returns, raw, message):
    reg = rlhf_plugin(_bad_plugin(advantages, returns, raw), name="shapes_plugin")
    est = reg.advantage_estimators.get("bad_shape")
    batch = _batch()
    with pytest.raises(ComponentError, match=message) as info:
        call_estimator(est, batch["rewards"], mask=batch["mask"], num_generations=2)
    text = str(info.value)
    assert text.startswith("advantage estimator 'bad_shape' ") and "plugin 'shapes_plugin'" in text
    assert "\n" not in text and info.value.family == "advantage_estimators"


def test_an_estimator_that_raises_is_named():
    @dataclass(frozen=True)
    class Broken(AdvantageEstimator):
        name: ClassVar[str] = "broken"

        def __call__(self, rewards, *, num_generations=1, mask=None, values=None, gamma=1.0, lam=0.95):
            return Advantages(rewards.view(-1, 4))  # 6 rows do not split in fours

    batch = _batch()
    with pytest.raises(ComponentError, match=r"advantage estimator 'broken' raised RuntimeError in __call__\(\)"):
        call_estimator(Broken(), batch["rewards"], mask=batch["mask"], num_generations=2)


# --------------------------------------------------------------------------------------------
# The trainer: the docs' MeanBaseline under kl_penalty: reward and with dense step rewards
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("contract-model"), seed=3)


@pytest.fixture(scope="module")
def rows():
    from rlhf_plugins.data import synth

    return synth.rl_dataset(4, seed=0)


def _trainer(tiny_dir, rows, tmp_path, reward_funcs, trl=None, **kwargs):
    from rlhf_plugins.models import load_causal_lm
    from rlhf_plugins.stages.ppo.train import build_grpo_config
    from rlhf_plugins.stages.ppo.trainer import PolicyOptimizationTrainer

    args = build_grpo_config(_trl_kwargs(**(trl or {})), tmp_path / "out",
                             advantage_estimator=docs_mean_baseline()(), **kwargs)
    return PolicyOptimizationTrainer(load_causal_lm(tiny_dir), reward_funcs, args, train_dataset=rows,
                                     processing_class=_tokenizer(tiny_dir))


def _completion_logps(model, out) -> torch.Tensor:
    """log p(completion token) under `model`: a plain forward over prompt + completion."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    t = out["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -t - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, out["completion_ids"][..., None])[..., 0]


def _group_centred(sums: torch.Tensor) -> torch.Tensor:
    return torch.stack([s - sums[i - i % K:i - i % K + K].mean() for i, s in enumerate(sums)])


def test_docs_mean_baseline_under_kl_in_the_reward(tiny_dir, rows, tmp_path):
    beta = 0.5
    trainer = _trainer(tiny_dir, rows, tmp_path, [vowel_reward], trl={"beta": beta}, kl_penalty="reward",
                       critic="none")
    with torch.no_grad():  # move the policy away from the reference, so the KL is not 0
        torch.manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = _rollout(trainer, rows)
    mask = out["completion_mask"].float()
    kl = (_completion_logps(trainer.model, out) - _completion_logps(trainer.ref_model, out)) * mask  # k1
    reward = trainer._last_rewards_per_func[:, 0]
    assert kl.abs().sum() > 1e-2 and reward.std() > 0  # both parts of the reward are real
    # InstructGPT: R on the last real token, -beta * KL_t on each; the estimator sees the row sums
    expected = _group_centred(reward - beta * kl.sum(dim=1))[:, None] * mask
    torch.testing.assert_close(out["advantages"], expected, atol=1e-4, rtol=1e-4)


def _two_steps(prompts: list, completions: list, **_: Any) -> list[Any]:
    """Step rewards: 0.5 after the first character, #a at the end (0.0 for an empty completion)."""
    out: list[Any] = []
    for c in completions:
        text = completion_text(c)
        out.append([(1, 0.5), (len(text), float(text.count("a")))] if len(text) > 1 else 0.0)
    return out


def test_docs_mean_baseline_with_dense_step_rewards(tiny_dir, rows, tmp_path):
    from test_ppo_extensions import _few_letters

    trainer = _trainer(tiny_dir, rows, tmp_path, [_two_steps], trl=_few_letters(tiny_dir), critic="none")
    out = _rollout(trainer, rows)
    raw, _ = trainer._last_reward_outputs[0]
    assert any(isinstance(r, list) for r in raw)  # dense: the trainer built [B, T] token rewards
    # by hand: each completion's steps add up; the estimator centres them within the group
    sums = torch.tensor([sum(v for _, v in r) if isinstance(r, list) else float(r) for r in raw])
    assert sums.std() > 0
    expected = _group_centred(sums)[:, None] * out["completion_mask"].float()
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
