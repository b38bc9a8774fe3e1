"""`rlhf-plugins plugins` and `rlhf-plugins components`: what is installed and what it provides."""
from __future__ import annotations

import argparse

from .common import print_json, print_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plugins", help="list loaded plugins (built-in and installed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="(kept for llm compatibility; lists all)")
    p.set_defaults(func=run_plugins)

    c = subparsers.add_parser("components", help="list registered components, by family")
    c.add_argument("family", nargs="?", help="one family (e.g. chat_templates); default: all")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_components)


def run_plugins(args: argparse.Namespace) -> int:
    from .. import registry

    reg = registry()
    data = [p.as_dict() for p in reg.plugins]
    if args.json:
        print_json(data)
        return 0
    rows = []
    for p in reg.plugins:
        comps = "; ".join(f"{fam}: {', '.join(names)}" for fam, names in p.components.items())
        status = p.status if p.status == "ok" else f"{p.status}: {p.error}"
        rows.append((p.name, p.distribution or "", p.version or "", comps, status))
    print_table("rlhf-plugins plugins", ["plugin", "distribution", "version", "components", "status"], rows)
    return 0


def run_components(args: argparse.Namespace) -> int:
    from .. import registry

    reg = registry()
    families = [reg.family(args.family)] if args.family else list(reg.families.values())
    data = {
        fam.name: [
            {"name": name, "description": fam.description(name), **fam.provenance(name).as_dict()}
            for name in fam.names()
        ]
        for fam in families
    }
    if args.json:
        print_json(data if args.family is None else data[args.family])
        return 0
    rows = [(fam, item["name"], item["plugin"], item["description"])
            for fam, items in data.items() for item in items]
    print_table("rlhf-plugins components", ["family", "name", "plugin", "description"], rows)
    return 0
