"""The plugin host: registration, validation, collisions, overrides, lookup errors."""
from __future__ import annotations

import logging

import pytest

import rlhf_plugins
from rlhf_plugins import hookimpl, hookspecs
from rlhf_plugins.errors import ConfigError, PluginError, UnknownComponentError
from rlhf_plugins.protocols import FAMILIES
from rlhf_plugins.testing import component_plugin, registered_plugin


class Select:
    """Pick nothing (test rule)."""

    name = "pick_nothing"

    def select(self, rewards, **params):
        return []


class Configurable:
    name = "configurable"
    description = "A rule with options"

    def __init__(self, k=1):
        self.k = k

    def select(self, rewards, **params):
        return []

    def configure(self, **options):
        return Configurable(**options)


def test_registry_is_cached_and_reloadable():
    a = rlhf_plugins.registry()
    assert rlhf_plugins.registry() is a
    assert rlhf_plugins.registry(reload=True) is not a


def test_every_family_is_an_attribute_with_the_family_api():
    reg = rlhf_plugins.registry(reload=True)
    for family in FAMILIES:
        fam = getattr(reg, family)
        assert fam is reg.family(family)
        assert list(fam) == fam.names() == sorted(fam.names())


def test_builtin_plugins_load_ok_with_provenance():
    reg = rlhf_plugins.registry(reload=True)
    from rlhf_plugins.manager import DEFAULT_PLUGINS

    builtins = [p for p in reg.plugins if p.name in DEFAULT_PLUGINS]
    assert {p.name for p in builtins} == set(DEFAULT_PLUGINS)
    assert {f"rlhf_plugins.builtin.{m}" for m in ("chat_templates", "masking", "reward_heads", "selection",
            "advantages", "rewards", "policy_losses")} | {"rlhf_plugins.stages.builtin"} <= {p.name for p in builtins}
    assert all(p.status == "ok" and p.distribution == "rlhf-plugins"
               and p.version == rlhf_plugins.__version__ for p in builtins)


def test_registered_component_resolves_with_provenance(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("selection_rules", Select()), name="my-plugin")
    assert reg.selection_rules.get("pick_nothing").select([[1.0]]) == []
    prov = reg.selection_rules.provenance("pick_nothing")
    assert prov.plugin == "my-plugin" and prov.overrides is None
    assert reg.selection_rules.description("pick_nothing") == "Pick nothing (test rule)."
    info = next(p for p in reg.plugins if p.name == "my-plugin")
    assert info.components == {"selection_rules": ["pick_nothing"]}
    assert info.hooks == ["register_selection_rules"]


def test_plugin_is_unregistered_after_the_block():
    with registered_plugin(component_plugin("selection_rules", Select()), "temp") as reg:
        assert "pick_nothing" in reg.selection_rules
    assert "pick_nothing" not in rlhf_plugins.registry().selection_rules


def test_get_with_options_calls_configure(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("selection_rules", Configurable()))
    assert reg.selection_rules.get("configurable", k=7).k == 7
    reg = rlhf_plugin(component_plugin("selection_rules", Select()))
    with pytest.raises(ConfigError, match="pick_nothing.*takes no options"):
        reg.selection_rules.get("pick_nothing", k=1)


def test_unknown_component_lists_names_and_suggests(rlhf_plugin):
    reg = rlhf_plugin(component_plugin("selection_rules", Select()))
    with pytest.raises(UnknownComponentError) as info:
        reg.selection_rules.get("pick_nothin")
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    assert "Did you mean 'pick_nothing'?" in message
    assert "Available:" in message and "pick_nothing" in message
    assert "plugin package may provide it" in message
    with pytest.raises(UnknownComponentError, match="Did you mean 'reward_heads'"):
        reg.family("reward_head")


