"""Third-party selection rules, reward functions and advantage estimators on the SDK bases.

Each component implements only its family's required member (`choose`, `__call__`), is
registered with the `rlhf_plugin` fixture and runs through the stage that uses it on a tiny
model: rejection sampling for the rule and the reward function, PPO for the estimator. Plus the
option errors every SDK component gets and the options `components --json` lists.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers_plugins import run_cli

import rlhf_plugins
from rlhf_plugins.errors import ConfigError
from rlhf_plugins.sdk import AdvantageEstimator, Advantages, RewardFunction, SelectionRule
from rlhf_plugins.testing import component_plugin

#: calls recorded by the components below (they are frozen dataclasses: state lives here)
CALLS: dict[str, list[Any]] = {"choose": [], "reward": [], "estimate": []}


@pytest.fixture(autouse=True)
def _clear_calls():
    for calls in CALLS.values():
        calls.clear()


@dataclass(frozen=True)
class LastScored(SelectionRule):
    """The last scored completion of every prompt (top_per_prompt would pick the best)."""

    name = "last_scored"

    def choose(self, rewards: list[list[float]]) -> list[tuple[int, int]]:
        CALLS["choose"].append(rewards)
        return [(i, max(j for j, r in enumerate(row) if not math.isnan(r)))
                for i, row in enumerate(rewards) if any(not math.isnan(r) for r in row)]


@dataclass(frozen=True)
class LetterCount(RewardFunction):
    """Number of characters of the completion; None for prompt 2 (never selected)."""

    name = "letter_count"

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        from rlhf_plugins.rewarding import completion_text

        CALLS["reward"].append(len(completions))
        return [None if uid == "q2" else float(len(completion_text(c)))
                for c, uid in zip(completions, columns["uid"])]


@dataclass(frozen=True)
class Centered(AdvantageEstimator):
    """Reward minus the batch mean, recording every call."""

    name = "recording_centered"

    def __call__(self, rewards: Any, *, num_generations: int = 1, mask: Any = None,
                 values: Any = None, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
        CALLS["estimate"].append({"shape": tuple(rewards.shape), "num_generations": num_generations,
                                  "values": values})
        return Advantages(advantages=(rewards - rewards.mean()).detach())


# --------------------------------------------------------------------------------------------
# Through the stages, on a tiny model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP is much slower
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory, torch):
    from helpers_models import make_tiny_model_dir
    from helpers_tokenizers import make_tokenizer

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tokenizer=make_tokenizer("smollm2"))


def test_rule_and_reward_function_run_through_rejection_sampling(tmp_path, sampling_model,
                                                                 rlhf_plugin):
    from rlhf_plugins.stages.rejection_sampling.run import run_sampling
    from rlhf_plugins.stages.rejection_sampling.settings import SamplingSettings

    rlhf_plugin(component_plugin("selection_rules", LastScored()))
    reg = rlhf_plugin(component_plugin("reward_functions", LetterCount()))
    assert reg.selection_rules.get("last_scored").options == {}
    assert reg.reward_functions.get("letter_count").__name__ == "letter_count"  # from the SDK
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "uid": f"q{i}"}) + "\n"
                            for i in range(4)))
    settings = SamplingSettings(model=str(sampling_model), dataset=str(data), num_samples=3,
                                max_new_tokens=6, batch_size=12, chunk_size=4, seed=3,
                                reward_functions=["letter_count"], selection="last_scored")
    result = run_sampling(settings, tmp_path / "run")
    assert CALLS["reward"] and sum(CALLS["reward"]) == 12  # every completion scored by it
    # the dummy config check, then the real selection, both with NaN for unscored
    assert len(CALLS["choose"]) == 2 and math.isnan(CALLS["choose"][-1][2][0])
    rows = result.rows
    for r in rows:
        want = None if r["uid"] == "q2" else float(len(r["completion"][0]["content"]))
        assert r["reward"] == want
    # its choice, not the best: the last completion of every scored prompt
    assert [(r["prompt_index"], r["completion_index"]) for r in result.selected] == [
        (0, 2), (1, 2), (3, 2)]
    assert result.summary["selected"] == 3
    totals = [[r["reward"] for r in rows if r["prompt_index"] == i] for i in range(4)]
    best = rlhf_plugins.registry().selection_rules.get("top_per_prompt").select(totals)
    assert best != [(0, 2), (1, 2), (3, 2)]  # the seed makes the two rules disagree


def test_estimator_runs_through_ppo(tmp_path, rlhf_plugin, torch):
    from helpers_models import make_tiny_model_dir

    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import run_ppo

    rlhf_plugin(component_plugin("reward_functions", LetterCount(), name="letters"))
    rlhf_plugin(component_plugin("advantage_estimators", Centered()))
    model = make_tiny_model_dir(tmp_path / "model", seed=3)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"hi {i}"}],
                                        "uid": f"p{i}"}) + "\n" for i in range(4)))
    settings = PPOSettings(model=str(model), dataset=str(rows), reward_functions=["letters"],
                           advantage_estimator="recording_centered", critic="none")
    trl = dict(max_steps=1, per_device_train_batch_size=4, num_generations=2,
               max_completion_length=6, gradient_checkpointing=False, logging_steps=1,
               save_strategy="no", learning_rate=1e-2, seed=0, beta=0.0)
    result = run_ppo(settings, trl, tmp_path / "ppo")
    assert CALLS["estimate"], "the registered estimator was never called"
    call = CALLS["estimate"][0]
    assert call["shape"] == (4,) and call["num_generations"] == 2 and call["values"] is None
    assert result.metrics["advantage_estimator"] == "recording_centered"
    assert result.metrics["global_step"] == 1


# --------------------------------------------------------------------------------------------
# Option errors: one line, naming the component and the option
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,name,options,needle", [
    ("selection_rules", "top_k", {"kk": 3}, "unknown option 'kk'"),
    ("selection_rules", "top_k", {"k": "three"}, "'k': expected an integer"),
    ("selection_rules", "threshold", {"min_reward": "high"}, "'min_reward': expected a number"),
    ("advantage_estimators", "grpo", {"epsilon": 0.1}, "unknown option 'epsilon'"),
    ("advantage_estimators", "gae", {"chunk": "big"}, "'chunk': expected an integer"),
    ("reward_functions", "exact_answer", {"tolerence": 0.1}, "unknown option 'tolerence'"),
    ("reward_functions", "length_penalty", {"two_sided": "yes"}, "'two_sided': expected true or false"),
])
def test_unknown_and_ill_typed_options_are_one_line_config_errors(family, name, options, needle):
    fam = rlhf_plugins.registry().family(family)
    with pytest.raises(ConfigError) as info:
        fam.get(name, **options)
    message = str(info.value)
    assert "\n" not in message and f"'{name}'" in message and needle in message, message
    # the same through configure() on the component itself
    with pytest.raises(ConfigError, match=needle):
        fam.get(name).configure(**options)


def test_call_time_option_errors_name_the_rule_and_option():
    top_k = rlhf_plugins.registry().selection_rules.get("top_k")
    with pytest.raises(ConfigError) as info:
        top_k.select([[1.0, 2.0]], k="three")
    assert "'top_k'" in str(info.value) and "'k': expected an integer" in str(info.value)
    with pytest.raises(ConfigError, match="'top_k': unknown option 'kk'"):
        top_k.select([[1.0, 2.0]], kk=1)
    assert top_k.select([[1.0, 2.0]], k=2.0) == [(0, 0), (0, 1)]  # integral float -> int


def test_third_party_component_with_options_gets_the_same_checks(rlhf_plugin):
    from rlhf_plugins.sdk import option

    @dataclass(frozen=True)
    class FirstN(SelectionRule):
        name = "first_n"
        n: int = option(1, help="how many completions per prompt")

        def validate_options(self) -> None:
            if self.n < 1:
                raise ValueError(f"n must be >= 1, got {self.n}")

        def choose(self, rewards):
            return [(i, j) for i, row in enumerate(rewards) for j in range(min(self.n, len(row)))
                    if not math.isnan(row[j])]

    reg = rlhf_plugin(component_plugin("selection_rules", FirstN()))
    rule = reg.selection_rules.get("first_n", n=2.0)  # YAML-ish integral float -> int
    assert rule.n == 2 and rule.select([[0.1, -math.inf, 0.3]]) == [(0, 0)]
    assert reg.selection_rules.options("first_n") == [
        {"name": "n", "type": "int", "default": 1, "help": "how many completions per prompt"}]
    for bad, needle in (({"n": 0}, "n must be >= 1"), ({"n": "x"}, "'n': expected an integer"),
                        ({"m": 1}, "unknown option 'm'")):
        with pytest.raises(ConfigError, match=f"'first_n'.*{needle}"):
            reg.selection_rules.get("first_n", **bad)


# --------------------------------------------------------------------------------------------
# `components --json` lists the options; listing stays torch-free
# --------------------------------------------------------------------------------------------

BUILTIN_OPTIONS = {
    "selection_rules": {"top_per_prompt": [], "top_k": ["k"], "threshold": ["min_reward", "max_per_prompt"],
                        "random_per_prompt": ["seed"], "random_k": ["k", "seed"]},
    "advantage_estimators": {"gae": ["chunk"], "grpo": ["eps", "scale"], "dr_grpo": [], "rloo": [],
                             "reinforce": [], "reinforce_baseline": []},
    "reward_functions": {"exact_answer": ["answer_column", "tolerance", "fallback_last_number"],
                         "format": ["style", "min_steps"],
                         "length_penalty": ["target", "scale", "unit", "two_sided"]},
}


def test_components_json_lists_every_builtins_options():
    proc = run_cli(["components", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for family, builtins in BUILTIN_OPTIONS.items():
        listed = {c["name"]: c for c in data[family]}
        for name, option_names in builtins.items():
            options = listed[name]["options"]
            assert [o["name"] for o in options] == option_names, (family, name)
            for o in options:
                assert set(o) >= {"name", "type", "default", "help"} and o["help"], o
    top_k = {o["name"]: o for o in {c["name"]: c for c in data["selection_rules"]}["top_k"]["options"]}
    assert top_k["k"]["required"] is True and top_k["k"]["default"] is None
    grpo = {c["name"]: c for c in data["advantage_estimators"]}["grpo"]["options"]
    assert grpo[0] == {"name": "eps", "type": "float", "default": 1e-4,
                       "help": grpo[0]["help"], "required": False}
    # the table view shows them compactly
    table = run_cli(["components", "selection_rules"])
    assert table.returncode == 0 and "k (required), seed=0" in table.stdout


def test_listing_components_does_not_import_torch():
    code = ("import sys, io, contextlib; from rlhf_plugins.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['components', '--json']) == 0 and main(['components']) == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plugins_has_no_all_flag():
    proc = run_cli(["plugins", "--all"])
    assert proc.returncode == 2 and "unrecognized arguments: --all" in proc.stderr
