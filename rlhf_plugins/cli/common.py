"""Small helpers shared by command modules (light imports only)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence


def print_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table with rich (plain text when stdout is not a terminal); every string is shown
    as it is (escaped: rich would take `[math]` in "rlhf-plugins[math]" for markup and drop it)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), show_lines=False)
    for column in columns:
        table.add_column(escape(column), overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else escape(str(v)) for v in row))
    Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160).print(table)


#: where `-p/--plugin` given after a command (at nesting depth N) is parsed to: `PLUGINS_AFTER + N`
#: (argparse gives each subcommand a fresh namespace, so one shared dest would drop earlier values)
PLUGINS_AFTER = "plugins_after_command_"


def add_plugin_option(parser: argparse.ArgumentParser, depth: int = 0) -> None:
    """The repeatable ``-p/--plugin MODULE_OR_PATH`` option: on the top-level parser (depth 0)
    and, recursively, on every command under it, so it may come before or after the command."""
    parser.add_argument("-p", "--plugin", action="append", metavar="MODULE_OR_PATH",
                        dest="plugin" if depth == 0 else f"{PLUGINS_AFTER}{depth}",
                        default=[] if depth == 0 else argparse.SUPPRESS,
                        help="import a module or .py file that registers components (repeatable; "
                             "before or after the command)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():  # aliases once
                add_plugin_option(sub, depth + 1)


def plugin_specs(args: argparse.Namespace) -> list[str]:
    """Every ``--plugin`` value, in order: those before the command, then those after it."""
    after = sorted(key for key in vars(args) if key.startswith(PLUGINS_AFTER))
    return [*getattr(args, "plugin", []), *(spec for key in after for spec in getattr(args, key))]


SET_EXAMPLE = "--set max_steps=10 --set lora.r=8"


def add_output_and_overrides(parser: Any, output_help: str, example: str = SET_EXAMPLE) -> None:
    """The ``--output-dir DIR`` and repeatable ``--set KEY=VALUE`` options of the stage commands."""
    parser.add_argument("--output-dir", metavar="DIR", help=f"{output_help} (overrides output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable; dotted keys for sections, "
                             f"e.g. {example})")
    parser.add_argument("--overwrite", dest="overrides", action="append_const",
                        const="overwrite=true",
                        help="replace what the output directory holds: files no run of "
                             "rlhf-plugins recorded, or a finished run of this config (which "
                             "is otherwise reported and left as it is)")


def stage_command(subparsers: Any, name: str, *, help: str, description: str,  # noqa: A002
                  output_help: str, func: Any, config_required: bool = True,
                  config_help: str = "stage config file") -> Any:
    """A stage command's parser: ``--config YAML``, ``--output-dir``, ``--set``, and its handler."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--config", required=config_required, metavar="YAML", help=config_help)
    add_output_and_overrides(parser, output_help)
    parser.set_defaults(func=func)
    return parser


def metric_parts(metrics: Any, keys: Sequence[str], prefix: str = "") -> list[str]:
    """``key=value`` strings (4 decimals) for those of `keys` that `metrics` has (not None)."""
    return [f"{prefix}{key}={metrics[key]:.4f}" for key in keys if metrics.get(key) is not None]


def print_stage_result(parts: Sequence[str], metrics_path: Any) -> int:
    """Print a stage command's one-line result; return exit status 0."""
    print("; ".join(parts) + f" (metrics: {metrics_path})")
    return 0


def print_up_to_date(command: str, output_dir: Any) -> int:
    """Print that `output_dir` already holds a finished run of this config; return exit status 0."""
    print(f"{command}: {output_dir} already holds a finished run of this config; nothing to do "
          "(--overwrite retrains)")
    return 0
