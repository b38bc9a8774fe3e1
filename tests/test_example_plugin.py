"""The example third-party plugin, installed for real (wheel built, entry points read)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_plugins import ROOT, plugins_json, run_cli

EXAMPLE = ROOT / "examples" / "rlhf-plugin-example"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
                   check=True, timeout=300, capture_output=True)
    return target


def test_example_plugin_is_listed_with_distribution_and_version(example_site):
    plugins = {p["name"]: p for p in plugins_json(example_site)}
    example = plugins["example"]
    assert example["distribution"] == "rlhf-plugin-example" and example["version"] == "0.2.0"
    assert example["status"] == "ok"
    assert example["components"] == {"chat_templates": ["llama3"],
                                     "reward_functions": ["keyword_bonus"]}


def test_example_components_resolve_by_name(example_site):
    code = (
        "import json, rlhf_plugins\n"
        "reg = rlhf_plugins.registry()\n"
        "tpl = reg.chat_templates.get('llama3')\n"
        "text = tpl.render_text([{'role': 'user', 'content': ' hi '}], add_generation_prompt=True)\n"
        "fn = reg.reward_functions.get('keyword_bonus', keyword='thanks')\n"
        "print(json.dumps({'text': text, 'rewards': fn(['p', 'p'], ['Thanks!', 'no'])}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(example_site), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["text"] == ("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert out["rewards"] == [1.0, 0.0]


def test_example_override_replaces_the_builtin_and_is_shown(example_site):
    proc = run_cli(["components", "reward_functions", "--json"], example_site)
    assert proc.returncode == 0, proc.stderr
    fmt = next(c for c in json.loads(proc.stdout) if c["name"] == "format")
    assert fmt["plugin"] == "example_strict_format"
    assert fmt["distribution"] == "rlhf-plugin-example"
    assert fmt["overrides"]["plugin"] == "rlhf_plugins.builtin.rewards"
    blocked = run_cli(["components", "reward_functions", "--json"], example_site,
                      {"RLHF_PLUGINS_BLOCK": "example_strict_format"})
    fmt = next(c for c in json.loads(blocked.stdout) if c["name"] == "format")
    assert fmt["plugin"] == "rlhf_plugins.builtin.rewards"


def test_wheel_installs_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(dist.glob("rlhf_plugins-*.whl"))
    venv = tmp_path / "venv"
    # A fresh venv over the base interpreter; only pluggy is needed to list plugins.
    subprocess.run([sys._base_executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    if subprocess.run([str(py), "-c", "import pluggy"], capture_output=True).returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "pluggy"], check=True, timeout=300)
    proc = subprocess.run([str(venv / "bin" / "rlhf-plugins"), "plugins", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert {f"rlhf_plugins.builtin.{m}" for m in ("chat_templates", "masking", "reward_heads",
                                                  "selection", "advantages", "rewards")} <= names
    site = Path(subprocess.run([str(py), "-c", "import rlhf_plugins, os; print(os.path.dirname("
                                "os.path.dirname(rlhf_plugins.__file__)))"],
                               capture_output=True, text=True, cwd=tmp_path).stdout.strip())
    assert site != ROOT and not (site / "plugins").exists()
    assert (site / "rlhf_plugins" / "builtin" / "chat_templates.py").is_file()


def test_example_stage_is_listed_with_provenance(example_site):
    proc = run_cli(["components", "stages", "--json"], example_site)
    assert proc.returncode == 0, proc.stderr
    stages = {c["name"]: c for c in json.loads(proc.stdout)}
    assert {"sft", "reward_model", "rejection_sampling", "ppo", "policy_stats"} <= set(stages)
    assert stages["policy_stats"]["plugin"] == "example_stages"
    assert stages["policy_stats"]["distribution"] == "rlhf-plugin-example"
    assert stages["sft"]["plugin"] == "rlhf_plugins.stages.builtin"


def test_example_stage_runs_after_sft_in_a_pipeline_with_an_empty_section(example_site, tmp_path):
    """The third-party stage, listed in `stages:` after sft with an empty section (all defaults),
    counts the parameters of the policy sft handed it; checked against safetensors' own loader."""
    import yaml
    from safetensors.numpy import load_file

    from helpers_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    config = {"model": str(model), "output_dir": str(out), "stages": ["sft", "policy_stats"],
              "task": {"n_train": 8, "n_eval": 2}, "eval": {"max_new_tokens": 4, "batch_size": 2},
              "sft": {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none",
                      "save_strategy": "no"},
              "policy_stats": {}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli(["pipeline", str(tmp_path / "p.yaml")], example_site)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "policy_stats"]
    policy = summary["stages"]["sft"]["outputs"]["policy"]
    stats = json.loads((out / "policy_stats" / "policy_stats.json").read_text())
    assert stats["model"] == policy
    tensors = {}
    for file in Path(policy).glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    assert stats["parameters"] == sum(t.size for t in tensors.values()) > 0
    assert stats["tensors"] == len(tensors)
    assert summary["stages"]["policy_stats"]["metrics"]["parameters"] == stats["parameters"]
    assert summary["stages"]["policy_stats"]["outputs"] == {"evaluate": False}
    assert "policy_stats" not in summary["evals"]  # it made no new policy to evaluate

    # its section is validated up front like a built-in's: a bad field exits 2 before any work
    bad = {**config, "output_dir": str(tmp_path / "bad"), "policy_stats": {"output_file": "a/b"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = run_cli(["pipeline", str(tmp_path / "bad.yaml")], example_site)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("policy_stats.output_file: expected a plain file name, got 'a/b'")
    assert not (tmp_path / "bad").exists()
