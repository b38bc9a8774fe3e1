"""The built-in ``policy_losses`` components (plugins/policy_losses.py): registration, options,
the ratio-1 gradient check through the components, and agreement with the pure objectives."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_policy_objectives import batch, trl_case, trl_loss  # helpers, not tests

import rlhf_plugins.builtin.policy_losses as builtin_losses
from rlhf_plugins import policy_objectives
from rlhf_plugins.errors import ConfigError
from rlhf_plugins.manager import registry
from rlhf_plugins.policy_loss_base import AGG_MODES, PolicyObjective
from rlhf_plugins.protocols import PolicyLossFunction
from rlhf_plugins.sdk import PolicyLoss
from rlhf_plugins.testing import registered_plugin

NAMES = ["cispo", "clip_cov", "geo_mean", "gpg", "gspo", "kl_cov", "policy_gradient", "ppo_clip", "sapo"]


@pytest.fixture
def losses():
    """The registry's policy_losses family with the built-in module loaded (once)."""
    reg = registry(reload=True)
    if "ppo_clip" in reg.policy_losses.names():  # already a default plugin
        yield reg.policy_losses
        return
    with registered_plugin(builtin_losses) as reg:
        yield reg.policy_losses
    registry(reload=True)


def test_registry_lists_every_builtin(losses):
    assert sorted(losses.names()) == NAMES
    for name in NAMES:
        component = losses.get(name)
        assert isinstance(component, PolicyObjective) and isinstance(component, PolicyLossFunction)
        assert component.name == name and component.description
        assert component.options["agg"] in AGG_MODES


def test_agg_modes_match_the_objectives_and_every_loss_is_wired():
    assert AGG_MODES == policy_objectives.AGG_MODES
    assert {cls.name for cls in builtin_losses.BUILTIN_POLICY_LOSSES} == set(policy_objectives.POLICY_LOSSES)


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, rlhf_plugins.builtin.policy_losses as m\n"
            "[cls() for cls in m.BUILTIN_POLICY_LOSSES]\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_configure_and_schema(losses):
    ppo = losses.get("ppo_clip", clip_high=0.28, dual_clip=3)
    assert (ppo.clip_low, ppo.clip_high, ppo.dual_clip) == (0.2, 0.28, 3)
    assert losses.get("ppo_clip").clip_high == 0.2  # the registered default is untouched
    assert losses.get("gspo", clip_low="3e-4").clip_low == 3e-4  # YAML 1.1 reads 3e-4 as a string
    schema = {o["name"]: o for o in losses.get("ppo_clip").options_schema()}
    assert set(schema) == {"agg", "kl_coef", "norm_constant", "clip_low", "clip_high", "dual_clip", "delta"}
    assert "seq_mean_token_sum_norm" in schema["agg"]["type"] and schema["clip_high"]["help"]
    assert losses.get("gspo").agg == "seq_mean_token_mean"
    assert "seed" in losses.get("clip_cov").options and "_generator" not in losses.get("clip_cov").options


@pytest.mark.parametrize("name, options, match", [
    ("ppo_clip", {"clip_hgh": 0.3}, "did you mean 'clip_high'"),
    ("ppo_clip", {"clip_high": "wide"}, "clip_high"),
    ("ppo_clip", {"agg": "mean"}, "agg"),
    ("ppo_clip", {"clip_low": 1.5}, "clip_low"),
    ("ppo_clip", {"clip_high": -0.1}, "clip_high"),
    ("ppo_clip", {"dual_clip": 0.5}, "dual_clip"),
    ("ppo_clip", {"delta": 0.0}, "delta"),
    ("ppo_clip", {"kl_coef": float("nan")}, "kl_coef"),
    ("ppo_clip", {"agg": "seq_mean_token_mean", "norm_constant": 10.0}, "norm_constant"),
    ("ppo_clip", {"norm_constant": 0.0}, "norm_constant"),
    ("gspo", {"clip_low": 2.0}, "clip_low"),
    ("cispo", {"clip_high": float("inf")}, "clip_high"),
    ("sapo", {"tau_pos": 0.0}, "tau_pos"),
    ("geo_mean", {"clip_low": -0.1}, "clip_low"),
    ("kl_cov", {"kl_cov_ratio": 0.0}, "kl_cov_ratio"),
    ("clip_cov", {"clip_cov_lb": 2.0, "clip_cov_ub": 1.0}, "clip_cov_ub"),
    ("gpg", {"clip_low": 0.2}, "unknown option"),
])
def test_bad_options_are_config_errors_naming_the_loss(losses, name, options, match):
    with pytest.raises(ConfigError, match=match) as info:
        losses.get(name, **options)
    assert name in str(info.value)


