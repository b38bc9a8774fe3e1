"""Shared checks of the bad-input tests: the CLI in-process, one error line, nothing written.

The standard (issue 14): exit code 2, exactly one ``rlhf-plugins: error:`` line naming the place
(file, row, field, plugin or component), no traceback, nothing written where the outputs go.
The CLI runs in the test process (`main(argv)`): one import of torch/TRL for the whole module,
so a case costs milliseconds when it fails before a model loads.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

ERROR_PREFIX = "rlhf-plugins: error: "


def run_main(argv: Sequence[str]) -> tuple[int, str, str]:
    """`rlhf-plugins ARGV` in this process -> (exit code, stdout, stderr)."""
    from rlhf_plugins.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def error_line(code: int, err: str, *needles: str) -> str:
    """Assert the issue's standard on a CLI run; return the error line."""
    assert code == 2, f"exit {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def cli_error(argv: Sequence[str], *needles: str, untouched: Iterable[Path] = ()) -> str:
    """Run the CLI, check the one-line error naming `needles`, and that every path of
    `untouched` is as it was (missing paths stay missing, files keep their bytes)."""
    before = {Path(p): snapshot(Path(p)) for p in untouched}
    code, _, err = run_main(argv)
    line = error_line(code, err, *needles)
    for path, state in before.items():
        assert snapshot(path) == state, f"{path} was written to"
    return line


def snapshot(path: Path) -> Any:
    """What is at `path`: None (nothing), bytes (a file), or {relative name: bytes} (a folder)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def write_yaml(path: Path, data: dict) -> Path:
    """`data` as YAML at `path`."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(user: str = "What is 2 + 2?", assistant: str = "The answer is 4.") -> dict:
    """An SFT row."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD_ROWS = [conversation(), conversation("Say hi", "Hi!")]

#: TRL fields that keep a CLI training run cheap (no checkpoints, no reporting)
FAST = {"report_to": "none", "save_strategy": "no", "logging_steps": 1}


def sft_cli_error(tmp_path: Path, model: Any, rows: Iterable[Any], row_error: str, *needles: str,
                  **settings: Any) -> str:
    """`rlhf-plugins sft` on `rows` (written to train.jsonl) with `settings` added to a cheap config:
    one error line naming the data file followed by `row_error` (and `needles`), nothing written."""
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "sft.yaml", {"model": str(model), "dataset": str(data), "output_dir": str(out),
                                             "max_steps": 1, **FAST, **settings})
    return cli_error(["sft", "--config", cfg], f"{data} {row_error}", *needles, untouched=[out])


def quiet_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one thread per process, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_PLUGINS_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env


def as_interrupted(out: Path) -> None:
    """Make the finished stage run in `out` look interrupted (killed before its end): its run
    record is not marked finished, so a rerun of the same config resumes instead of reporting
    that there is nothing to do."""
    record_path = out / "rlhf_plugins_run.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({k: v for k, v in record.items()
                                       if k not in ("finished", "entries")}))
