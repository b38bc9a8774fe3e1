"""Third-party plugins through real entry-point metadata, isolation, allow/block lists, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_plugins import make_dist, plugins_json, run_cli

GOOD = """
from rlhf_plugins import hookimpl

class Rule:
    name = "good_rule"
    description = "A rule from a third-party package"
    def select(self, rewards, **params):
        return [(0, 0)]

@hookimpl
def register_selection_rules(register):
    register(Rule())
"""

BROKEN_IMPORT = "raise RuntimeError('boom at import')\n"

BROKEN_REGISTER = """
from rlhf_plugins import hookimpl

@hookimpl
def register_reward_functions(register):
    raise ValueError('boom at registration')
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    make_dist(root, "good-plugin", "1.2.3", {"good": "good_mod"}, {"good_mod": GOOD})
    make_dist(root, "broken-import", "0.1", {"bi": "broken_import_mod"},
              {"broken_import_mod": BROKEN_IMPORT})
    make_dist(root, "broken-register", "0.2", {"br": "broken_register_mod"},
              {"broken_register_mod": BROKEN_REGISTER})
    return root


def by_name(plugins):
    return {p["name"]: p for p in plugins}


def test_entry_points_load_and_broken_ones_are_isolated(site):
    plugins = by_name(plugins_json(site))
    good = plugins["good"]
    assert (good["distribution"], good["version"], good["status"]) == ("good-plugin", "1.2.3", "ok")
    assert good["components"] == {"selection_rules": ["good_rule"]}
    assert good["hooks"] == ["register_selection_rules"]
    assert plugins["bi"]["status"] == "failed" and "boom at import" in plugins["bi"]["error"]
    assert plugins["br"]["status"] == "failed" and "boom at registration" in plugins["br"]["error"]
    proc = run_cli(["components", "selection_rules", "--json"], site)
    assert proc.returncode == 0
    assert any(c["name"] == "good_rule" and c["distribution"] == "good-plugin"
               for c in json.loads(proc.stdout))


def test_strict_mode_fails_the_command(site):
    proc = run_cli(["plugins", "--json"], site, {"RLHF_PLUGINS_STRICT": "1"})
    assert proc.returncode != 0
    assert "boom" in proc.stderr


@pytest.mark.parametrize("env,expected", [
    ({"RLHF_PLUGINS_LOAD": "good-plugin"}, {"good"}),
    ({"RLHF_PLUGINS_LOAD": "good_plugin,broken-import"}, {"good", "bi"}),
    ({"RLHF_PLUGINS_LOAD": ""}, set()),
    ({"RLHF_PLUGINS_BLOCK": "broken-import,broken-register"}, {"good"}),
])
def test_load_and_block_lists(site, env, expected):
    names = {p["name"] for p in plugins_json(site, env) if not p["name"].startswith("rlhf_plugins.")}
    assert names == expected
    from rlhf_plugins.manager import DEFAULT_PLUGINS

    builtins = [p for p in plugins_json(site, env) if p["name"] in DEFAULT_PLUGINS]

    assert len(builtins) == len(DEFAULT_PLUGINS)


def test_trace_prints_hook_calls(site):
    proc = run_cli(["plugins", "--json"], site, {"RLHF_PLUGINS_TRACE": "1",
                                                 "RLHF_PLUGINS_LOAD": "good-plugin"})
    assert proc.returncode == 0
    assert "calling good.register_selection_rules(register)" in proc.stderr


def test_cli_unknown_family_exits_2_with_names():
    proc = run_cli(["components", "selection_rule"])
    assert proc.returncode == 2
    assert "Did you mean 'selection_rules'" in proc.stderr and "reward_heads" in proc.stderr


def test_cli_plugins_table_shows_failures(site):
    proc = run_cli(["plugins"], site)
    assert proc.returncode == 0
    assert "good_rule" in proc.stdout and "failed" in proc.stdout


def test_listing_plugins_imports_no_heavy_library():
    code = ("import sys, io, contextlib\n"
            "from rlhf_plugins.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['plugins', '--json']) == 0\n"
            "    assert main(['components', '--json']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importtime_shows_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf_plugins.cli.main",
                           "plugins", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert imported and not [m for m in imported if m.split(".")[0] == "torch"]
