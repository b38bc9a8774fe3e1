"""Batched generation with HF `generate`: template-rendered prompts, stop at end of turn."""
from __future__ import annotations

from typing import Any, Sequence


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    """Token ids that end an assistant turn for `template` (plus the tokenizer's eos)."""
    ids: list[int] = []
    strings = list(getattr(template, "stop_strings", lambda tok: [])(tokenizer)) \
        if callable(getattr(template, "stop_strings", None)) else []
    strings += [tokenizer.eos_token] if tokenizer.eos_token else []
    for s in strings:
        tid = tokenizer.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def generate_completions(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict]], *,
                         template: str | Any = "chatml", max_new_tokens: int = 96,
                         batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, seed: int | None = None, desc: str = "generating",
                         ) -> list[str]:
    """One completion per conversational prompt (text after the generation prompt, stop token cut)."""
    import torch
    from tqdm.auto import tqdm

    from . import registry

    tpl = registry().chat_templates.get(template) if isinstance(template, str) else template
    encoded = [tpl.encode(list(p), tokenizer=tokenizer, add_generation_prompt=True).input_ids
               for p in prompts]
    stops = stop_token_ids(tokenizer, tpl)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding per batch
    out: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding for decoder-only generation
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            if seed is not None:
                torch.manual_seed(seed + start)
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None,
                                     eos_token_id=stops, pad_token_id=pad)
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out
