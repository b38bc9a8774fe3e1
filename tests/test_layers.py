"""The import-linter contracts in pyproject.toml (layers, built-ins on the public API, no cycles)
hold, and each one breaks when a module crosses it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the `test` extra installs it, next to this interpreter
LINT_IMPORTS = (shutil.which("lint-imports", path=str(Path(sys.executable).parent))
                or shutil.which("lint-imports"))


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    """`lint-imports` run from `root` (the packages are found there, as in a checkout)."""
    assert LINT_IMPORTS, "lint-imports is missing: pip install -e '.[test]'"
    ids = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run([LINT_IMPORTS, "--no-cache", *ids], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # the core reaching up into a stage
    ("rlhf_plugins/report.py", "from .stages import gate", "layers"),
    # the host reaching up into the core
    ("rlhf_plugins/manager.py", "from .models import STAGE_FILE", "layers"),
    # a built-in importing the synthetic task instead of declaring its rows
    ("plugins/reward_heads.py", "from rlhf_plugins.data import synth", "builtins-public-api"),
    # two modules of one layer importing each other (segments imports conversation)
    ("rlhf_plugins/conversation.py", "from .segments import Segment", "no-cycles"),
    # a cycle inside a stage package (the trainer reads its config class)
    ("rlhf_plugins/stages/ppo/config.py", "from .trainer import PolicyOptimizationTrainer", "no-cycles"),
    # a cycle between two stage packages (dpo builds on the sft package)
    ("rlhf_plugins/stages/sft/settings.py", "from ..dpo import settings", "no-cycles"),
])
def test_a_crossing_import_breaks_its_contract(tmp_path, module, line, contract):
    for tree in ("rlhf_plugins", "plugins"):
        shutil.copytree(ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path, contract).returncode == 0  # the copy is as clean as the checkout
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef _crossing():\n    {line}\n")
    result = lint_imports(tmp_path, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout, result.stdout
