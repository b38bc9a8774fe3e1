"""`rlhf-plugins data synth`: write the built-in synthetic task's datasets as JSONL."""
from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group."""
    p = subparsers.add_parser("data", help="build datasets (the built-in synthetic task)")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    s = sub.add_parser(
        "synth", help="write the synthetic verifiable task (SFT, preference, ranked, outcome, "
                      "step, RL) as JSONL files")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.add_argument("--n", type=int, default=1000, help="rows per dataset for the train split "
                                                       "(default 1000)")
    s.add_argument("--n-test", type=int, default=None,
                   help="rows per dataset for the held-out test split (default n // 5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--splits", default="train,test",
                   help="comma-separated splits among train, validation, test (default train,test)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Write every synthetic dataset and print a summary."""
    from ..data.synth import write_synth
    from .common import print_json, print_table

    splits = [x.strip() for x in str(args.splits).split(",") if x.strip()]
    if not splits:
        raise ConfigError("--splits: give at least one split (train, validation, test)")
    from ..guard import check_output_dir

    for flag, value in (("--n", args.n), ("--n-test", args.n_test)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected a positive integer, got {value}")
    from ..data.problems import check_split

    for split in splits:
        try:
            check_split(split)
        except ConfigError as exc:
            raise ConfigError(f"--splits: {exc}") from None
    check_output_dir(args.out, "--out")
    summary = write_synth(args.out, n=args.n, seed=args.seed, n_test=args.n_test, splits=splits)
    if args.json:
        print_json(summary)
        return 0
    rows = [(v["dataset"], v["split"], v["rows"], v["path"]) for v in summary.values()]
    print_table(f"synthetic task (seed {args.seed})", ["dataset", "split", "rows", "file"], rows)
    return 0