def test_cispo_accepts_no_lower_clip(losses):
    assert losses.get("cispo", clip_low=None).clip_low is None
    assert losses.get("cispo", clip_low=0.5).clip_low == 0.5


# --- the components compute what the pure objectives compute -----------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("token_adv", [False, True])
def test_components_equal_the_objectives(losses, name, token_adv):
    lp, old, adv, tok, mask = batch(3)
    a = tok if token_adv else adv
    component = losses.get(name)
    kwargs = dict(component.options)
    if name == "clip_cov":
        kwargs.pop("seed")
        component = component.configure(clip_cov_lb=-1e9, clip_cov_ub=1e9, clip_cov_ratio=0.2, seed=5)
        kwargs.update(clip_cov_lb=-1e9, clip_cov_ub=1e9, clip_cov_ratio=0.2,
                      generator=torch.Generator().manual_seed(5))
    got = component(lp, old, a, mask)
    want = policy_objectives.POLICY_LOSSES[name](lp, old, a, mask, **kwargs)
    assert isinstance(got, PolicyLoss)
    assert torch.equal(got.loss, want.loss) and got.metrics == want.metrics


def test_ppo_clip_component_with_defaults_is_trls_default_loss(losses):
    for dtype in (torch.float32, torch.float64):
        lp, old, adv, mask = trl_case(21, dtype)
        lp2 = lp.detach().clone().requires_grad_(True)
        expected = trl_loss(lp2, old, adv, mask, loss_type="dapo", num_items_in_batch=mask.sum())
        expected.backward()
        got = losses.get("ppo_clip")(lp, old, adv, mask, norm_constant=mask.sum())
        got.loss.backward()
        assert torch.equal(got.loss, expected) and torch.equal(lp.grad, lp2.grad)


def test_kl_coef_and_norm_constant_pass_through(losses):
    lp, old, adv, _, mask = batch(4)
    ref = old - 0.05
    got = losses.get("ppo_clip", kl_coef=0.04, norm_constant=7.0)(lp, old, adv, mask, ref_log_probs=ref)
    want = policy_objectives.ppo_clip(lp, old, adv, mask, kl_coef=0.04, norm_constant=7.0,
                                      ref_log_probs=ref)
    assert torch.equal(got.loss, want.loss) and "kl" in got.metrics
    override = losses.get("ppo_clip", norm_constant=7.0)(lp, old, adv, mask, norm_constant=torch.tensor(3.0))
    assert torch.equal(override.loss, policy_objectives.ppo_clip(lp, old, adv, mask, norm_constant=3.0).loss)


def test_clip_cov_seed_is_reproducible_and_fresh_per_configure(losses):
    lp, old, adv, tok, mask = batch(6)
    kw = dict(clip_cov_lb=-1e9, clip_cov_ub=1e9, clip_cov_ratio=0.3, seed=11)
    a, b = losses.get("clip_cov", **kw), losses.get("clip_cov", **kw)
    first = [a(lp, old, tok, mask).loss for _ in range(3)]
    second = [b(lp, old, tok, mask).loss for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert a.configure(seed=11)(lp, old, tok, mask).loss.item() == first[0].item()


# --- the one check for all of them: gradients at ratio 1 ---------------------------------

@pytest.mark.parametrize("name, options", [
    ("ppo_clip", {}), ("cispo", {}), ("policy_gradient", {}), ("gpg", {}),
    ("sapo", {"agg": "token_mean"}), ("kl_cov", {}), ("ppo_clip", {"clip_high": 0.28, "dual_clip": 3.0}),
])
@pytest.mark.parametrize("token_adv", [False, True])
def test_gradient_at_ratio_one_token_mean(losses, name, options, token_adv):
    lp, _, adv, tok, mask = batch(12)
    a = tok if token_adv else adv
    lp = lp.clone().requires_grad_(True)
    component = losses.get(name, **options)
    assert component.agg == "token_mean"
    component(lp, lp.detach().clone(), a, mask).loss.backward()
    full = a if a.dim() == 2 else a[:, None].expand_as(lp)
    assert torch.allclose(lp.grad, -full * mask / mask.sum(), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("name", ["gspo", "geo_mean"])
def test_gradient_at_ratio_one_sequence_level(losses, name):
    lp, _, adv, _, mask = batch(13)
    lp = lp.clone().requires_grad_(True)
    component = losses.get(name)
    assert component.agg == "seq_mean_token_mean"  # their default, the paper's
    component(lp, None, adv, mask).loss.backward()
    B, lengths = lp.shape[0], mask.sum(-1, keepdim=True)
    assert torch.allclose(lp.grad, -adv[:, None] * mask / (B * lengths), atol=1e-12, rtol=1e-9)