@pytest.mark.parametrize("family,component,name,expected", [
    ("selection_rules", object(), "bad", "missing select()"),
    ("reward_functions", 42, "not_callable", "must be callable"),
    ("selection_rules", Select(), "has space", "invalid component name 'has space'"),
    ("selection_rules", Select(), 12, "needs a string name"),
    ("policy_losses", object(), "not_callable", "must be callable"),
    ("preference_losses", object(), "not_callable", "must be callable"),
    ("reward_heads", Select(), "head", "missing build_module(), encode(), collate(), compute_loss(), "
                                       "sequence_scores()"),
    ("chat_templates", Select(), "tpl", "missing render_text(), encode(), attribute 'jinja'"),
])
def test_invalid_components_fail_the_plugin_with_a_clear_error(rlhf_plugin, family, component,
                                                               name, expected):
    reg = rlhf_plugin(component_plugin(family, component, name=name), name="broken-plugin",
                      raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "broken-plugin")
    assert info.status == "failed"
    assert "ComponentTypeError" in info.error and "broken-plugin" in info.error
    assert expected in info.error
    assert "\n" not in info.error


def test_failed_plugin_registers_nothing_at_all(rlhf_plugin):
    class HalfGood:
        @hookimpl
        def register_selection_rules(self, register):
            register(Select())
            register(object(), name="bad")

    reg = rlhf_plugin(HalfGood(), name="half", raise_errors=False)
    assert "pick_nothing" not in reg.selection_rules
    assert next(p for p in reg.plugins if p.name == "half").components == {}


def test_collision_names_both_plugins_and_override_replaces(rlhf_plugin, caplog):
    rlhf_plugin(component_plugin("selection_rules", Select()), name="first")
    reg = rlhf_plugin(component_plugin("selection_rules", Select()), name="second",
                      raise_errors=False)
    second = next(p for p in reg.plugins if p.name == "second")
    assert second.status == "failed"
    assert "'pick_nothing' is registered by both first and second" in second.error

    replacement = Select()
    with caplog.at_level(logging.INFO, logger="rlhf_plugins"):
        reg = rlhf_plugin(component_plugin("selection_rules", replacement, override=True), name="third")
    assert reg.selection_rules.get("pick_nothing") is replacement
    prov = reg.selection_rules.provenance("pick_nothing")
    assert prov.plugin == "third" and prov.overrides.plugin == "first"
    assert any("overridden by third" in r.message for r in caplog.records)


def test_strict_mode_reraises(rlhf_plugin, monkeypatch):
    monkeypatch.setenv("RLHF_PLUGINS_STRICT", "1")
    with pytest.raises(PluginError, match="missing select"):
        rlhf_plugin(component_plugin("selection_rules", object(), name="bad"))


def test_misspelled_hook_is_an_error_not_a_silent_noop(rlhf_plugin):
    class Typo:
        @hookimpl
        def register_selection_rule(self, register):  # missing "s"
            register(Select())

    reg = rlhf_plugin(Typo(), name="typo", raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "typo")
    assert info.status == "failed" and "register_selection_rule" in info.error


def test_hook_argument_not_in_spec_is_rejected(rlhf_plugin):
    class Extra:
        @hookimpl
        def register_selection_rules(self, register, config):
            pass

    reg = rlhf_plugin(Extra(), name="extra-arg", raise_errors=False)
    info = next(p for p in reg.plugins if p.name == "extra-arg")
    assert info.status == "failed" and "config" in info.error


def test_reward_function_decorator_registers_for_scripts():
    @rlhf_plugins.reward_function
    def always_one(prompts, completions, **kw):
        """Always 1."""
        return [1.0] * len(completions)

    try:
        reg = rlhf_plugins.registry()
        assert reg.reward_functions.get("always_one") is always_one
        assert reg.reward_functions.provenance("always_one").plugin == "__script__"
    finally:
        from rlhf_plugins import decorators
        decorators._script.components["reward_functions"].clear()
        rlhf_plugins.registry(reload=True)


def test_every_hookspec_is_documented_and_maps_to_a_family():
    specs = {n for n in dir(hookspecs) if n.startswith("register_")}
    assert specs == {spec.hook for spec in FAMILIES.values()}
    for spec in FAMILIES.values():
        doc = getattr(hookspecs, spec.hook).__doc__
        assert doc and f"protocols.{spec.protocol.__name__}" in doc
        assert "\n" not in doc.strip(), spec.hook  # one line: the contract is the family table
