"""Generate docs/cli.md from the argument parser: `python docs/gen_cli.py` (CI checks it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "cli.md"


def render() -> str:
    """The CLI reference as Markdown, one section per command."""
    from rlhf_plugins.cli.main import build_parser

    parser = build_parser()
    parser.prog = "rlhf-plugins"
    lines = ["# CLI reference", "", "Generated from the parser by `python docs/gen_cli.py`; "
             "do not edit by hand.", "", "```text", parser.format_help().rstrip(), "```", ""]
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:
        for name, p in sorted(sub.choices.items()):
            lines += [f"## `rlhf-plugins {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
            nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
            for n in nested:
                for child, cp in sorted(n.choices.items()):
                    lines += [f"### `rlhf-plugins {name} {child}`", "", "```text",
                              cp.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    os.environ["COLUMNS"] = "100"
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
