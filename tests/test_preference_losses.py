"""The ``preference_losses`` family (plugins/preference_losses.py): registration, options, input
checks, bit-equality with TRL's own DPOTrainer, SimPO against the paper's formula, and a
third-party loss used by name."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from helpers_plugins import make_dist, run_cli

import rlhf_plugins
from rlhf_plugins.errors import ConfigError
from rlhf_plugins.protocols import PreferenceLossFunction, member
from rlhf_plugins.sdk import PreferenceLoss, PreferenceObjective, option
from rlhf_plugins.testing import component_plugin

NAMES = ["apo_zero", "bco_pair", "hinge", "ipo", "nca_pair", "robust", "sigmoid", "simpo", "sppo_hard"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture
def losses():
    """The registry's preference_losses family (the built-ins are default plugins)."""
    return rlhf_plugins.registry(reload=True).preference_losses


def test_registry_lists_the_nine_builtins_with_their_capabilities(losses):
    assert losses.names() == NAMES
    for name in NAMES:
        component = losses.get(name)
        assert isinstance(component, PreferenceObjective)
        assert isinstance(component, PreferenceLossFunction)
        assert component.name == name and component.description and component.beta == 0.1
        assert losses.provenance(name).plugin == "rlhf_plugins.builtin.preference_losses"
    assert [n for n in NAMES if losses.get(n).reference_free] == ["simpo"]
    assert [n for n in NAMES if losses.get(n).needs_lengths] == ["ipo", "simpo"]


def test_components_cli_lists_the_nine_builtins_with_options():
    proc = run_cli(["components", "preference_losses", "--json"])
    assert proc.returncode == 0, proc.stderr
    items = {item["name"]: item for item in json.loads(proc.stdout)}
    assert sorted(items) == NAMES
    options = {name: {o["name"]: o["default"] for o in item["options"]} for name, item in items.items()}
    assert options["sigmoid"] == {"beta": 0.1}
    assert options["robust"] == {"beta": 0.1, "label_smoothing": 0.0}
    assert options["simpo"] == {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.0}
    table = run_cli(["components", "preference_losses"])
    assert table.returncode == 0 and all(name in table.stdout for name in NAMES)


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, rlhf_plugins.builtin.preference_losses as m\n"
            "[cls() for cls in m.BUILTIN_PREFERENCE_LOSSES]\n"
            "import rlhf_plugins; rlhf_plugins.registry().preference_losses.get('simpo', gamma=1.0)\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_configure_returns_a_validated_copy(losses):
    robust = losses.get("robust", beta=0.5, label_smoothing="1e-1")  # YAML 1.1 reads 1e-1 as a string
    assert (robust.beta, robust.label_smoothing) == (0.5, 0.1)
    assert losses.get("robust").label_smoothing == 0.0  # the registered default is untouched
    assert losses.get("simpo", gamma=-1).gamma == -1.0
    schema = {o["name"]: o for o in losses.get("simpo").options_schema()}
    assert set(schema) == {"beta", "gamma", "label_smoothing"} and schema["gamma"]["help"]


@pytest.mark.parametrize("name, options, match", [
    ("sigmoid", {"beta": 0.0}, "beta"),
    ("sigmoid", {"beta": -0.1}, "beta"),
    ("ipo", {"beta": float("inf")}, "beta"),
    ("hinge", {"beta": "wide"}, "beta"),
    ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
    ("robust", {"label_smoothing": -0.1}, "label_smoothing"),
    ("simpo", {"gamma": float("nan")}, "gamma"),
    ("simpo", {"gama": 1.0}, "did you mean 'gamma'"),
    ("sigmoid", {"label_smoothing": 0.1}, "unknown option"),
])
def test_bad_options_are_config_errors_naming_the_loss(losses, name, options, match):
    with pytest.raises(ConfigError, match=match) as info:
        losses.get(name, **options)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_or_misshaped_inputs_are_config_errors(losses):
    c, r = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -2.0])
    with pytest.raises(ConfigError, match=r"'sigmoid'.*needs ref_chosen_logps, ref_rejected_logps "
                                          r"\(it is not reference_free\)"):
        losses.get("sigmoid")(c, r)
    with pytest.raises(ConfigError, match="'ipo'.*needs chosen_lengths, rejected_lengths"):
        losses.get("ipo")(c, r, c, r)
    with pytest.raises(ConfigError, match="ref_rejected_logps must be a tensor of shape"):
        losses.get("sigmoid")(c, r, c, r[:1])
    with pytest.raises(ConfigError, match="chosen_lengths must be a tensor"):
        losses.get("simpo")(c, r, chosen_lengths=[3, 4], rejected_lengths=torch.tensor([3, 4]))
    # a reference-free loss needs no reference and ignores one that is passed
    lengths = {"chosen_lengths": torch.tensor([3, 4]), "rejected_lengths": torch.tensor([5, 2])}
    simpo = losses.get("simpo")
    assert torch.equal(simpo(c, r, **lengths).losses, simpo(c, r, c + 1, r - 1, **lengths).losses)


