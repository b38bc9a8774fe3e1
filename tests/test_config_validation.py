"""Configs fail in seconds: typed YAML, every pipeline section checked before anything runs."""
from __future__ import annotations

import json
import textwrap
import time

import pytest

from helpers_plugins import run_cli
from rlhf_plugins.config import load_stage_config
from rlhf_plugins.errors import ConfigError

QUICK = """\
model: {model}
output_dir: {out}
task: {{n_train: 8, n_eval: 4}}
sft: {{max_steps: 1}}
reward_model: {{max_steps: 1}}
rejection_sampling: {{num_prompts: 2}}
ppo:
{ppo}
"""


def _pipeline(tmp_path, ppo: str) -> tuple:
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    model = tmp_path / "model"  # exists, never loaded: config errors come first
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    cfg.write_text(QUICK.format(model=model, out=out,
                                ppo=textwrap.indent(ppo, "  ")))
    start = time.perf_counter()
    proc = run_cli(["pipeline", str(cfg)])
    return proc, time.perf_counter() - start, cfg, out


@pytest.mark.parametrize("ppo,field,expected", [
    ("lerning_rate: 1e-4", "ppo.lerning_rate", "did you mean 'learning_rate'"),
    ("max_steps: ten", "ppo.max_steps", "expected an integer, got 'ten'"),
    ("per_device_train_batch_size: -1", "ppo.per_device_train_batch_size", "positive integer"),
    ("advantage_estimator: gea", "ppo", "Did you mean 'gae'"),
    ("estimator_options: {lam_: 0.9}", "ppo", "unknown option 'lam_'"),
])
def test_a_bad_last_section_exits_2_fast_and_writes_nothing(tmp_path, ppo, field, expected):
    proc, seconds, cfg, out = _pipeline(tmp_path, ppo)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("rlhf-plugins: error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{cfg}: {field}" in error[0] and expected in error[0], error[0]
    assert not out.exists()
    assert seconds < 15  # ~1 s idle: the sections are checked without importing TRL


def test_typed_yaml_values_everywhere(tmp_path):
    from trl import GRPOConfig

    from rlhf_plugins.stages.ppo.settings import PPOSettings

    cfg = tmp_path / "ppo.yaml"
    cfg.write_text("reward_functions: [exact_answer]\nlearning_rate: 1e-4\nbeta: 0\nmax_steps: 3\ngamma: 1\n")
    settings, trl = load_stage_config(cfg, PPOSettings, GRPOConfig)
    assert trl["learning_rate"] == pytest.approx(1e-4) and isinstance(trl["learning_rate"], float)
    assert trl["max_steps"] == 3 and settings.gamma == 1
    cfg.write_text("reward_functions: [exact_answer]\ngamma: one\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: gamma: expected a number, got 'one'$"):
        load_stage_config(cfg, PPOSettings, GRPOConfig)
    cfg.write_text("reward_functions: [exact_answer]\nlearning_rate: [1]\n")
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got list"):
        load_stage_config(cfg, PPOSettings, GRPOConfig)


PLUGIN = '''
from dataclasses import dataclass
import rlhf_plugins
from rlhf_plugins.sdk import SelectionRule

@rlhf_plugins.selection_rule
@dataclass(frozen=True)
class FirstOnly(SelectionRule):
    """Always the first completion of every prompt."""
    name = "first_only"

    def choose(self, rewards):
        return [(i, 0) for i, row in enumerate(rewards) if row]
'''


def test_plugin_flag_and_config_plugins_list(tmp_path):
    script = tmp_path / "my_rules.py"
    script.write_text(PLUGIN)
    proc = run_cli(["--plugin", str(script), "components", "selection_rules", "--json"])
    assert proc.returncode == 0, proc.stderr
    names = {c["name"]: c for c in json.loads(proc.stdout)}
    assert "first_only" in names and names["first_only"]["plugin"] == "__script__"
    # a config's plugins: list, relative to the config file
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(f"plugins: [my_rules.py]\noutput_dir: {tmp_path / 'out'}\n"
                   "rejection_sampling: {selection: first_onyl}\nstages: [rejection_sampling]\n")
    proc = run_cli(["pipeline", str(cfg)])
    assert proc.returncode == 2
    assert "Did you mean 'first_only'" in proc.stderr
    # a broken plugin file is one error line naming it
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    proc = run_cli(["--plugin", str(bad), "components"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--plugin {bad}: RuntimeError: boom" in proc.stderr


def test_trl_model_config_names_map_to_lora_and_quantization(tmp_path):
    from trl import SFTConfig

    from rlhf_plugins.stages.sft.settings import SFTSettings

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj]\n"
                   "load_in_4bit: true\nbnb_4bit_quant_type: fp4\nuse_bnb_nested_quant: false\n")
    settings, _ = load_stage_config(cfg, SFTSettings, SFTConfig)
    assert (settings.lora.r, settings.lora.alpha, settings.lora.target_modules) == (4, 8, ["q_proj"])
    q = settings.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant) == (True, "fp4", False)
    cfg.write_text("lora_r: four\n")
    with pytest.raises(ConfigError, match="lora.r"):
        load_stage_config(cfg, SFTSettings, SFTConfig)


@pytest.mark.parametrize("name,module", [("GRPOConfig", "grpo_config"), ("SFTConfig", "sft_config"),
                                         ("RewardConfig", "reward_config")])
def test_static_trl_fields_equal_the_real_classes(name, module):
    """The fields read from TRL's source (no import) are the init fields of the real class, and
    every hint the static copy resolves agrees with the real one on sample values."""
    import dataclasses
    import typing

    import trl

    from rlhf_plugins.config_schema import static_config_class
    from rlhf_plugins.options import coerce

    real_cls = getattr(trl, name)
    static = static_config_class(f"trl.trainer.{module}", name)
    real = {f.name for f in dataclasses.fields(real_cls) if f.init}
    assert {f.name for f in dataclasses.fields(static)} == real
    real_hints, static_hints = typing.get_type_hints(real_cls), typing.get_type_hints(static)
    checked = loose = 0
    for field in sorted(real):
        if static_hints[field] is typing.Any:
            continue
        for value in (3, 0.5, "ten", None, True, [1]):
            outcomes = []
            for hint in (real_hints[field], static_hints[field]):
                try:
                    outcomes.append(("ok", coerce(hint, value, field)))
                except ConfigError:
                    outcomes.append(("error", None))
            real_outcome, static_outcome = outcomes
            # the static check never rejects what TRL accepts, and coerces the same way; it may
            # accept more where a hint names a class it does not import (an enum: Any), which
            # the full check (the real TRL config) catches before any model loads
            if static_outcome[0] == "error":
                assert real_outcome[0] == "error", (field, value)
            elif real_outcome[0] == "ok":
                assert static_outcome == real_outcome, (field, value)
            else:
                loose += 1
        checked += 1
    assert checked > 50 and loose < checked
