"""Direct alignment on verified samples: DPO (+ NLL) vs rejection-sampling SFT vs KTO, side by side.

One command, one run, the embedded model on 2 CPU cores:

1. the quickstart's SFT and rejection sampling (`examples/quickstart.yaml`, stages
   [sft, rejection_sampling]): the SFT model, ~2,700 samples graded by the verifier, and the
   rejection-sampling SFT model trained on the verified ones (the baseline);
2. DPO from the SFT model on (verified-correct, failed) pairs of the *same* samples
   (`write_verified_pairs`, at most 2 per prompt; every third prompt held out), `sigmoid` loss +
   `rpo_alpha` NLL on the chosen completion;
3. KTO from the SFT model on the same samples, each labelled by the verifier, for as many
   steps as DPO took;
4. DPO the way a `dpo` stage after `rejection_sampling` in the quickstart runs it: from the
   rejection-sampling SFT model, on the same pairs;
5. every model greedily on the same held-out problems as the quickstart (`exact_answer`), with
   Wilson intervals, and paired bootstrap intervals + McNemar against SFT and against RS-SFT.

    python bench/direct_alignment.py --run runs/direct [--eval-split test] [--dpo-lr 1e-4] [--float32]
                                     [--rpo-alpha 0.5] [--kto-desirable-weight 1] [--only dpo|kto]

The models are trained the same whatever the split (the pipeline's task keeps `eval_split:
validation`; test problems are answered by a second evaluation over the same models), so tune
on `--eval-split validation`, then rerun the same command with `--eval-split test`: nothing is
trained again. Results: bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"bf16": True, "per_device_train_batch_size": 8, "lr_scheduler_type": "constant",
         "logging_steps": 5, "save_steps": 1000, "report_to": "none", "seed": 0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def float32_config() -> dict[str, Any]:
    """The quickstart's config with every bf16 switch turned to float32 (for CPUs without
    AVX512-BF16, where bf16 autocast and bf16 decoding are several times slower than float32)."""
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    config["eval"]["dtype"] = "float32"
    config["rejection_sampling"]["dtype"] = "float32"
    for section in (config["sft"], config["reward_model"], config["ppo"],
                    config["rejection_sampling"]["sft"]):
        section["bf16"] = False
    return config


def _settings(run: Path, eval_split: str, float32: bool) -> Any:
    from rlhf_plugins.stages.gate import GateSettings
    from rlhf_plugins.stages.pipeline import load_pipeline_config

    source = float32_config() if float32 else ROOT / "examples" / "quickstart.yaml"
    settings = load_pipeline_config(source, output_dir=str(run))
    return dataclasses.replace(settings, stages=["sft", "rejection_sampling"], gate=GateSettings(),
                               task=dataclasses.replace(settings.task, eval_split=eval_split))


def _pipeline(run: Path, float32: bool = False) -> tuple[Any, str, str, str]:
    """SFT + rejection sampling as the quickstart runs them, evaluated on validation problems;
    (pipeline, SFT stage outputs, samples, rejection-sampling stage outputs)."""
    from rlhf_plugins.stages.pipeline import Pipeline

    pipeline = Pipeline(_settings(run, "validation", float32),
                        config_label="examples/quickstart.yaml [sft, rejection_sampling]")
    pipeline.run()
    rs = pipeline.records["rejection_sampling"].outputs
    return pipeline, pipeline.records["sft"].outputs, rs["samples"], rs


def _evaluator(run: Path, eval_split: str, float32: bool, pipeline: Any) -> Any:
    """What answers the `eval_split` problems: the training pipeline itself for validation, else a
    pipeline over the test task in `run/test_eval` used only to evaluate (same decoding)."""
    if eval_split == "validation":
        return pipeline
    from rlhf_plugins.stages.pipeline import Pipeline

    evaluator = Pipeline(_settings(run / "test_eval", eval_split, float32), config_label="test problems")
    evaluator.paths = evaluator.write_data()
    return evaluator


def _train(kind: str, run: Path, policy: str, train: str, held_out: str | None, lr: float,
           steps: int | None, rpo_alpha: float = 0.5, desirable_weight: float = 1.0) -> tuple[Any, float]:
    from rlhf_plugins.stages.dpo.run import dpo_from_config
    from rlhf_plugins.stages.kto.run import kto_from_config

    config: dict[str, Any] = {"model": policy, "dataset": train, "template": "chatml",
                              "masking": "all_assistant_turns", "lora": LORA, "quantization": None,
                              "learning_rate": lr, **TRAIN}
    if held_out:
        config["eval_dataset"] = held_out
    if steps:
        config["max_steps"] = steps
    else:
        config["num_train_epochs"] = 1
    if kind.startswith("dpo"):
        config.update(loss="sigmoid", loss_options={"beta": 0.1}, rpo_alpha=rpo_alpha)
    started = time.time()
    name = f"{kind}-lr{lr:g}" + (f"-rpo{rpo_alpha:g}" if kind.startswith("dpo") and rpo_alpha != 0.5 else "")
    if kind == "kto" and desirable_weight != 1.0:  # TRL: weight x desirable ~ undesirable rows
        config.update(desirable_weight=desirable_weight, eval_before=False)
        name += f"-dw{desirable_weight:g}"
    result = (dpo_from_config if kind.startswith("dpo") else kto_from_config)(config, run / name)
    return result, time.time() - started


def _row(label: str, result: dict[str, Any], against: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from rlhf_plugins.stats import compare, wilson_interval

    right, n = sum(map(bool, result["correct"])), len(result["correct"])
    row = {"model": label, "accuracy": right / n, "ci": wilson_interval(right, n), "n": n}
    for name, other in against.items():
        row[f"vs_{name}"] = compare(other["correct"], result["correct"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "direct")
    parser.add_argument("--eval-split", choices=("test", "validation"), default="test")
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--kto-lr", type=float, default=1e-4)
    parser.add_argument("--rpo-alpha", type=float, default=0.5, help="weight of DPO's NLL term")
    parser.add_argument("--kto-desirable-weight", type=float, default=1.0,
                        help="KTO's desirable_weight (TRL: desirable x weight ~ undesirable rows)")
    parser.add_argument("--only", choices=("dpo", "kto"),
                        help="tuning: train and evaluate this one from the SFT model alone")
    parser.add_argument("--float32", action="store_true",
                        help="train and decode in float32 (CPUs without AVX512-BF16)")
    args = parser.parse_args()
    if args.float32:
        TRAIN["bf16"] = False

    from rlhf_plugins.data.verified_pairs import write_verified_pairs
    from rlhf_plugins.stages.kto.data import write_labelled_samples

    started = time.time()
    pipeline, sft, samples, rs = _pipeline(args.run, args.float32)
    sft_policy, rs_policy = sft["policy"], rs["policy"]
    pairs = write_verified_pairs(samples, args.run / "data" / "bench_dpo", seed=0, max_per_prompt=2)
    labelled = write_labelled_samples(samples, args.run / "data" / "bench_kto")
    if pairs is None or labelled is None:
        raise SystemExit("the graded samples hold no prompt with both a passing and a failing sample")
    trained = {}
    if args.only in (None, "dpo"):
        trained["dpo"] = _train("dpo", args.run, sft_policy, pairs["pairs_train"],
                                pairs.get("pairs_eval"), args.dpo_lr, None, args.rpo_alpha)
    if args.only in (None, "kto"):  # as many steps as DPO took with the default settings
        steps = int((trained.get("dpo") or _train("dpo", args.run, sft_policy, pairs["pairs_train"],
                                                  pairs.get("pairs_eval"), 1e-4, None))[0]
                    .metrics.get("global_step") or 0) or None
        trained["kto"] = _train("kto", args.run, sft_policy, labelled["train"], labelled.get("eval"),
                                args.kto_lr, steps, desirable_weight=args.kto_desirable_weight)
    if args.only is None:
        trained["dpo_after_rs"] = _train("dpo_after_rs", args.run, rs_policy, pairs["pairs_train"],
                                         pairs.get("pairs_eval"), args.dpo_lr, None, args.rpo_alpha)
    start = {"dpo": sft_policy, "kto": sft_policy, "dpo_after_rs": rs_policy}
    labels = {"dpo": "DPO + NLL", "kto": "KTO", "dpo_after_rs": "RS-SFT, then DPO + NLL"}
    evaluator = _evaluator(args.run, args.eval_split, args.float32, pipeline)
    evals = {"sft": evaluator.evaluate("sft", sft_policy, sft.get("policy_adapter")),
             "rs_sft": evaluator.evaluate("rejection_sampling", rs_policy, rs.get("policy_adapter"))}
    for key, (result, _) in trained.items():
        evals[key] = evaluator.evaluate(f"bench_{result.output_dir.name}", start[key],
                                        str(result.output_dir))
    rows = [_row("sft", evals["sft"], {}),
            _row("rejection-sampling SFT", evals["rs_sft"], {"sft": evals["sft"]})]
    rows += [_row(labels[key], evals[key], {"sft": evals["sft"], "rs_sft": evals["rs_sft"]})
             for key in trained]
    out = {"eval_split": args.eval_split, "float32": args.float32, "dpo_lr": args.dpo_lr,
           "rpo_alpha": args.rpo_alpha, "kto_desirable_weight": args.kto_desirable_weight,
           "kto_lr": args.kto_lr, "wall_s": round(time.time() - started, 1),
           **{key: {"seconds": round(seconds, 1), **{k: v for k, v in result.metrics.items()
                                                     if isinstance(v, (int, float, str))}}
              for key, (result, seconds) in trained.items()},
           "stage_seconds": {n: r.metrics.get("train_runtime") for n, r in pipeline.records.items()},
           "rs_selected": pipeline.records["rejection_sampling"].metrics.get("selected"),
           "rows": rows}
    name = "_".join(f"{key}-{trained[key][0].output_dir.name}" for key in trained)
    name = f"direct_alignment_{args.eval_split}_{name}"
    (args.run / f"{name}.json").write_text(json.dumps(out, indent=2, default=str))
    for row in rows:
        lo, hi = row["ci"]
        parts = [f"{row['model']:24s} {row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"]
        for key in ("vs_sft", "vs_rs_sft"):
            if key in row:
                c = row[key]
                parts.append(f"{key} {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
                             f"p={c['mcnemar_p']:.3f}")
        print("  ".join(parts))
    print(json.dumps({k: out[k] for k in ("wall_s", "rs_selected")}), yaml.safe_dump(
        {f"{key}_s": out[key]["seconds"] for key in trained}, default_flow_style=True).strip())


if __name__ == "__main__":
    main()
