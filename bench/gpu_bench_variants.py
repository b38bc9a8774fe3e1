"""The variants of bench/gpu_qlora_ppo.py, each run in its own child process (issue 30).

- ours: prepare_ppo -> PolicyOptimizationTrainer, policy / reference / critic / RM on one 4-bit base;
- trl: TRL's GRPOTrainer the standard way: a 4-bit base + `peft_config` (TRL wraps it; the reference
  is the adapter disabled, no "ref" copy) and the RM as a separate 4-bit sequence classifier
  passed as a reward function;
- four_4bit / four_bf16: four separate models (policy, reference, critic, RM) in a PPO-shaped loop
  (generate, score, reference and critic forwards, backward through policy and critic, AdamW).
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from bench_ppo import _never_stop, _peak_rss, _rss_now
from gpu_bench_floor import inventory, lora_params

LORA = dict(r=16, alpha=32, dropout=0.0)
BATCH, GENERATIONS, LR = 8, 4, 1e-4


class Memory:
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


def quantization(device: str) -> Any:
    """QuantSettings() where bitsandbytes has a 4-bit kernel for the device (CPU included), else None."""
    import bitsandbytes as bnb
    import torch

    from rlhf_plugins.models import QuantSettings

    try:
        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception:  # noqa: BLE001 - no kernel for this device / build
        return None
    return QuantSettings()


def reward_classifier(spec: dict[str, Any], quant: Any) -> tuple[Any, Any]:
    """The RM artifact as a TRL user loads it: a (4-bit) sequence classifier with its adapter merged."""
    from peft import PeftModel

    from rlhf_plugins.models import load_tokenizer
    from rlhf_plugins.stages.reward_model.hf_export import (HF_SEQUENCE, is_hf_reward_model_dir,
                                                   load_classification_model)

    assert is_hf_reward_model_dir(spec["rm_dir"]), "the RM artifact is not a transformers SEQ_CLS adapter"
    base = load_classification_model(spec["model_dir"], HF_SEQUENCE, quantization=quant, num_labels=1,
                                     dtype=None if quant else "bfloat16")
    model = PeftModel.from_pretrained(base, spec["rm_dir"]).merge_and_unload()
    model.eval().requires_grad_(False)
    return model.to(spec["device"]) if quant is None else model, load_tokenizer(spec["rm_dir"])


def _timing(times: list[float], warmup: int) -> dict[str, Any]:
    timed = times[warmup:]
    return {"step_times_s": timed, "warmup_times_s": times[:warmup]}


def _setup(spec: dict[str, Any], completion_lengths: list[float], optimizer_steps: int,
           gradient_checkpointing: bool, lr: float) -> dict[str, Any]:
    return {"batch": BATCH, "prompts_per_step": BATCH // GENERATIONS, "generations_per_prompt": GENERATIONS,
            "completion_tokens_min": int(min(completion_lengths)),
            "completion_tokens_max": int(max(completion_lengths)),
            "gradient_checkpointing": gradient_checkpointing, "optimizer_steps": optimizer_steps,
            "timed_steps": spec["steps"], "warmup_steps": spec["warmup"], "learning_rate": lr}


def _prompt_batch(tokenizer: Any, rows: list[dict[str, Any]], device: str) -> Any:
    """Two prompts x four generations, rendered with the chat template and left-padded."""
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
             for r in list(rows)[: BATCH // GENERATIONS] for _ in range(GENERATIONS)]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def four_models(spec: dict[str, Any], mem: Memory, quantized: bool) -> dict[str, Any]:
    """Four models (policy, reference, critic + value head, RM), each step a PPO-shaped update."""
    import torch

    from rlhf_plugins import registry
    from rlhf_plugins.data import synth
    from rlhf_plugins.models import LoraSettings, _enable_checkpointing, load_causal_lm, load_tokenizer
    from rlhf_plugins.stages.skeleton import load_trainable_model
    from rlhf_plugins.stages.ppo.value_head import ValueHead

    device = spec["device"]
    quant = quantization(device) if quantized else None
    if quantized and quant is None:
        return {"status": "skipped: bitsandbytes has no 4-bit kernel here"}
    torch.manual_seed(0)

    def trainable() -> Any:
        if quant is not None:
            return load_trainable_model(spec["model_dir"], LoraSettings(**LORA), quant,
                                        gradient_checkpointing=True, seed=0)
        model = load_causal_lm(spec["model_dir"], dtype="bfloat16").to(device)
        _enable_checkpointing(model)
        return model

    policy, critic = trainable(), trainable()
    if quant is not None and quant.resolved_compute_dtype() == torch.bfloat16:
        for param in (p for m in (policy, critic) for p in m.parameters() if p.requires_grad):
            param.data = param.data.to(torch.bfloat16)  # as TRL does for QLoRA adapters (ours, trl)
    ref = load_causal_lm(spec["model_dir"], quantization=quant, dtype=None if quant else "bfloat16")
    ref = (ref if quant else ref.to(device)).eval().requires_grad_(False)
    rm, _ = reward_classifier(spec, quant)
    value_head = ValueHead(policy.config.hidden_size).to(device)
    params = [p for m in (policy, critic, value_head) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    load_bytes = mem.loaded()
    tok = load_tokenizer(spec["model_dir"])
    tok.chat_template = registry().chat_templates.get("chatml").jinja
    batch = _prompt_batch(tok, synth.rl_dataset(8, seed=0), device)
    prompt_len, completion = batch["input_ids"].shape[1], spec["completion"]
    times, lengths = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        mem.sync()
        started = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            seq = policy.generate(**batch, max_new_tokens=completion, min_new_tokens=completion,
                                  do_sample=True, pad_token_id=tok.pad_token_id)
        policy.train()
        lengths.append(seq.shape[1] - prompt_len)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, prompt_len:])], 1)
        with torch.no_grad():
            ref_logits = ref(input_ids=seq, attention_mask=mask).logits[:, prompt_len - 1:-1].float()
            ref_logps = torch.log_softmax(ref_logits, -1).gather(-1, seq[:, prompt_len:, None])[..., 0]
            del ref_logits
            reward = rm(input_ids=seq, attention_mask=mask).logits[:, 0].float()
        inner = critic.get_base_model().model if hasattr(critic, "get_base_model") else critic.model
        values = value_head(inner(input_ids=seq, attention_mask=mask).last_hidden_state[:, prompt_len - 1:-1])
        logits = policy(input_ids=seq, attention_mask=mask).logits[:, prompt_len - 1:-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, seq[:, prompt_len:, None])[..., 0]
        del logits
        advantage = (reward[:, None] - values).detach()
        loss = (-(logps - logps.detach()).exp() * advantage + 0.05 * (logps - ref_logps)).mean() \
            + 0.5 * ((values - reward[:, None]) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mem.sync()
        times.append(time.perf_counter() - started)
    labels = {"policy": policy, "ref": ref, "critic": critic, "reward_model": rm, "value_head": value_head}
    return dict(_timing(times, spec["warmup"]), load_bytes=load_bytes, quantized_4bit=quant is not None,
                loss_finite=math.isfinite(loss.item()), inventory=inventory(labels),
                policy_lora_params=lora_params(policy) if quant else None,
                setup=_setup(spec, lengths, len(times), True, LR))


def offload_activations(trainer: Any) -> None:
    """Run every training step under TRL's activation-offloading context (as SFTTrainer does)."""
    from trl.models import get_act_offloading_ctx_manager

    context, step = get_act_offloading_ctx_manager(model=trainer.model), trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        with context:
            return step(*args, **kwargs)

    trainer.training_step = training_step


