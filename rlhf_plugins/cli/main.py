"""Entry point of `rlhf-plugins`: discovers command modules and turns user errors into exit 2."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import pkgutil
import sys
from typing import Iterator, Sequence

from .. import __version__
from ..errors import RlhfPluginsError
from ..guard import one_line
from .common import add_plugin_option, plugin_specs


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: every module in `rlhf_plugins.cli` with `add_parser` adds one."""
    parser = argparse.ArgumentParser(
        prog="rlhf-plugins",
        description="Post-training (SFT, reward models, rejection sampling, PPO/GRPO) where "
                    "every component is a named plugin.")
    parser.add_argument("--version", action="version", version=f"rlhf-plugins {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("main", "common") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(subparsers)
    add_plugin_option(parser)  # after the commands: it adds itself to each of them too
    return parser


#: libraries whose warnings a user cannot act on (deprecations inside transformers/TRL, the
#: bitsandbytes "pip install kernels" CPU notice, the `kernels` package's hub trust-check notice at
#: import); shown again with -v
_NOISY_LOGGERS = ("bitsandbytes", "transformers", "trl", "peft", "accelerate", "datasets", "torchao",
                  "kernels", "huggingface_hub")
_NOISY_MODULES = r"(transformers|trl|peft|bitsandbytes|accelerate|datasets|torch|torchao)(\.|$)"
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def quiet_libraries(verbose: int) -> Iterator[None]:
    """Silence third-party warnings and library log noise unless `-v` asks for detail (undone
    on exit, so calling `main` in-process leaves the interpreter as it was)."""
    import os
    import warnings

    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    env = {name: os.environ.get(name) for name in _QUIET_ENV}
    with warnings.catch_warnings():
        if verbose:
            warnings.simplefilter("default")  # every warning once, deprecations included
        else:
            for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY_MODULES)
            for name, value in _QUIET_ENV.items():  # read when those libraries first log
                os.environ.setdefault(name, value)
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plugin = plugin_specs(args)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    with quiet_libraries(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command's handler; project errors become one `rlhf-plugins: error:` line + exit 2."""
    try:
        if args.plugin:
            from ..decorators import load_plugin_module

            for spec in args.plugin:
                load_plugin_module(spec)
        return int(args.func(args) or 0)
    except RlhfPluginsError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()  # with the original exception of a wrapped component error
        print(f"rlhf-plugins: error: {one_line(str(_in_config(exc, args)))}", file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # anything else is a bug worth its traceback
        if args.verbose:
            import traceback

            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rlhf-plugins: error: {where}{exc.strerror or exc} (completed files were kept; "
              "free space and rerun to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf-plugins: interrupted", file=sys.stderr)
        return 130


def _in_config(exc: RlhfPluginsError, args: argparse.Namespace) -> RlhfPluginsError:
    """A config problem (a field, a component name) that does not name the config file yet,
    prefixed with it: `sft.yaml: model: ...`. Errors about data files, plugins and flags are
    left as they are."""
    from ..errors import ConfigError, UnknownComponentError
    from ..guard import located

    config = getattr(args, "config", None)
    if not isinstance(config, str) or not isinstance(exc, (ConfigError, UnknownComponentError)):
        return exc
    text = str(exc)
    if text.startswith(("--", "override ")) or config in text:
        return exc
    return located(exc, config)


if __name__ == "__main__":
    sys.exit(main())
