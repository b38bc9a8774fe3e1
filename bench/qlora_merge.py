"""Where a QLoRA adapter is merged decides what it learned (issue 16): SFT on a run's
rejection-sampling selection, as QLoRA and as full-precision LoRA, scored on the synthetic
task's validation split (never the test problems the quickstart reports).

    python bench/qlora_merge.py --run /tmp/qs_a --eval 200

For each variant: greedy `exact_answer` accuracy of the merged model and, for QLoRA, of the
adapter merged into the original full-precision weights (the pipeline before the fix); each
paired with the starting policy (`--run`/sft/merged).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_tuning import greedy_correct as correct  # noqa: E402

SFT = {"template": "chatml", "masking": "all_assistant_turns", "merge": True, "num_train_epochs": 1,
       "per_device_train_batch_size": 8, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
       "logging_steps": 2, "save_strategy": "no", "seed": 0, "report_to": "none"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a pipeline run directory (sft/merged + rejection_sampling)")
    parser.add_argument("--eval", type=int, default=200, help="validation problems")
    parser.add_argument("--out", help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    from trl import SFTConfig

    from rlhf_plugins.config import load_stage_config
    from rlhf_plugins.data import synth
    from rlhf_plugins.stages.sft.settings import SFTSettings
    from rlhf_plugins.stages.sft.train import merge_adapter, run_sft
    from rlhf_plugins.stats import compare

    run = Path(args.run)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-qlora-merge-"))
    rows = synth.rl_rows(args.eval, 0, "validation")
    start_dir = str(run / "sft" / "merged")
    start = correct(start_dir, rows)
    results: dict[str, Any] = {"start": sum(start) / len(start)}
    table = [("start (the run's SFT model)", start)]
    for name, extra in (("QLoRA", {"quantization": {"load_in_4bit": True}}), ("LoRA", {})):
        t0 = time.time()
        cfg = {**SFT, **extra, "model": start_dir, "lora": LORA, "output_dir": str(out / name),
               "dataset": str(run / "rejection_sampling" / "selected.jsonl")}
        ours, trl_kwargs = load_stage_config(cfg, SFTSettings, SFTConfig, where=name)
        result = run_sft(ours, trl_kwargs, out / name)
        got = correct(str(result.merged_dir), rows)
        where = "dequantized 4-bit weights (as trained)" if extra else "full-precision weights"
        table.append((f"{name} adapter merged into the {where}", got))
        if extra:  # the same adapter merged into the original weights: the pipeline before the fix
            naive = merge_adapter(start_dir, out / name, out / f"{name}-naive")
            table.append((f"{name} adapter merged into the original full-precision weights",
                          correct(str(naive), rows)))
        results[name] = round(time.time() - t0, 1)

    print(f"\n| SFT on {run}/rejection_sampling/selected.jsonl | validation accuracy ({args.eval}) "
          "| paired vs start [95% CI], McNemar p |")
    print("|---|---:|---:|")
    for label, got in table:
        c = compare(start, got)
        paired = "-" if got is start else (f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                                          f"p = {c['mcnemar_p']:.2g}")
        print(f"| {label} | {sum(got) / len(got):.3f} | {paired} |")
        results[label] = sum(got) / len(got)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