def ppo(spec: dict[str, Any], mem: Memory, trainer_kind: str, lever: str | None) -> dict[str, Any]:
    """`ours` (prepare_ppo) or `trl` (GRPOTrainer + peft_config + a 4-bit RM classifier)."""
    import bitsandbytes as bnb
    import torch

    from rlhf_plugins.data import synth
    from rlhf_plugins.models import LoraSettings, load_causal_lm, load_tokenizer
    from rlhf_plugins.stages.ppo.settings import PPOSettings
    from rlhf_plugins.stages.ppo.train import build_grpo_config, prepare_ppo
    from rlhf_plugins.stages.skeleton import keep_float32_adapter_on_cpu

    if lever == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return {"status": "not installed"}
    device, completion = spec["device"], spec["completion"]
    steps = spec["warmup"] + spec["steps"]
    quant = quantization(device)
    settings = PPOSettings(model=spec["model_dir"], reward_functions=[_never_stop],
                           reward_adapter=spec["rm_dir"] if trainer_kind == "ours" else None,
                           advantage_estimator="gae", kl_penalty="loss", lora=LoraSettings(**LORA),
                           quantization=quant)
    kwargs: dict[str, Any] = dict(
        max_steps=steps, per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
        max_completion_length=completion, generation_kwargs={"min_new_tokens": completion},
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", learning_rate=LR,
        seed=0, beta=0.05, bf16=device == "cuda", report_to="none")
    if lever == "liger":
        kwargs["use_liger_kernel"] = True
    if lever == "ckpt_offload":
        kwargs["gradient_checkpointing_kwargs"] = {"offload": True}
    rows = synth.rl_dataset(BATCH * steps, seed=0)
    out = tempfile.mkdtemp(prefix=f"{trainer_kind}-", dir=spec["root"])
    torch.manual_seed(0)
    started = time.perf_counter()
    scorer = rm = None
    if trainer_kind == "ours":
        prepared = prepare_ppo(settings, kwargs, out, train_dataset=rows)
        trainer, scorer = prepared.trainer, prepared.reward_scorer
    else:  # the TRL user's set-up: base + peft_config, the RM a separate classifier
        from trl import GRPOTrainer

        from rlhf_plugins import registry

        tok = load_tokenizer(spec["model_dir"])
        tok.chat_template = registry().chat_templates.get("chatml").jinja
        rm, rm_tok = reward_classifier(spec, quant)
        base = load_causal_lm(spec["model_dir"], quantization=quant)
        trainer = GRPOTrainer(base, [_never_stop, rm], build_grpo_config(kwargs, out), train_dataset=rows,
                              processing_class=tok, reward_processing_classes=[None, rm_tok],
                              peft_config=settings.lora.to_peft())
        keep_float32_adapter_on_cpu(trainer.model, quant)  # as prepare_ppo does (CPU only)
    if lever == "act_offload":
        offload_activations(trainer)
    load_s, load_bytes = time.perf_counter() - started, mem.loaded()
    trainer.train()
    history = trainer.state.log_history
    times = [h["step_time"] for h in history if "step_time" in h]
    lengths = [h[k] for h in history for k in ("completions/min_length", "completions/max_length") if k in h]
    policy = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == BATCH, args
    assert args.num_generations == GENERATIONS and args.max_completion_length == completion, args
    return dict(_timing(times, spec["warmup"]), load_s=load_s, load_bytes=load_bytes,
                quantized_4bit=quant is not None,
                linear4bit_modules=sum(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules()),
                linear4bit_names=sorted(n.removeprefix("base_model.model.").removesuffix(".base_layer")
                                        for n, m in policy.named_modules()
                                        if isinstance(m, bnb.nn.Linear4bit)),
                loss_finite=all(math.isfinite(h["loss"]) for h in history if "loss" in h),
                value_loss_logged=any("value_loss" in h for h in history),
                rm_adapter_reward_logged=any("rewards/reward_adapter/mean" in h for h in history),
                reward_funcs=list(trainer.reward_func_names),
                ref_model=type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
                policy_lora_params=lora_params(policy),
                setup=_setup(spec, lengths, trainer.state.global_step, bool(args.gradient_checkpointing),
                             args.learning_rate),
                inventory=inventory({"policy": policy, "ref": trainer.ref_model,
                                     "reward_model": scorer if scorer is not None else rm}))