def test_result_type_and_metrics(losses):
    c, r = torch.tensor([-3.0, -4.0, -1.0]), torch.tensor([-5.0, -2.0, -1.5])
    ref = torch.tensor([-3.5, -3.0, -2.0])
    out = losses.get("sigmoid", beta=0.5)(c, r, ref, ref)
    assert isinstance(out, PreferenceLoss) and out.losses.shape == (3,)
    assert torch.equal(out.chosen_rewards, 0.5 * (c - ref))
    assert torch.equal(out.rejected_rewards, 0.5 * (r - ref))
    # hand-computed: rewards chosen (0.25, -0.5, 0.5), rejected (-0.75, 0.5, 0.25)
    assert out.metrics == pytest.approx({"rewards/chosen": 0.25 / 3, "rewards/rejected": 0.0,
                                         "rewards/accuracies": 2 / 3, "rewards/margins": 0.25 / 3})
    assert all(type(v) is float for v in out.metrics.values())


# --- the TRL-shared losses are TRL's DPOTrainer, bit for bit -------------------------------------

#: (our name, our options = TRL DPOConfig fields of the same name)
TRL_CASES = [
    ("sigmoid", {"beta": 0.1}),
    ("sigmoid", {"beta": 0.5}),
    ("hinge", {"beta": 0.5}),
    ("ipo", {"beta": 0.1}),
    ("ipo", {"beta": 0.5}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.0}),
    ("robust", {"beta": 0.5, "label_smoothing": 0.2}),
    ("bco_pair", {"beta": 0.3}),
    ("nca_pair", {"beta": 0.3}),
    ("sppo_hard", {"beta": 0.5}),
    ("apo_zero", {"beta": 0.3}),
]

#: log-ratios the pairs are given (the reference log-probs are set from them): both sides of
#: hinge's kink, of zero, wins and losses, small and large margins
CHOSEN_LOGRATIOS = [-4.0, -1.0, 0.5, 2.0, 3.5, 6.0]
REJECTED_LOGRATIOS = [3.0, -2.0, 0.25, -5.0, 1.0, -0.5]
ROWS = [{"prompt": f"Question {i}:", "chosen": " yes" * (i + 1), "rejected": " no!" * (3 - i % 3) + "?"}
        for i in range(len(CHOSEN_LOGRATIOS))]


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama's config + weights and its tokenizer (built once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_plugins.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).state_dict(), tok


