"""The CLI's plugin handling (issue 31): `--plugin` before or after the command, text shown as it
is, hints and path errors that say where to look. The CLI runs in-process (`run_main`)."""
from __future__ import annotations

import json

import pytest

from helpers_bad_inputs import cli_error, run_main, write_yaml

RULE_PLUGIN = '''
from dataclasses import dataclass
from rlhf_plugins import hookimpl, sdk


@dataclass(frozen=True)
class {cls}(sdk.SelectionRule):
    """Keeps [bold]every[/bold] first completion; needs pkg[extra]."""
    name = "{name}"

    def choose(self, rewards):
        return [(i, 0) for i, row in enumerate(rewards) if row]


@hookimpl
def register_selection_rules(register):
    register({cls}())
'''


@pytest.fixture
def rule_file(tmp_path):
    """Write a plugin file registering a selection rule; the plugins it loads are removed after."""
    from rlhf_plugins import manager, registry

    before = set(manager._extra_plugins)

    def write(name: str) -> str:
        path = tmp_path / f"{name}.py"
        path.write_text(RULE_PLUGIN.format(cls=name.title().replace("_", ""), name=name))
        return str(path)

    yield write
    for name in set(manager._extra_plugins) - before:
        manager.remove_plugin(name)
    registry(reload=True)


def _rules(stdout: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(stdout)}


def _descriptions(table: str) -> str:
    """The `components` table's description column, its wrapped cells joined with spaces."""
    cells = [line.split("│")[4].strip() for line in table.splitlines() if line.count("│") == 6]
    return " ".join(cell for cell in cells if cell)


def test_components_shows_bracketed_text_as_written(rule_file):
    """rich took `[math]` in "needs rlhf-plugins[math]" for markup and printed "needs rlhf-plugins"."""
    code, out, err = run_main(["-p", rule_file("bracket_rule_31"), "components", "selection_rules"])
    assert code == 0, err
    assert "Keeps [bold]every[/bold] first completion; needs pkg[extra]." in _descriptions(out)
    code, out, err = run_main(["components", "reward_functions"])
    assert code == 0, err
    text = _descriptions(out)
    assert text.count("(needs rlhf-plugins[math])") == 2  # the accuracy and cosine rewards
    assert "(needs rlhf-plugins)" not in text


def test_print_table_escapes_titles_headers_and_cells(capsys):
    from rlhf_plugins.cli.common import print_table

    print_table("runs [final]", ["name [unit]"], [["[red]x[/red]"], [None]])
    out = capsys.readouterr().out
    assert "runs [final]" in out and "name [unit]" in out and "[red]x[/red]" in out


@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_plugin_flag_before_or_after_the_command(rule_file, where):
    first, second = rule_file("first_rule_31"), rule_file("second_rule_31")
    argv = {"before": ["-p", first, "components", "selection_rules", "--json"],
            "after": ["components", "selection_rules", "--json", "--plugin", first],
            "both": ["-p", first, "components", "--plugin", second, "selection_rules", "--json"]}[where]
    code, out, err = run_main(argv)
    assert code == 0, err
    rules = _rules(out)
    assert rules["first_rule_31"]["plugin"].startswith("rlhf_plugins_user_")
    assert ("second_rule_31" in rules) == (where == "both")


def test_plugin_flag_after_a_nested_command_and_in_its_help():
    from rlhf_plugins.cli.common import plugin_specs
    from rlhf_plugins.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["-p", "a.py", "data", "-p", "b.py", "synth", "--out", "x",
                              "--plugin", "c.py", "-p", "d"])
    assert plugin_specs(args) == ["a.py", "b.py", "c.py", "d"]
    assert plugin_specs(parser.parse_args(["components"])) == []
    code, out, _ = run_main(["sft", "--help"])
    assert code == 0 and "-p MODULE_OR_PATH, --plugin MODULE_OR_PATH" in out


def test_a_missing_plugin_file_after_the_command_is_one_error_line(tmp_path):
    missing = tmp_path / "nowhere" / "rules.py"
    cli_error(["components", "-p", missing], f"--plugin {missing}: file not found",
              f"(looked for {missing.resolve()})")


def test_unknown_component_hint_names_plugin_files_and_config_plugins(tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "pipe.yaml", {"output_dir": str(out), "stages": ["rejection_sampling"],
                                              "rejection_sampling": {"selection": "best_of_nn"}})
    line = cli_error(["pipeline", cfg], "unknown selection_rules component 'best_of_nn'",
                     "install it, then check `rlhf-plugins plugins`",
                     "`--plugin FILE_OR_MODULE`", "a config's `plugins:` list", untouched=[out])
    assert str(cfg) in line


def test_a_wrong_plugins_path_names_the_resolved_path(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    out = tmp_path / "out"
    cfg = write_yaml(configs / "pipe.yaml", {"plugins": ["../plugins/my_rules.py"], "output_dir": str(out),
                                             "stages": ["rejection_sampling"]})
    monkeypatch.chdir(tmp_path)  # a relative config path: the message must not depend on it
    line = cli_error(["pipeline", "configs/pipe.yaml"], "configs/pipe.yaml: plugins: ../plugins/my_rules.py: "
                     f"file not found (looked for {tmp_path / 'plugins' / 'my_rules.py'}, relative to the "
                     "config file)", untouched=[out])
    assert line.count("rlhf-plugins: error:") == 1
