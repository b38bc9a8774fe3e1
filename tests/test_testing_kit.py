"""The `rlhf_plugin` fixture: only the plugin under test (+ built-ins), and its errors surface."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_plugins import hookimpl
from rlhf_plugins.errors import PluginError
from rlhf_plugins.testing import component_plugin, registered_plugin


def shout(prompts, completions, **_):
    """1.0 for completions in capitals."""
    return [1.0 if str(c).isupper() else 0.0 for c in completions]


class Broken:
    """A plugin whose registration fails (a component that is not callable)."""

    @hookimpl
    def register_reward_functions(self, register):
        register(shout)
        register(42, name="not_callable")


def test_a_broken_plugin_under_test_raises_its_error(rlhf_plugin):
    with pytest.raises(PluginError, match="plugin under test 'broken'.*must be callable"):
        rlhf_plugin(Broken(), name="broken")
    reg = rlhf_plugin(Broken(), name="broken-inspected", raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "broken-inspected")
    assert info.status == "failed" and "shout" not in reg.reward_functions


def test_registered_plugin_raises_too():
    with pytest.raises(PluginError, match="must be callable"):
        with registered_plugin(Broken(), "broken-cm"):
            pass
    with registered_plugin(component_plugin("reward_functions", shout), "good") as reg:
        assert "shout" in reg.reward_functions


SITE_PLUGIN = '''
from rlhf_plugins import hookimpl

def shout(prompts, completions, **_):
    return [0.0] * len(completions)

@hookimpl
def register_reward_functions(register):
    register(shout)
'''


@pytest.fixture
def installed_site(tmp_path):
    """An installed plugin (entry point `installed-shout`) providing `shout`, like the one under test."""
    site = tmp_path / "site"
    dist = site / "installed_shout-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "installed_shout.py").write_text(textwrap.dedent(SITE_PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-shout\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[rlhf_plugins]\ninstalled-shout = installed_shout\n")
    (dist / "RECORD").write_text("")
    return site


def test_installed_plugins_are_off_unless_asked_for(installed_site):
    """Run in a subprocess whose sys.path holds the installed plugin."""
    code = textwrap.dedent('''
        import pytest, sys
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
    ''')
    test = installed_site.parent / "test_inner.py"
    test.write_text(textwrap.dedent('''
        import pytest
        from rlhf_plugins import hookimpl
        from rlhf_plugins.errors import PluginError
        from rlhf_plugins.testing import component_plugin

        def shout(prompts, completions, **_):
            return [1.0] * len(completions)

        class Broken:
            @hookimpl
            def register_reward_functions(self, register):
                register(shout)
                register(42, name="bad")

        def test_only_the_plugin_under_test(rlhf_plugin):
            reg = rlhf_plugin(component_plugin("reward_functions", shout), name="mine")
            assert reg.reward_functions.provenance("shout").plugin == "mine"
            assert all(p.name != "installed-shout" for p in reg.plugins)

        def test_installed_on_request(rlhf_plugin):
            reg = rlhf_plugin(component_plugin("reward_functions", shout, name="shout2"),
                              name="mine", installed=True)
            assert reg.reward_functions.provenance("shout").plugin == "installed-shout"

        def test_broken_plugin_not_hidden_by_an_installed_one(rlhf_plugin):
            # the installed plugin provides `shout` too: only the raise shows the failure
            with pytest.raises(PluginError, match="must be callable"):
                rlhf_plugin(Broken(), name="broken", installed=True)
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_site), *sys.path])}
    env.pop("RLHF_PLUGINS_LOAD", None)
    done = subprocess.run([sys.executable, "-c", code, str(test)], env=env, cwd=installed_site.parent,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
