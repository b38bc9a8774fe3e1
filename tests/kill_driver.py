"""Run the CLI and SIGKILL the process at a chosen point (for the kill -9 tests).

    python tests/kill_driver.py '{"target": "module:Class.method", "nth": 2, "when": "after"}' ARGS...

`target` is patched so that its `nth` call (counting only calls whose arguments' text contains
`match`, when given) kills the process with SIGKILL `before` running it (e.g. the rename that
would publish a file) or `after` it returned (e.g. a checkpoint fully written). Deterministic,
unlike racing a timer against a busy process. With `{}` the CLI runs unpatched.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys


def _resolve(target: str) -> tuple[object, str]:
    module_name, _, path = target.partition(":")
    owner: object = importlib.import_module(module_name)
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def install(spec: dict) -> None:
    """Patch `spec["target"]` to SIGKILL this process at the chosen call."""
    owner, name = _resolve(spec["target"])
    original = getattr(owner, name)
    nth, when, match = int(spec.get("nth", 1)), spec.get("when", "before"), spec.get("match")
    calls = [0]

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        if match is None or match in repr(args) + repr(kwargs):
            calls[0] += 1
            if calls[0] == nth and when == "before":
                die()
            result = original(*args, **kwargs)
            if calls[0] == nth and when == "after":
                die()
            return result
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec:
        install(spec)
    from rlhf_plugins.cli.main import main

    sys.exit(main(sys.argv[2:]))
