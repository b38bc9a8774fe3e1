"""GPU readiness (issue 16): QLoRA PPO on one 4-bit base vs TRL GRPOTrainer, memory and step time.

Run (repository root):
  python bench/gpu_qlora_ppo.py --json $OUT/gpu_qlora_ppo.json        # GPU: 1b, llama3-8b, qwen2.5-7b
  python bench/gpu_qlora_ppo.py --device cpu --shapes tiny --json r.json   # CPU smoke, < 1 minute
  options: --steps 3 (first dropped) --completion 32 --budget 480 (seconds, whole run)
           --variants ours,trl,... (default: all, see VARIANTS) --shapes 1b,llama3-8b,... (see SHAPES)

Random-weight models, no downloads: Llama in the shapes of TinyLlama-1.1B (`1b`, bench_ppo.SIZES)
and Llama-3-8B, Qwen2 in the shape of Qwen2.5-7B, `tiny` / `tiny-qwen2` for CPU. A child process
per shape creates the model in bf16 on the device and saves it (safetensors) with a tiny local
BPE tokenizer (tests/helpers_tokenizers.py; its ids fit the vocab) and a random reward-model
artifact (LoRA adapter + Bradley-Terry head on that base). Each variant runs in its own child, so
its peak is its own: `torch.cuda.max_memory_allocated` over load + train on CUDA (also the
training-only peak), peak RSS above the post-import RSS on CPU. 4-bit NF4 runs on CPU too
(bitsandbytes' CPU kernels, as the project's tests do); rows say `quantized_4bit: false` where
bitsandbytes cannot quantize. CPU children use one thread unless OMP_NUM_THREADS says otherwise.

Variants (same prompts and seed, batch 8 = 2 prompts x 4 generations, completions forced to
--completion tokens, LoRA r=16 on all linear layers, beta 0.05, gradient checkpointing, bf16 on CUDA):
  ours       prepare_ppo -> PolicyOptimizationTrainer: 4-bit base loaded once, policy LoRA, reference
             = adapter-disabled base, GAE + value head, rewards = a python function + an RM adapter
  trl        TRL's plain GRPOTrainer on the same 4-bit + LoRA policy, the python reward only
  four_bf16  policy, reference, critic (LM + value head), reward model (LM + head) as four bf16
             copies; a forward each, backward through policy and critic, no optimizer state (a
             lower bound for full PPO). Memory baseline, 1b / tiny only.
  *+liger    use_liger_kernel=True ("not installed" unless liger_kernel imports)
  *+act_offload  TRL's activation offloading (trl.models.get_act_offloading_ctx_manager around each
             training step, as SFT/DPO's `activation_offloading` does: GRPOConfig has no such field
             in TRL 1.16); needs an accelerator (pinned memory)
  trl+ckpt_offload  TrainingArguments' activation_checkpointing_kwargs={"offload": True}. With TRL
             1.16 / transformers 5.24 it fails at the first loss: TRL re-enables checkpointing after
             generation with the raw kwargs ("Unexpected keyword arguments: offload"). First shape.
Step time: TRL's `step_time` metric (rollout + loss + backward), median without the first step.
Core variants of all shapes run before the levers; a child whose expected duration (the shape's
slowest so far) no longer fits --budget is skipped. --json is rewritten after every child.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
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
from bench_ppo import SIZES, _never_stop, _peak_rss, _rss_now  # noqa: E402

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
    "four_bf16": ("baseline", None, "four bf16 models (fwd + bwd, no optimizer)"),
    "ours": ("ours", None, "ours: QLoRA PPO, GAE + value head + RM adapter"),
    "trl": ("trl", None, "TRL GRPOTrainer, same QLoRA policy"),
    "trl+act_offload": ("trl", "act_offload", "TRL GRPO + activation offloading (trl ctx)"),
    "ours+act_offload": ("ours", "act_offload", "ours + activation offloading (trl ctx)"),
    "trl+liger": ("trl", "liger", "TRL GRPO + use_liger_kernel"),
    "ours+liger": ("ours", "liger", "ours + use_liger_kernel"),
    "trl+ckpt_offload": ("trl", "ckpt_offload", "TRL GRPO + activation_checkpointing offload"),
}
CORE = ("four_bf16", "ours", "trl")
DEFAULT_SHAPES = {"cuda": "1b,llama3-8b,qwen2.5-7b", "cpu": "tiny"}
ROW_KEYS = ("shape", "variant", "label", "status", "device", "quantized_4bit", "step_time_s",
            "step_times_s", "peak_bytes", "memory_kind", "load_bytes", "wall_s", "params", "inventory")
#: submodules that are heads wherever they sit: the policy's value head, a RewardModel's head
HEAD_MODULES = ("v_head", "head_module")


def inventory(modules: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Parameter bytes of the bases, adapters and heads `modules` (label -> nn.Module or None) hold.

    Each parameter counts once, under the first label holding it; LoRA weights go to their adapter
    (``lora_A.<adapter>``), HEAD_MODULES or a module labelled ``*head`` to heads, the rest to the base.
    """
    out: dict[str, dict[str, int]] = {"bases": {}, "adapters": {}, "heads": {}}
    seen: set[int] = set()
    for label, module in modules.items():
        if module is None:
            continue
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            parts = name.split(".")
            lora = next((i for i, part in enumerate(parts[:-1]) if part.startswith("lora_")), None)
            head = next((part for part in parts if part in HEAD_MODULES), None)
            if lora is not None:
                kind, key = "adapters", parts[lora + 1]
            elif label.endswith("head") or head is not None:
                kind, key = "heads", label if label.endswith("head") else f"{label}.{head}"
            else:
                kind, key = "bases", label
            out[kind][key] = out[kind].get(key, 0) + p.numel() * p.element_size()
    return out


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
    from rlhf_plugins.stages.reward_model import RewardModel, save_reward_model

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
            "torch": torch.__version__}
    if spec["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    return dict(info, **{name: md.version(name) for name in ("transformers", "trl", "peft", "bitsandbytes")})


class _Memory:
    """Peak memory of this process: CUDA max_memory_allocated, or RSS above the post-import RSS."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda, self.load_peak = torch, device == "cuda", 0
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss_above_imports"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.base = 0 if self.cuda else _rss_now()

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else _rss_now() - self.base

    def loaded(self) -> int:
        """Bytes held after loading; on CUDA the peak restarts so training's own peak is known."""
        if self.cuda:
            self.load_peak = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        return self.now()

    def peaks(self) -> dict[str, Any]:
        if not self.cuda:
            return {"peak_bytes": _peak_rss() - self.base, "memory_kind": self.kind}
        train = self.torch.cuda.max_memory_allocated()
        return {"peak_bytes": max(self.load_peak, train), "train_peak_bytes": train,
                "train_reserved_peak_bytes": self.torch.cuda.max_memory_reserved(), "memory_kind": self.kind}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _baseline(spec: dict[str, Any], mem: _Memory) -> dict[str, Any]:
    """Four bf16 copies: forward each, backward through policy and critic (checkpointed)."""
    import torch

    from rlhf_plugins.models import _enable_checkpointing, load_causal_lm
    from rlhf_plugins.stages.value_head import ValueHead

    device = spec["device"]
    policy, ref, critic, rm = (load_causal_lm(spec["model_dir"], dtype="bfloat16").to(device)
                               for _ in range(4))
    for m in (policy, critic):
        m.train()
        _enable_checkpointing(m)
    hidden = policy.config.hidden_size
    value_head = ValueHead(hidden).to(device)
    reward_head = torch.nn.Linear(hidden, 1, dtype=torch.bfloat16, device=device)
    load_bytes = mem.loaded()
    torch.manual_seed(0)
    ids = torch.randint(3, policy.config.vocab_size, (8, spec["prompt_tokens"] + spec["completion"]),
                        device=device)
    times = []
    for _ in range(spec["steps"]):
        mem.sync()
        started = time.perf_counter()
        logps = torch.log_softmax(policy(input_ids=ids).logits[:, :-1].float(), -1)
        (-logps.gather(-1, ids[:, 1:, None]).mean()).backward()
        with torch.no_grad():
            ref(input_ids=ids)
            reward_head(rm.model(input_ids=ids).last_hidden_state[:, -1])
        (value_head(critic.model(input_ids=ids).last_hidden_state) ** 2).mean().backward()
        mem.sync()
        times.append(time.perf_counter() - started)
        del logps
    held = inventory({"policy": policy, "ref": ref, "critic": critic, "rm": rm, "value_head": value_head,
                      "reward_head": reward_head})
    return {"load_bytes": load_bytes, "step_times_s": times[1:] or times, "quantized_4bit": False,
            "inventory": held}


def _offload_activations(trainer: Any) -> None:
    """Run every training step under TRL's activation-offloading context (as SFTTrainer does)."""
    from trl.models import get_act_offloading_ctx_manager

    context, step = get_act_offloading_ctx_manager(model=trainer.model), trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        with context:
            return step(*args, **kwargs)

    trainer.training_step = training_step


def _ppo(spec: dict[str, Any], mem: _Memory, trainer_kind: str, lever: str | None) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch

    from rlhf_plugins.data import synth
    from rlhf_plugins.models import LoraSettings, QuantSettings, load_tokenizer
    from rlhf_plugins.stages.ppo import PPOSettings, build_grpo_config, load_policy, prepare_ppo
    from rlhf_plugins.stages.skeleton import keep_float32_adapter_on_cpu

    if lever == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return {"status": "not installed"}
    device, steps, completion = spec["device"], spec["steps"], spec["completion"]
    try:  # 4-bit NF4 wherever bitsandbytes has a kernel for the device (its CPU kernels included)
        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        quantized = True
    except Exception:  # noqa: BLE001 - no kernel for this device / build
        quantized = False
    settings = PPOSettings(model=spec["model_dir"], reward_functions=[_never_stop],
                           reward_adapter=spec["rm_dir"] if trainer_kind == "ours" else None,
                           advantage_estimator="gae", kl_penalty="loss",
                           lora=LoraSettings(r=16, alpha=32, dropout=0.0),
                           quantization=QuantSettings() if quantized else None)
    kwargs: dict[str, Any] = dict(
        max_steps=steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=completion, generation_kwargs={"min_new_tokens": completion},
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", learning_rate=1e-4,
        seed=0, beta=0.05, bf16=device == "cuda", report_to="none")
    if lever == "liger":
        kwargs["use_liger_kernel"] = True
    if lever == "ckpt_offload":
        kwargs["gradient_checkpointing_kwargs"] = {"offload": True}
    rows = synth.rl_dataset(8 * steps, seed=0)
    out = tempfile.mkdtemp(prefix=f"{trainer_kind}-", dir=spec["root"])
    torch.manual_seed(0)
    started = time.perf_counter()
    scorer = None
    if trainer_kind == "ours":
        prepared = prepare_ppo(settings, kwargs, out, train_dataset=rows)
        trainer, scorer = prepared.trainer, prepared.reward_scorer
    else:
        from trl import GRPOTrainer

        from rlhf_plugins import registry

        tok = load_tokenizer(spec["model_dir"])
        tok.chat_template = registry().chat_templates.get("chatml").jinja
        trainer = GRPOTrainer(load_policy(spec["model_dir"], settings, True), [_never_stop],
                              build_grpo_config(kwargs, out), train_dataset=rows, processing_class=tok)
        keep_float32_adapter_on_cpu(trainer.model, settings.quantization)  # as prepare_ppo does
    if lever == "act_offload":
        _offload_activations(trainer)
    load_s, load_bytes = time.perf_counter() - started, mem.loaded()
    trainer.train()
    history = trainer.state.log_history
    times = [h["step_time"] for h in history if "step_time" in h]
    return {"load_s": load_s, "load_bytes": load_bytes, "step_times_s": times[1:] or times,
            "quantized_4bit": quantized,
            "linear4bit_modules": sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules()),
            "loss_finite": all(math.isfinite(h["loss"]) for h in history if "loss" in h),
            "value_loss_logged": any("value_loss" in h for h in history),
            "rm_adapter_reward_logged": any("rewards/reward_adapter/mean" in h for h in history),
            "inventory": inventory({"policy": trainer.accelerator.unwrap_model(trainer.model),
                                    "ref": trainer.ref_model, "reward_model": scorer})}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if spec["variant"] == "_make":
        return _make(spec)
    started = time.perf_counter()
    import bitsandbytes  # noqa: F401 - every child imports the same before the memory baseline
    import rlhf_plugins.stages.ppo_trainer  # noqa: F401 - torch, transformers, peft, trl

    mem = _Memory(spec["device"])
    trainer_kind, lever, _ = VARIANTS[spec["variant"]]
    result = _baseline(spec, mem) if trainer_kind == "baseline" else _ppo(spec, mem, trainer_kind, lever)
    result.setdefault("status", "ok")
    if result["status"] == "ok":
        result.update(mem.peaks(), step_time_s=statistics.median(result["step_times_s"]))
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
        return "skipped: baseline measured at 1b only"
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
                                       "completion": args.completion, "budget_s": args.budget,
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
        if row["status"] != "pending":
            continue
        spec = {"device": args.device, "shape": shape, "variant": variant, "root": str(root),
                "model_dir": str(root / shape), "rm_dir": str(root / f"{shape}-rm"),
                "steps": args.steps, "completion": args.completion}
        if shape not in made:
            if deadline - time.perf_counter() < args.min_child_s:
                row["status"] = "skipped: time budget"
                continue
            info, took = _run_child(dict(spec, variant="_make"), deadline - time.perf_counter())
            made[shape] = dict(info, make_wall_s=round(took, 1))
            print(f"[{time.perf_counter() - start:6.1f}s] made {shape}: {json.dumps(made[shape])[:300]}",
                  flush=True)
            longest[shape] = took
        if "params" not in made[shape]:
            row["status"] = f"error: model creation failed ({made[shape].get('status')})"
            continue
        if deadline - time.perf_counter() < max(longest.get(shape, 0.0), args.min_child_s):
            row["status"] = "skipped: time budget"
            continue
        spec["prompt_tokens"] = made[shape]["prompt_tokens_max"]
        result, took = _run_child(spec, deadline - time.perf_counter())
        longest[shape] = max(longest.get(shape, 0.0), took)
        row.update(result, params=made[shape]["params"], child_wall_s=round(took, 1))
        print(f"[{time.perf_counter() - start:6.1f}s] {shape} {variant}: {row['status']} "
              f"step={_fmt(row['step_time_s'], 's')} peak={_gib(row['peak_bytes'])}", flush=True)
        save()
    save()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table (ratios against four_bf16 and trl of the same shape)."""
    ok = {(r["shape"], r["variant"]): r for r in report["rows"] if r["status"] == "ok"}
    lines = ["| shape | variant | status | 4-bit | peak memory | vs four_bf16 | s/step | vs TRL |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        base, trl = ok.get((r["shape"], "four_bf16")), ok.get((r["shape"], "trl"))
        mem_ratio = step_ratio = "-"
        if r["status"] == "ok" and base and r["variant"] != "four_bf16":
            mem_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x"
        if r["status"] == "ok" and trl and r["variant"] not in ("four_bf16", "trl"):
            step_ratio = f"{r['step_time_s'] / trl['step_time_s']:.2f}x"
        quant = "-" if r.get("quantized_4bit") is None else ("yes" if r["quantized_4bit"] else "no")
        lines.append(f"| {r['shape']} | {r['variant']} | {r['status'][:70]} | {quant} | "
                     f"{_gib(r['peak_bytes'])} | {mem_ratio} | {_fmt(r['step_time_s'])} | {step_ratio} |")
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
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (first dropped)")
    parser.add_argument("--completion", type=int, help="completion tokens (default 32 cuda, 16 cpu)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--min-child-s", type=float, default=20.0,
                        help="skip a child when less than this (or the shape's slowest child) is left")
    parser.add_argument("--json", default="gpu_qlora_ppo.json", help="results file")
    parser.add_argument("--root", help="where models are saved (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the saved models")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or DEFAULT_SHAPES[args.device]
    args.completion = args.completion or (32 if args.device == "cuda" else 16)
    report = run(args)
    print(f"\ndevice={args.device} steps={args.steps} (first dropped) completion={args.completion} "
          f"batch 8 (2 prompts x 4 generations) elapsed={report['meta']['elapsed_s']}s")
    for shape, info in report["meta"]["made"].items():
        print(f"  {shape}: {info.get('params', 0):.3g} params, {info.get('gpu', 'cpu')}, "
              f"torch {info.get('torch')}, transformers {info.get('transformers')}, trl {info.get('trl')}")
    print(markdown(report))
    print(f"results: {args.json}")
    return report


if __name__ == "__main__":
    main()