def _dpo_trainer(tiny_lm, tmp_path, loss_type: str, options: dict):
    """An unmodified TRL DPOTrainer with `loss_type` and our options as its DPOConfig fields."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    config, state, tok = tiny_lm
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], precompute_ref_log_probs=True,
                     use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                     per_device_train_batch_size=len(ROWS), **options)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    trainer.model.train()
    return trainer


def _trl_step(trainer, rows: list[int]):
    """TRL's loss on `rows` (its `compute_loss`), d loss / d summed log-probs of each completion,
    the summed log-probs TRL computed, the batch TRL saw and its logged metrics."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    # reference log-probs that give each pair the log-ratios above
    with torch.no_grad():
        policy_chosen, policy_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    batch["ref_chosen_logps"] = policy_chosen - torch.tensor([CHOSEN_LOGRATIOS[i] for i in rows])
    batch["ref_rejected_logps"] = policy_rejected - torch.tensor([REJECTED_LOGRATIOS[i] for i in rows])

    captured = []

    def keep_log_probs(module, args, kwargs, output):  # observes the forward, changes nothing
        output.log_probs.retain_grad()
        captured.append(output.log_probs)

    handle = trainer.model.register_forward_hook(keep_log_probs, with_kwargs=True)
    try:
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    finally:
        handle.remove()
    assert len(captured) == 1  # one policy forward; the reference log-probs came with the batch
    per_token = captured[0]
    seq_len = batch["completion_mask"].size(1) - 1
    # TRL sums per_token[:, -seq_len:] over dim 1; d loss / d that sum reaches every summed token
    grad = per_token.grad[:, -seq_len:]
    assert torch.equal(grad, grad[:, -1:].expand_as(grad))
    logps = per_token.detach()[:, -seq_len:].sum(dim=1)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in METRICS}
    return loss.detach(), grad[:, -1], logps, batch, metrics


def _ours(loss, logps, batch):
    """Our loss on the log-probs TRL computed: the result and d mean-loss / d log-probs."""
    chosen, rejected = (t.clone().requires_grad_(True) for t in logps.chunk(2))
    chosen_mask, rejected_mask = batch["completion_mask"].chunk(2)
    out = loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
               chosen_lengths=chosen_mask.sum(dim=1), rejected_lengths=rejected_mask.sum(dim=1))
    out.losses.mean().backward()
    return out, torch.cat([chosen.grad, rejected.grad])


@pytest.mark.parametrize("name, options", TRL_CASES, ids=[f"{n}-{o}" for n, o in TRL_CASES])
def test_equal_to_trl_dpo_trainer(tiny_lm, tmp_path, losses, name, options):
    trainer = _dpo_trainer(tiny_lm, tmp_path, name, options)
    loss = losses.get(name, **options)
    # per pair: TRL's loss on a batch of that one pair is its per-pair loss
    for i in range(len(ROWS)):
        trl_loss, trl_grad, logps, batch, trl_metrics = _trl_step(trainer, [i])
        out, grad = _ours(loss, logps, batch)
        assert out.losses.dtype == trl_loss.dtype == torch.float32
        assert torch.equal(out.losses[0], trl_loss), (i, out.losses, trl_loss)
        assert torch.equal(grad, trl_grad), (i, grad, trl_grad)
        assert out.metrics == trl_metrics  # rewards of that pair: beta * log-ratio, as TRL logs them
    # the whole batch: mean loss, gradient of each completion, reward metrics
    trl_loss, trl_grad, logps, batch, trl_metrics = _trl_step(trainer, list(range(len(ROWS))))
    out, grad = _ours(loss, logps, batch)
    assert torch.equal(out.losses.mean(), trl_loss)
    assert torch.equal(grad, trl_grad)
    assert out.metrics == trl_metrics
    # the batch covers more than one regime of the loss (a constant loss would prove little)
    assert out.losses.unique().numel() >= 4 and grad.abs().sum() > 0
    if name == "hinge":
        assert (out.losses == 0).any() and (out.losses > 0).any()
    if name == "ipo":  # length normalisation is exercised: the completions' lengths differ
        assert batch["completion_mask"].sum(dim=1).unique().numel() > 2


# --- SimPO: the paper's formula, by hand ---------------------------------------------------------

def _simpo_by_hand(logp_c: float, logp_r: float, len_c: int, len_r: int, *, beta: float, gamma: float,
                   eps: float) -> tuple[float, float, float]:
    """SimPO (Meng et al. 2024, eq. 6) with CPO's label smoothing, and its derivatives in the
    chosen and rejected summed log-probs: loss = -(1-eps) log s(z) - eps log s(-z),
    z = beta*(logp_c/len_c - logp_r/len_r) - gamma, s the logistic function."""
    z = beta * (logp_c / len_c - logp_r / len_r) - gamma
    sig = 1.0 / (1.0 + math.exp(-z))
    loss = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
    dloss_dz = -(1 - eps) * (1 - sig) + eps * sig
    return loss, dloss_dz * beta / len_c, -dloss_dz * beta / len_r


