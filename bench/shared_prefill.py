"""Sampling N completions per prompt with and without a shared prefill (issue 16), side by side.

    python bench/shared_prefill.py --model RUN/sft/merged [--prompts 128] [--samples 3]

`HFGenerator` (bfloat16, batches of 64, temperature 0.8, top-p 0.95, the quickstart's answer-line
stop) samples `--samples` completions for each of `--prompts` synthetic training prompts, twice
each way, alternating: `share_prefill` on (the N samples of a prompt reuse one KV cache of its
prompt) and off (every row prefills its own prompt). Prints the seconds of each pass, the ratio,
and how many completions are the same text both ways (bf16 rounds a smaller prefill batch
differently; in float32 they are identical, tests/test_sampling.py).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a merged policy, e.g. a pipeline run's sft/merged")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_plugins import registry
    from rlhf_plugins.data import synth
    from rlhf_plugins.generation import HFGenerator, encode_prompt
    from rlhf_plugins.models import load_tokenizer

    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tpl = registry().chat_templates.get("chatml")
    rows = synth.rl_rows(args.prompts, 0, "train")
    ids = [encode_prompt(tpl, tok, r["prompt"]) for r in rows]
    seconds: dict[bool, list[float]] = {True: [], False: []}
    texts: dict[bool, list[str]] = {}
    for share in (True, False, True, False):
        gen = HFGenerator(model, tok, stop_ids=[tok.eos_token_id], max_new_tokens=64, temperature=0.8,
                          top_p=0.95, batch_size=64, stop_patterns=[r"The answer is\s*\S+?\.(?=\s)"])
        gen.share_prefill = share
        start = time.perf_counter()
        out = gen.generate(ids, list(range(len(ids))), args.samples)
        seconds[share].append(time.perf_counter() - start)
        texts[share] = [c.text for row in out for c in row]
    same = sum(a == b for a, b in zip(texts[True], texts[False]))
    print(f"| prefill | seconds ({args.prompts} prompts x {args.samples}, two passes) |")
    print("| --- | --- |")
    for share in (True, False):
        print(f"| {'shared' if share else 'per row'} | {', '.join(f'{s:.1f}' for s in seconds[share])} |")
    print(f"\nshared / per row: {min(seconds[True]) / min(seconds[False]):.2f}x; "
          f"same text both ways: {same} of {len(texts[True])}")


if __name__ == "__main__":
    main()
