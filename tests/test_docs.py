"""The docs stay in step with the code: CLI reference, concept pages, links (fast, no torch)."""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: registry family -> its concept page under docs/concepts/
CONCEPT_PAGES = {
    "chat_templates": "chat_templates.md",
    "masking_strategies": "masking.md",
    "reward_heads": "reward_heads.md",
    "selection_rules": "selection_rules.md",
    "advantage_estimators": "advantage_estimators.md",
    "reward_functions": "reward_functions.md",
    "policy_losses": "policy_losses.md",
    "stages": "stages.md",
    "preference_losses": "preference_losses.md",
}


def _load_gen_cli():
    spec = importlib.util.spec_from_file_location("docs_gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builtin_names(registry, family: str) -> list[str]:
    """Names in `family` registered by a built-in plugin (also when a plugin overrides them)."""
    from rlhf_plugins.manager import DEFAULT_PLUGINS

    fam = registry.family(family)
    names = []
    for name in fam.names():
        prov = fam.provenance(name)
        while prov is not None:
            if prov.plugin in DEFAULT_PLUGINS:
                names.append(name)
                break
            prov = prov.overrides
    return names


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "rlhf-plugins") -> list[str]:
    """Every command path (`rlhf-plugins rm mc-labels`, ...) of an argparse parser."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix} {name}")
                out.extend(_subcommands(sub, f"{prefix} {name}"))
    return out


# --- (a) the CLI reference is the parser's current output ---------------------------------

def test_cli_md_is_fresh(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    gen = _load_gen_cli()
    fresh = gen.render()
    assert gen.OUT == DOCS / "cli.md"
    assert gen.OUT.is_file(), "docs/cli.md is missing: run `python docs/gen_cli.py`"
    assert gen.OUT.read_text() == fresh, "docs/cli.md is stale: run `python docs/gen_cli.py`"


# --- (b) every built-in component is on its family's concept page --------------------------

def test_concept_pages_cover_every_family():
    from rlhf_plugins import registry

    assert set(CONCEPT_PAGES) == set(registry().families), \
        "a family was added or renamed: give it a page under docs/concepts/ and map it here"
    for page in CONCEPT_PAGES.values():
        assert (DOCS / "concepts" / page).is_file(), page


@pytest.mark.parametrize("family", sorted(CONCEPT_PAGES))
def test_concept_page_lists_every_builtin(family):
    from rlhf_plugins import registry

    names = _builtin_names(registry(), family)
    assert names, f"no built-in {family} found (is the registry loading its built-ins?)"
    text = (DOCS / "concepts" / CONCEPT_PAGES[family]).read_text()
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"docs/concepts/{CONCEPT_PAGES[family]} does not mention {missing}"


# --- (c) every CLI command has a section in docs/cli.md ------------------------------------

def test_cli_md_has_every_subcommand():
    from rlhf_plugins.cli.main import build_parser

    commands = _subcommands(build_parser())
    assert "rlhf-plugins pipeline" in commands and "rlhf-plugins rm mc-labels" in commands
    text = (DOCS / "cli.md").read_text()
    headings = set(re.findall(r"^#+ `([^`]+)`\s*$", text, flags=re.MULTILINE))
    missing = [c for c in commands if c not in headings]
    assert not missing, f"docs/cli.md has no section for {missing}"


# --- (d) relative links resolve ------------------------------------------------------------

LINK_RE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_RE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE_RE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN_RE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)


def _strip_code(text: str) -> str:
    return CODE_SPAN_RE.sub("", FENCE_RE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE_RE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


MARKDOWN_FILES = sorted([*DOCS.glob("*.md"), *(DOCS / "concepts").glob("*.md"), ROOT / "README.md"])


def test_link_checker_sees_the_docs():
    names = {p.relative_to(ROOT).as_posix() for p in MARKDOWN_FILES}
    assert {"README.md", "docs/index.md", "docs/pipeline.md", "docs/cli.md",
            "docs/concepts/masking.md"} <= names


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    text = _strip_code(path.read_text())
    links = LINK_RE.findall(text) + REF_RE.findall(text)
    broken = []
    for link in links:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("//"):
            continue  # http:, https:, mailto: ...
        target, _, anchor = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if target.endswith("/"):
            ok = dest.is_dir()
        else:
            ok = dest.is_file()
        if ok and anchor and dest.suffix == ".md":
            ok = anchor.lower() in _anchors(dest)
        if not ok:
            broken.append(link)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_link_checker_catches_a_broken_link(tmp_path):
    """The checker's pieces reject what they should (so the tests above can fail)."""
    text = "[a](missing.md) `[b](also_missing.md)` ![c](img.png \"t\")\n```\n[d](x.md)\n```\n"
    assert LINK_RE.findall(_strip_code(text)) == ["missing.md", "img.png"]
    page = tmp_path / "p.md"
    page.write_text("# Harmony (gpt-oss) offline\n## `rlhf-plugins rm mc-labels`\n## Again\n## Again\n")
    assert _anchors(page) == {"harmony-gpt-oss-offline", "rlhf-plugins-rm-mc-labels", "again",
                              "again-1"}


# --- (e) the plugin guide's code runs -------------------------------------------------------

def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_writing_plugins_examples_run_and_register_every_family():
    """Each SDK example in docs/writing_plugins.md runs; the per-family one registers its components."""
    from rlhf_plugins import decorators, registry
    from rlhf_plugins.protocols import FAMILIES

    blocks = [b for b in _python_blocks(DOCS / "writing_plugins.md") if "hookimpl" not in b]
    assert len(blocks) >= 2
    saved = {f: dict(c) for f, c in decorators._script.components.items()}
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "writing_plugins.md", "exec"), namespace)  # noqa: S102
        reg = registry(reload=True)
        script_families = {fam for fam in FAMILIES
                           if any(reg.family(fam).provenance(n).plugin == "__script__"
                                  for n in reg.family(fam).names())}
        # every family but selection rules is registered by the per-family block; the options
        # block shows a selection rule
        assert script_families >= set(FAMILIES) - {"selection_rules"}
    finally:
        for fam, comps in saved.items():
            decorators._script.components[fam] = comps
        registry(reload=True)
