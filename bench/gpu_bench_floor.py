"""The memory floor of QLoRA PPO for a model shape, and what each benchmark variant holds (issue 30).

`floor` counts from the model's own modules (a meta-device instance of the config: no memory):
the Linear layers bitsandbytes quantizes are those transformers does not keep out of conversion
(`get_keys_to_not_convert`: the LM head / output embedding, tied weights); everything else
(embeddings, LM head, norms, biases) stays bf16. LoRA (all-linear) targets the quantized layers.
"""
from __future__ import annotations

import math
from typing import Any

#: submodules that are heads wherever they sit: the policy's value head, a RewardModel's head, a
#: transformers sequence classifier's score layer
HEAD_MODULES = ("v_head", "head_module", "score")
#: NF4: 4 bits a weight; double quant: a uint8 absmax per 64-weight block and a float32 absmax per
#: 256 blocks (bitsandbytes' defaults; the 1 KiB code tables per layer are left out)
NF4_BLOCK, NESTED_BLOCK = 64, 256
BF16 = 2
FLOOR_ASSUMPTIONS = (
    "one base: NF4 linear weights (0.5 B/weight + 1 B absmax per 64 + 4 B per 64*256, double quant) "
    "+ every other parameter in bf16 (embeddings, LM head, norms, biases); LoRA r on every quantized "
    "linear for the policy and for the RM adapter, bf16 (TRL casts QLoRA adapters to bf16); value head "
    "(hidden + 1) and RM score (hidden) in bf16; gradients + AdamW exp_avg/exp_avg_sq of the trainable "
    "parameters (policy LoRA + value head) in their bf16 dtype. No activations, no KV cache.")


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes holds for one NF4 double-quantized weight of `numel` elements."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return numel // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)


def quantized_linears(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the Linear layers a 4-bit load quantizes."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = get_keys_to_not_convert(model)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in skip)}


def floor_from_counts(linears: dict[str, tuple[int, int]], other_params: int, hidden: int,
                      lora_r: int) -> dict[str, Any]:
    """The floor's parts (bytes) from the quantized linears' shapes and the count of the rest."""
    lora = sum(lora_r * (i + o) for i, o in linears.values())
    value_head, rm_head = hidden + 1, hidden
    trainable = lora + value_head
    parts = {"linear_4bit": sum(nf4_bytes(i * o) for i, o in linears.values()),
             "bf16_other": BF16 * other_params,
             "lora": BF16 * 2 * lora,  # the policy adapter and the RM adapter
             "heads": BF16 * (value_head + rm_head),
             "gradients": BF16 * trainable,
             "optimizer_state": 2 * BF16 * trainable}
    return {"bytes": sum(parts.values()), "parts": parts, "quantized_linears": len(linears),
            "policy_lora_params": lora, "assumptions": FLOOR_ASSUMPTIONS}


def floor(arch: str, shape: dict[str, Any], lora_r: int = 16) -> dict[str, Any]:
    """The QLoRA PPO floor (bytes and parts) for a Llama/Qwen2 config of `shape`, counted on meta."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    linears = quantized_linears(model)
    quantized = sum(i * o for i, o in linears.values())
    other = sum(p.numel() for p in model.parameters()) - quantized
    return dict(floor_from_counts(linears, other, config.hidden_size, lora_r),
                quantized_linear_names=sorted(linears))


def inventory(modules: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Parameter bytes of the bases, adapters and heads `modules` (label -> nn.Module or None) hold.

    Each parameter counts once, under the first label holding it; LoRA weights go to
    ``<label>.<adapter>`` (from ``lora_A.<adapter>``), HEAD_MODULES or a module labelled ``*head``
    to heads, the rest to the base ``<label>``. 4-bit weights count their packed bytes.
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
                kind, key = "adapters", f"{label}.{parts[lora + 1]}"
            elif label.endswith("head") or head is not None:
                kind, key = "heads", label if label.endswith("head") else f"{label}.{head}"
            else:
                kind, key = "bases", label
            out[kind][key] = out[kind].get(key, 0) + p.numel() * p.element_size()
    return out


def lora_params(model: Any, adapter: str = "default") -> int:
    """Parameter count of one LoRA adapter of a peft model."""
    return sum(p.numel() for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n)


#: what each core variant must hold: bases, adapters (exact sets) and the heads it must include
EXPECTED = {
    "ours": ({"policy"}, {"policy.default", "policy.reward"}, {"policy.v_head", "reward_model.head_module"}),
    "trl": ({"policy", "reward_model"}, {"policy.default"}, {"reward_model.score"}),
    "four_4bit": ({"policy", "ref", "critic", "reward_model"}, {"policy.default", "critic.default"},
                  {"value_head", "reward_model.score"}),
    "four_bf16": ({"policy", "ref", "critic", "reward_model"}, set(), {"value_head", "reward_model.score"}),
}
#: the set-up every measured variant shares (asserted equal across them)
SETUP_KEYS = ("batch", "prompts_per_step", "generations_per_prompt", "completion_tokens_min",
              "completion_tokens_max", "gradient_checkpointing", "optimizer_steps", "timed_steps",
              "warmup_steps", "learning_rate")


def check_variants(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Assert the variants of one shape differ only where meant to; returns the checks made."""
    done = []
    for name, (bases, adapters, heads) in EXPECTED.items():
        inv = (rows.get(name) or {}).get("inventory")
        if not inv:
            continue
        assert set(inv["bases"]) == bases, (name, "bases", sorted(inv["bases"]))
        assert set(inv["adapters"]) == adapters, (name, "adapters", sorted(inv["adapters"]))
        assert heads <= set(inv["heads"]), (name, "heads", sorted(inv["heads"]))
        done.append(f"{name}: bases {sorted(bases)}, adapters {sorted(adapters)}, heads {sorted(heads)}")
    if rows.get("trl", {}).get("inventory"):
        adapters = rows["trl"]["inventory"]["adapters"]
        assert not any("ref" in k.split(".")[-1] for k in adapters), ("TRL ref copy", adapters)
        done.append("trl: no 'ref' adapter copy (reference = adapter disabled)")
    lora = {v: r["policy_lora_params"] for v, r in rows.items() if r.get("policy_lora_params")}
    assert len(set(lora.values())) <= 1, ("policy LoRA differs", lora)
    if lora:
        done.append(f"same policy LoRA parameter count {sorted(set(lora.values()))} in {sorted(lora)}")
    same = {}
    for key, part, label in (("ours", "bases", "policy"), ("trl", "bases", "policy"),
                             ("four_4bit", "bases", "policy")):
        inv = (rows.get(key) or {}).get("inventory")
        if inv:
            same[key] = inv[part][label]
    assert len(set(same.values())) <= 1, ("4-bit policy bases differ", same)
    rms = {v: rows[v]["inventory"]["bases"]["reward_model"] for v in ("trl", "four_4bit")
           if (rows.get(v) or {}).get("inventory")}
    assert len(set(rms.values())) <= 1, ("4-bit RM bases differ", rms)
    setups = {v: {k: r["setup"].get(k) for k in SETUP_KEYS} for v, r in rows.items() if r.get("setup")}
    first = next(iter(setups.values()), None)
    for variant, setup in setups.items():
        assert setup == first, ("set-up differs", variant, setup, first)
    if setups:
        done.append(f"same set-up in {sorted(setups)}: {first}")
    return done