@pytest.mark.parametrize("beta, gamma, eps", [(0.1, 0.5, 0.0), (2.0, 1.0, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_is_the_paper_formula(losses, beta, gamma, eps):
    logp_c = [-12.0, -30.5, -3.0, -40.0, -7.25]
    logp_r = [-20.0, -10.0, -3.5, -41.0, -60.0]
    len_c, len_r = [6, 15, 2, 20, 5], [9, 4, 2, 17, 30]
    chosen = torch.tensor(logp_c, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(logp_r, dtype=torch.float64, requires_grad=True)
    out = losses.get("simpo", beta=beta, gamma=gamma, label_smoothing=eps)(
        chosen, rejected, chosen_lengths=torch.tensor(len_c), rejected_lengths=torch.tensor(len_r))
    out.losses.sum().backward()
    want = [_simpo_by_hand(*x, beta=beta, gamma=gamma, eps=eps) for x in zip(logp_c, logp_r, len_c, len_r)]
    # float64; the hand formula uses other operations, so equal to 1e-12, not bit for bit
    tol = {"rtol": 0.0, "atol": 1e-12}
    assert torch.allclose(out.losses, torch.tensor([w[0] for w in want], dtype=torch.float64), **tol)
    assert torch.allclose(chosen.grad, torch.tensor([w[1] for w in want], dtype=torch.float64), **tol)
    assert torch.allclose(rejected.grad, torch.tensor([w[2] for w in want], dtype=torch.float64), **tol)
    # rewards: beta times the average log-prob (SimPO's implicit reward)
    assert torch.allclose(out.chosen_rewards, beta * torch.tensor(logp_c, dtype=torch.float64)
                          / torch.tensor(len_c), **tol)
    assert not out.chosen_rewards.requires_grad


def test_simpo_matches_trl_cpo_trainer_loss(losses):
    """TRL's CPOTrainer.cpo_loss (loss_type=simpo) on average log-probs, run unbound on a minimal
    self holding its CPOConfig's values."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = CPOConfig(output_dir="unused", loss_type="simpo", beta=2.0, simpo_gamma=1.2,
                    label_smoothing=0.1, report_to=[], use_cpu=True)
    trl_self = SimpleNamespace(alpha=cfg.alpha, beta=cfg.beta, loss_type=cfg.loss_type,
                               simpo_gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    chosen = torch.tensor([-12.0, -30.5, -3.0, -40.0], dtype=torch.float64)
    rejected = torch.tensor([-20.0, -10.0, -3.5, -41.0], dtype=torch.float64)
    len_c, len_r = torch.tensor([6, 15, 2, 20]), torch.tensor([9, 4, 2, 17])
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(
        trl_self, chosen / len_c, rejected / len_r)
    out = losses.get("simpo", beta=2.0, gamma=1.2, label_smoothing=0.1)(
        chosen, rejected, chosen_lengths=len_c, rejected_lengths=len_r)
    # CPO subtracts gamma/beta before scaling by beta: equal to 1e-12 in float64, not bit for bit
    assert torch.allclose(out.losses, trl_losses, rtol=0.0, atol=1e-12)
    assert torch.equal(out.chosen_rewards, trl_chosen_rewards)
    assert torch.equal(out.rejected_rewards, trl_rejected_rewards)


# --- a third-party preference loss, by name -------------------------------------------------------

@dataclass(frozen=True)
class ExponentialLoss(PreferenceObjective):
    """exp(-(beta * delta - margin)): a test plugin's loss."""

    name = "exp_margin"
    margin: float = option(0.0, help="target margin (>= 0)")

    def validate_options(self):
        super().validate_options()
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")

    def pair_losses(self, chosen, rejected, **lengths):
        return torch.exp(-(self.beta * (chosen - rejected) - self.margin))


def test_third_party_loss_is_used_by_name_with_options(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("preference_losses", ExponentialLoss()), name="my-dpo-plugin")
    assert reg.preference_losses.provenance("exp_margin").plugin == "my-dpo-plugin"
    assert "sigmoid" in reg.preference_losses  # next to the built-ins
    loss = reg.preference_losses.get("exp_margin", beta=0.5, margin="1")
    assert (loss.beta, loss.margin) == (0.5, 1.0)
    assert member(loss, "preference_losses", "reference_free") is False
    c, r, ref = torch.tensor([-2.0, -6.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-3.0, -3.0])
    out = loss(c, r, ref, ref)
    # delta = (1 - (-1), -3 - 2) = (2, -5): exp(-(1 - 1)), exp(-(-2.5 - 1))
    assert torch.allclose(out.losses, torch.tensor([1.0, math.exp(3.5)]))
    assert torch.equal(out.chosen_rewards, torch.tensor([0.5, -1.5]))
    assert out.metrics["rewards/accuracies"] == 0.5
    with pytest.raises(ConfigError, match="'exp_margin'.*margin must be >= 0"):
        reg.preference_losses.get("exp_margin", margin=-1.0)
    with pytest.raises(ConfigError, match="'exp_margin'.*unknown option 'margn'.*did you mean 'margin'"):
        reg.preference_losses.get("exp_margin", margn=1.0)
    with pytest.raises(rlhf_plugins.UnknownComponentError, match="Did you mean 'exp_margin'"):
        reg.preference_losses.get("exp_margn")


def test_invalid_third_party_loss_fails_its_plugin(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("preference_losses", object(), name="not_a_loss"),
                      name="broken-dpo", raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "broken-dpo")
    assert info.status == "failed" and "must be callable" in info.error
    assert "not_a_loss" not in reg.preference_losses


INSTALLED = """
from dataclasses import dataclass
from rlhf_plugins import hookimpl
from rlhf_plugins.sdk import PreferenceObjective, option

@dataclass(frozen=True)
class Squared(PreferenceObjective):
    \"\"\"(beta * delta - target)^2, an installed plugin's loss.\"\"\"
    name = "squared_margin"
    target: float = option(1.0, help="target of beta * delta")

    def pair_losses(self, chosen, rejected, **lengths):
        return (self.beta * (chosen - rejected) - self.target) ** 2

@hookimpl
def register_preference_losses(register):
    register(Squared())
"""

SCRIPT = """
import rlhf_plugins

@rlhf_plugins.preference_loss(name="script_loss")
def script_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                chosen_lengths=None, rejected_lengths=None):
    \"\"\"A preference loss registered from a script.\"\"\"
    raise NotImplementedError
script_loss.reference_free = True
"""


def test_installed_and_script_losses_are_listed(tmp_path):
    site = make_dist(tmp_path / "site", "dpo-extra", "0.3.0", {"dpo_extra": "dpo_extra"},
                     {"dpo_extra": INSTALLED})
    script = tmp_path / "my_loss.py"
    script.write_text(SCRIPT)
    proc = run_cli(["--plugin", str(script), "components", "preference_losses", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    items = {item["name"]: item for item in json.loads(proc.stdout)}
    assert set(NAMES) | {"squared_margin", "script_loss"} == set(items)
    squared = items["squared_margin"]
    assert (squared["plugin"], squared["distribution"], squared["version"]) == \
        ("dpo_extra", "dpo-extra", "0.3.0")
    assert {o["name"]: o["default"] for o in squared["options"]} == {"beta": 0.1, "target": 1.0}
    assert items["script_loss"]["plugin"] == "__script__"
    assert items["script_loss"]["description"] == "A preference loss registered from a script."


def test_concept_page_snippet_runs():
    from test_docs import DOCS, _python_blocks

    blocks = _python_blocks(DOCS / "concepts" / "preference_losses.md")
    assert blocks
    for block in blocks:
        exec(compile(block, "preference_losses.md", "exec"), {})  # noqa: S102
