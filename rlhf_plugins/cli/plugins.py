"""`rlhf-plugins plugins` and `rlhf-plugins components`: what is installed and what it provides."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .common import print_json, print_table

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plugins", help="list loaded plugins (built-in and installed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_plugins)

    c = subparsers.add_parser("components", help="list registered components, by family")
    c.add_argument("family", nargs="?", help="one family (e.g. chat_templates); default: all")
    c.add_argument("--json", action="store_true",
                   help="machine-readable output (with each option's name, type, default and help)")
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


def component_options(fam: Any, name: str) -> list[dict[str, Any]]:
    """`fam.options(name)` plus `required`; [] (logged) when a component's schema is broken."""
    try:
        options = fam.options(name)
        required = getattr(fam.get(name), "required_options", ()) or ()
    except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the listing
        logger.warning("%s component %r: cannot list its options (%s: %s)", fam.name, name,
                       type(exc).__name__, exc)
        return []
    return [{**opt, "required": opt["name"] in required} for opt in options]


def _compact(options: list[dict[str, Any]]) -> str:
    """`k (required), seed=0` for the table view."""
    return ", ".join(f"{o['name']} (required)" if o["required"] else f"{o['name']}={o['default']!r}"
                     for o in options)


def run_components(args: argparse.Namespace) -> int:
    from .. import registry

    reg = registry()
    families = [reg.family(args.family)] if args.family else list(reg.families.values())
    data = {
        fam.name: [
            {"name": name, "description": fam.description(name), **fam.provenance(name).as_dict(),
             "options": component_options(fam, name)}
            for name in fam.names()
        ]
        for fam in families
    }
    if args.json:
        print_json(data if args.family is None else data[args.family])
        return 0
    rows = [(fam, item["name"], item["plugin"], item["description"], _compact(item["options"]))
            for fam, items in data.items() for item in items]
    print_table("rlhf-plugins components", ["family", "name", "plugin", "description", "options"],
                rows)
    return 0
