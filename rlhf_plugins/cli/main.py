"""Entry point of `rlhf-plugins`: discovers command modules and turns user errors into exit 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from .. import __version__
from ..errors import RlhfPluginsError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: every module in `rlhf_plugins.cli` with `add_parser` adds one."""
    parser = argparse.ArgumentParser(
        prog="rlhf-plugins",
        description="Post-training (SFT, reward models, rejection sampling, PPO/GRPO) where "
                    "every component is a named plugin.")
    parser.add_argument("--version", action="version", version=f"rlhf-plugins {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    parser.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE_OR_PATH",
                        help="import a module or .py file that registers components (repeatable)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("main", "common") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if args.plugin:
            from ..decorators import load_plugin_module

            for spec in args.plugin:
                load_plugin_module(spec)
        return int(args.func(args) or 0)
    except RlhfPluginsError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"rlhf-plugins: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf-plugins: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
