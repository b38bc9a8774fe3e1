"""Make real installed-distribution metadata for plugin tests (dist-info + entry points)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_dist(site: Path, dist: str, version: str, entry_points: dict[str, str],
              modules: dict[str, str]) -> Path:
    """Write modules plus a `<dist>-<version>.dist-info` with `rlhf_plugins` entry points."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[rlhf_plugins]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


def run_cli(args: list[str], site: Path | None = None, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m rlhf_plugins.cli.main ARGS` with `site` on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_PLUGINS_")}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "rlhf_plugins.cli.main", *args], env=full_env,
                          capture_output=True, text=True, check=check, timeout=300)


def plugins_json(site: Path | None = None, env: dict[str, str] | None = None) -> list[dict]:
    """`rlhf-plugins plugins --json`, parsed."""
    proc = run_cli(["plugins", "--json"], site, env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
