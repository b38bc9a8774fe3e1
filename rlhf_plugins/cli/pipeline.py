"""`rlhf-plugins pipeline CONFIG`: SFT -> reward model -> rejection sampling -> PPO, with a report."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pipeline", help="run the whole pipeline (SFT, reward model, rejection sampling, PPO)",
        description="Run the configured stages in order, evaluating held-out verifiable accuracy "
                    "after each; finished stages with an unchanged config are skipped, "
                    "interrupted ones resume from their last checkpoint. Writes report.md.")
    p.add_argument("config", help="pipeline YAML (e.g. examples/quickstart.yaml)")
    p.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    p.add_argument("--smoke", action="store_true",
                   help="apply the config's `smoke:` overrides (tiny sizes, for CI)")
    p.add_argument("--stages", help="comma-separated subset of stages to run, in order")
    p.add_argument("--overwrite", action="store_true",
                   help="empty every selected stage's folder and rerun it, replacing files no "
                        "run of rlhf-plugins recorded (otherwise an error)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..stages.pipeline import Pipeline, load_pipeline_config

    settings = load_pipeline_config(args.config, smoke=args.smoke, output_dir=args.output_dir)
    if args.overwrite:
        settings = dataclasses.replace(settings, overwrite=True)
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        settings = dataclasses.replace(settings, stages=stages)  # re-validated
    report = Pipeline(settings, config_label=args.config, smoke=args.smoke).run()
    print(f"report: {report}")
    return 0
