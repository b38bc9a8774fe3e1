"""QLoRA PPO on one GPU (issues 16, 30): ours vs TRL's GRPOTrainer vs four models, memory and step time.

Run (repository root):
  python bench/gpu_qlora_ppo.py --json $OUT/gpu_qlora_ppo.json        # GPU: 1b, llama3-8b, qwen2.5-7b
  python bench/gpu_qlora_ppo.py --device cpu --shapes tiny --json r.json   # CPU smoke
  options: --steps 5 (timed) --warmup 1 --completion 32 --budget 480 (seconds, whole run)
           --variants ours,trl,... (default: all, see VARIANTS) --shapes 1b,llama3-8b,... (see SHAPES)

Random-weight models, no downloads: Llama in the shapes of TinyLlama-1.1B (`1b`, bench_ppo.SIZES)
and Llama-3-8B, Qwen2 in the shape of Qwen2.5-7B, `tiny` / `tiny-qwen2` for CPU. A child process
per shape creates the model in bf16 on the device and saves it (safetensors) with a tiny local
BPE tokenizer (tests/helpers_tokenizers.py; its ids fit the vocab), a random reward-model artifact
(LoRA adapter + Bradley-Terry head on that base, saved as a transformers SEQ_CLS adapter) and
computes the shape's memory floor (gpu_bench_floor.floor). Each variant runs in its own child, so
its peak is its own: `torch.cuda.max_memory_allocated` over load + train on CUDA (also the
training-only peak), peak RSS above the post-import RSS on CPU. 4-bit NF4 runs on CPU too
(bitsandbytes' CPU kernels). CPU children use one thread unless OMP_NUM_THREADS says otherwise.

Variants (gpu_bench_variants.py; same prompts and seed, batch 8 = 2 prompts x 4 generations,
completions forced to --completion tokens, LoRA r=16 on all linear layers, gradient checkpointing,
AdamW lr 1e-4, one optimizer step per step, bf16 on CUDA; asserted equal from what each ran):
  ours       prepare_ppo -> PolicyOptimizationTrainer: policy LoRA, reference = adapter-disabled base,
             GAE + value head, RM = a second adapter + head, all on one 4-bit base
  trl        TRL's GRPOTrainer the standard way: a 4-bit base + peft_config (TRL wraps it; reference
             = adapter disabled, no "ref" copy), rewards = the python function + the same RM as a
             separate 4-bit sequence classifier (adapter merged), as a TRL user would pass it
  four_4bit  four separate 4-bit models: policy + LoRA, reference, critic + LoRA + value head, RM
             classifier; each step generates, scores, runs reference and critic, backward through
             policy and critic, AdamW (the one-base saving alone)
  four_bf16  the same loop on four bf16 models (full fine-tuning of policy and critic); measured on
             BASELINE_SHAPES, elsewhere its weights are computed and the row says so
  *+liger / *+act_offload / trl+ckpt_offload   memory levers (see bench/README.md)
Step time: TRL's `step_time` metric (rollout + loss + backward + optimizer) for ours/trl, the loop's
wall time for four_*; --warmup steps are dropped, min and median of the --steps timed ones.
Each shape's inventories and set-ups are checked (gpu_bench_floor.check_variants); a failed
check is in the JSON and makes the exit code 1. --json is rewritten after every child.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_ppo import SIZES  # noqa: E402
from gpu_bench_floor import check_variants, floor  # noqa: E402

_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False)  # vocab > tokenizer's
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", _TINY),
    "1b": ("llama", SIZES["1b"]),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
}
BASELINE_SHAPES = ("tiny", "tiny-qwen2", "1b")
#: name -> (trainer, lever, label); core variants first, then the memory levers
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "four_bf16": ("four_bf16", None, "four bf16 models (policy, ref, critic, RM)"),
    "four_4bit": ("four_4bit", None, "four 4-bit models (policy + LoRA, ref, critic + LoRA, RM)"),
    "ours": ("ours", None, "ours: QLoRA PPO, one base: GAE + value head + RM adapter"),
    "trl": ("trl", None, "TRL GRPOTrainer + peft_config + 4-bit RM classifier"),
    "trl+act_offload": ("trl", "act_offload", "TRL GRPO + activation offloading (trl ctx)"),
    "ours+act_offload": ("ours", "act_offload", "ours + activation offloading (trl ctx)"),
    "trl+liger": ("trl", "liger", "TRL GRPO + use_liger_kernel"),
    "ours+liger": ("ours", "liger", "ours + use_liger_kernel"),
    "trl+ckpt_offload": ("trl", "ckpt_offload", "TRL GRPO + activation_checkpointing offload"),
}
COMPUTED = "computed, not measured: four bf16 copies' weights only (measured on 1b / tiny)"
CORE = ("four_bf16", "four_4bit", "ours", "trl")
DEFAULT_SHAPES = {"cuda": "1b,llama3-8b,qwen2.5-7b", "cpu": "tiny"}
ROW_KEYS = ("shape", "variant", "label", "status", "device", "quantized_4bit", "step_time_s",
            "step_time_min_s", "step_times_s", "peak_bytes", "vs_floor", "memory_kind", "load_bytes",
            "wall_s", "params", "inventory", "setup")
# -- children ---------------------------------------------------------------------------------

def _make(spec: dict[str, Any]) -> dict[str, Any]:
    """Random bf16 model of the shape on the device, saved with a tokenizer, + an RM artifact."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from helpers_tokenizers import make_tokenizer
    from rlhf_plugins import registry
    from rlhf_plugins.data import synth
    from rlhf_plugins.models import LoraSettings
    from rlhf_plugins.stages.reward_model.artifact import save_reward_model
    from rlhf_plugins.stages.reward_model.model import RewardModel

    arch, shape = SHAPES[spec["shape"]]
    tok = make_tokenizer("smollm2")
    assert len(tok) <= shape["vocab_size"], "tokenizer ids must fit the model's vocab"
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(
        **shape, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    created = time.perf_counter() - started
    model.save_pretrained(spec["model_dir"])
    tok.save_pretrained(spec["model_dir"])
    saved = time.perf_counter()
    template = registry().chat_templates.get("chatml")
    peft_model = get_peft_model(model, LoraSettings(r=16, alpha=32, dropout=0.0).to_peft())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # an adapter that differs from the base
    rm = RewardModel(peft_model, registry().reward_heads.get("bradley_terry"), tokenizer=tok,
                     template=template, base_model=spec["model_dir"])
    save_reward_model(rm, spec["rm_dir"])
    tok.chat_template = template.jinja
    prompt_tokens = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
                     for r in synth.rl_dataset(16, seed=0)]
    info = {"params": params, "create_s": round(created, 1), "save_s": round(saved - started - created, 1),
            "rm_s": round(time.perf_counter() - saved, 1), "prompt_tokens_max": max(prompt_tokens),
            "torch": torch.__version__, "floor": floor(arch, shape)}
    if spec["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    return dict(info, **{name: md.version(name) for name in ("transformers", "trl", "peft", "bitsandbytes")})


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if spec["variant"] == "_make":
        return _make(spec)
    started = time.perf_counter()
    import bitsandbytes  # noqa: F401 - every child imports the same before the memory baseline
    import rlhf_plugins.stages.ppo.trainer  # noqa: F401 - torch, transformers, peft, trl

    import gpu_bench_variants as variants

    mem = variants.Memory(spec["device"])
    kind, lever, _ = VARIANTS[spec["variant"]]
    result = (variants.four_models(spec, mem, quantized=kind == "four_4bit") if kind.startswith("four_")
              else variants.ppo(spec, mem, kind, lever))
    result.setdefault("status", "ok")
    if result["status"] == "ok":
        times = result["step_times_s"]
        assert len(times) == spec["steps"] > 0, f"{len(times)} timed steps, expected {spec['steps']}"
        result.update(mem.peaks(), step_time_s=statistics.median(times), step_time_min_s=min(times))
    return dict(result, wall_s=time.perf_counter() - started)


# -- parent: plan, budget, children, report ----------------------------------------------------

def _run_child(spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    result_file = Path(spec["root"]) / f"result-{spec['shape']}-{spec['variant']}.json"
    spec = dict(spec, result_file=str(result_file))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if spec["device"] == "cpu":  # one thread: OpenMP spinning on a shared 2-core VM costs 10x
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=max(1.0, timeout), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout (budget)"}, time.perf_counter() - started
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or not result_file.is_file():
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        return {"status": f"error: {last[-200:]}", "stderr_tail": "\n".join(lines[-30:])}, elapsed
    return json.loads(result_file.read_text()), elapsed


def _skip_reason(shape: str, variant: str, device: str, first_shape: str) -> str | None:
    lever = VARIANTS[variant][1]
    if variant == "four_bf16" and shape not in BASELINE_SHAPES:
        return COMPUTED
    if lever == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "not installed"
    if lever in ("act_offload", "ckpt_offload") and device != "cuda":
        return "skipped: needs an accelerator (pinned host memory)"
    if lever == "ckpt_offload" and shape != first_shape:
        return "skipped: first shape only"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    for names, known in ((shapes, SHAPES), (variants, VARIANTS)):
        if set(names) - set(known):
            raise SystemExit(f"unknown: {sorted(set(names) - set(known))}; choose from {', '.join(known)}")
    root = Path(args.root or tempfile.mkdtemp(prefix="gpu-qlora-ppo-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget
    report: dict[str, Any] = {"meta": {"device": args.device, "shapes": shapes, "steps": args.steps,
                                       "warmup": args.warmup, "completion": args.completion,
                                       "budget_s": args.budget,
                                       "python": sys.version.split()[0], "made": {}},
                              "rows": []}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for shape in shapes:
        for variant in variants:
            row = dict.fromkeys(ROW_KEYS)
            row.update(shape=shape, variant=variant, label=VARIANTS[variant][2], device=args.device,
                       status=_skip_reason(shape, variant, args.device, shapes[0]) or "pending")
            rows[shape, variant] = row
            report["rows"].append(row)
    plan = [(s, v) for s in shapes for v in variants if v in CORE] + \
           [(s, v) for s in shapes for v in variants if v not in CORE]
    made: dict[str, dict[str, Any]] = report["meta"]["made"]
    longest: dict[str, float] = {}  # the slowest child so far per shape: the next one's estimate

    def save() -> None:
        report["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")

    for shape, variant in plan:
        row = rows[shape, variant]
        if row["status"] not in ("pending", COMPUTED):
            continue
        spec = {"device": args.device, "shape": shape, "variant": variant, "root": str(root),
                "model_dir": str(root / shape), "rm_dir": str(root / f"{shape}-rm"),
                "steps": args.steps, "warmup": args.warmup, "completion": args.completion}
        if shape not in made:
            if deadline - time.perf_counter() < args.min_child_s:
                row["status"] = "skipped: time budget"
                continue
            info, took = _run_child(dict(spec, variant="_make"), deadline - time.perf_counter())
            made[shape] = dict(info, make_wall_s=round(took, 1))
            print(f"[{time.perf_counter() - start:6.1f}s] made {shape}: {json.dumps(made[shape])[:300]}",
                  flush=True)
            longest[shape] = took
            if "floor" in made[shape]:
                print(f"  floor {shape}: {_gib(made[shape]['floor']['bytes'])} = "
                      + " + ".join(f"{k} {_gib(v)}" for k, v in made[shape]["floor"]["parts"].items()))
        if "params" not in made[shape]:
            row["status"] = f"error: model creation failed ({made[shape].get('status')})"
            continue
        if row["status"] == COMPUTED:
            row.update(params=made[shape]["params"], peak_bytes=4 * 2 * made[shape]["params"],
                       memory_kind="computed_bf16_weights", vs_floor=8 * made[shape]["params"]
                       / made[shape]["floor"]["bytes"])
            continue
        if deadline - time.perf_counter() < max(longest.get(shape, 0.0), args.min_child_s):
            row["status"] = "skipped: time budget"
            continue
        spec["prompt_tokens"] = made[shape]["prompt_tokens_max"]
        result, took = _run_child(spec, deadline - time.perf_counter())
        longest[shape] = max(longest.get(shape, 0.0), took)
        row.update(result, params=made[shape]["params"], child_wall_s=round(took, 1))
        if row.get("peak_bytes"):
            row["vs_floor"] = row["peak_bytes"] / made[shape]["floor"]["bytes"]
        print(f"[{time.perf_counter() - start:6.1f}s] {shape} {variant}: {row['status']} "
              f"step min/median={_fmt(row['step_time_min_s'])}/{_fmt(row['step_time_s'], 's')} "
              f"peak={_gib(row['peak_bytes'])}", flush=True)
        if row.get("inventory"):
            held = (f"{kind}: " + ", ".join(f"{k} {_gib(v)}" for k, v in part.items())
                    for kind, part in row["inventory"].items())
            print("  inventory " + "; ".join(held), flush=True)
        save()
    report["checks"] = {shape: _checks(shape, {v: r for (s, v), r in rows.items()
                                               if s == shape and r["status"] == "ok"}, made.get(shape, {}))
                        for shape in shapes}
    for shape, check in report["checks"].items():
        print(f"checks {shape}: " + ("FAILED: " + check["failed"] if "failed" in check
                                     else f"{len(check['passed'])} passed"), flush=True)
        for line in check.get("passed", []):
            print(f"  ok  {line}")
    save()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _checks(shape: str, rows: dict[str, dict[str, Any]], made: dict[str, Any]) -> dict[str, Any]:
    """The variants' inventory / set-up checks of one shape, and the floor's 4-bit layers vs ours'."""
    try:
        passed = check_variants(rows)
        names = (rows.get("ours") or {}).get("linear4bit_names")
        if names and "floor" in made:
            assert names == made["floor"]["quantized_linear_names"], "floor's 4-bit layers != ours'"
            passed.append(f"the floor counts the {len(names)} Linear4bit layers ours loads")
    except AssertionError as exc:
        return {"failed": repr(exc.args)[:2000]}
    return {"passed": passed}


def _gib(value: Any) -> str:
    """Bytes in GiB, or MiB / KiB when smaller."""
    if value is None:
        return "-"
    unit = next(((n, u) for n, u in ((30, "GiB"), (20, "MiB")) if abs(value) >= 2**n), (10, "KiB"))
    return f"{value / 2**unit[0]:.2f} {unit[1]}"


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table (ratios against the shape's floor, four_4bit and trl).

    Step times are compared with trl only for TRL trainers (the four_* loops time their own step).
    """
    ok = {(r["shape"], r["variant"]): r for r in report["rows"] if r["status"] == "ok"}
    lines = ["| shape | variant | status | 4-bit | peak memory | vs floor | vs four_4bit | s/step min | "
             "s/step median | vs TRL |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        four, trl = ok.get((r["shape"], "four_4bit")), ok.get((r["shape"], "trl"))
        mem_ratio = step_ratio = "-"
        if r["status"] == "ok" and four and r["variant"] != "four_4bit":
            mem_ratio = f"{r['peak_bytes'] / four['peak_bytes']:.3f}x"
        if r["status"] == "ok" and trl and r["variant"] != "trl" and not r["variant"].startswith("four_"):
            step_ratio = f"{r['step_time_s'] / trl['step_time_s']:.2f}x"
        quant = "-" if r.get("quantized_4bit") is None else ("yes" if r["quantized_4bit"] else "no")
        floor_ratio = "-" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}x"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['status'][:70]} | {quant} | "
                     f"{_gib(r['peak_bytes'])} | {floor_ratio} | {mem_ratio} | "
                     f"{_fmt(r['step_time_min_s'])} | "
                     f"{_fmt(r['step_time_s'])} | {step_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """CLI entry point (``_child SPEC`` is the internal per-variant process)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        spec = json.loads(argv[1])
        Path(spec["result_file"]).write_text(json.dumps(_child(spec), default=str))
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)} "
                                         f"(default: {DEFAULT_SHAPES['cuda']} on cuda, tiny on cpu)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated VARIANTS")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant (>= 1)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--completion", type=int, help="completion tokens (default 32 cuda, 16 cpu)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--min-child-s", type=float, default=20.0,
                        help="skip a child when less than this (or the shape's slowest child) is left")
    parser.add_argument("--json", default="gpu_qlora_ppo.json", help="results file")
    parser.add_argument("--root", help="where models are saved (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the saved models")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.shapes = args.shapes or DEFAULT_SHAPES[args.device]
    args.completion = args.completion or (32 if args.device == "cuda" else 16)
    report = run(args)
    print(f"\ndevice={args.device} steps={args.steps} timed after {args.warmup} warm-up, "
          f"completion={args.completion} "
          f"batch 8 (2 prompts x 4 generations) elapsed={report['meta']['elapsed_s']}s")
    for shape, info in report["meta"]["made"].items():
        print(f"  {shape}: {info.get('params', 0):.3g} params, {info.get('gpu', 'cpu')}, "
              f"torch {info.get('torch')}, transformers {info.get('transformers')}, trl {info.get('trl')}")
    print(markdown(report))
    print(f"results: {args.json}")
    return report


if __name__ == "__main__":
    done = main()
    sys.exit(1 if done and any("failed" in c for c in done["checks"].values()) else 0)
