"""Benchmark: segment-aware encode + mask vs transformers' apply_chat_template assistant mask (issue 3).

Run:  python bench/bench_encode.py [--n 10000] [--tokenizer PATH]

On N synthetic multi-turn conversations (optional system message, 1-4 user/assistant turns,
mixed-length unicode content), it times in one run:
- ``ours``: `registry().chat_templates.get("chatml").encode(...)` + the `all_assistant_turns` mask;
- ``hf``: `tokenizer.apply_chat_template(conv, tokenize=True, return_assistant_tokens_mask=True,
  return_dict=True)` with the same ChatML format written with `{% generation %}` tags, one
  conversation per call (as a data-prep map does), and also batched (a list per call);
and asserts that both give the same input_ids and the same masks for every conversation.
The tokenizer defaults to the embedded default model's (SmolLM2-135M-Instruct, 49k BPE).
"""
from __future__ import annotations

import argparse
import platform
import random
import time

GENERATION_CHATML = (
    "{%- if bos_token is defined and bos_token and bos_token != '<|im_start|>' %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] | trim + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

WORDS = ("the model learns to follow instructions step by step while the reward favours short "
         "answers, code like def f(x): return x * 2 and numbers 3.14 42 1e-5; café naïve 日本語 🙂").split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """N random multi-turn conversations (deterministic)."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        out.append(conv)
    return out


def main() -> None:
    """Time both encoders on the same conversations and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the embedded default model)")
    parser.add_argument("--batch", type=int, default=1000, help="conversations per batched HF call")
    args = parser.parse_args()

    import transformers

    from rlhf_plugins import registry
    from rlhf_plugins.models import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or default_model_path())
    convs = conversations(args.n)
    tpl = registry().chat_templates.get("chatml")
    masking = registry().masking_strategies.get("all_assistant_turns")
    tpl.encode(convs[0], tokenizer=tokenizer)  # warm caches (backend copy) outside the timing

    t0 = time.perf_counter()
    ours = []
    for conv in convs:
        enc = tpl.encode(conv, tokenizer=tokenizer)
        ours.append((enc.input_ids, masking.mask(enc)))
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    hf = []
    for conv in convs:
        out = tokenizer.apply_chat_template(conv, chat_template=GENERATION_CHATML, tokenize=True,
                                            return_assistant_tokens_mask=True, return_dict=True)
        hf.append((list(out["input_ids"]), list(out["assistant_masks"])))
    t_hf = time.perf_counter() - t0

    t0 = time.perf_counter()
    hf_batched = []
    for start in range(0, len(convs), args.batch):
        out = tokenizer.apply_chat_template(convs[start:start + args.batch], chat_template=GENERATION_CHATML,
                                            tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
        hf_batched += [(list(i), list(m)) for i, m in zip(out["input_ids"], out["assistant_masks"])]
    t_hf_batched = time.perf_counter() - t0

    for k, ((a_ids, a_mask), (b_ids, b_mask), (c_ids, c_mask)) in enumerate(zip(ours, hf, hf_batched)):
        assert a_ids == b_ids == c_ids, f"conversation {k}: input_ids differ"
        assert a_mask == b_mask == c_mask, f"conversation {k}: masks differ"
    tokens = sum(len(ids) for ids, _ in ours)
    print(f"{args.n} conversations, {tokens} tokens, tokenizer {tokenizer.name_or_path} "
          f"(vocab {len(tokenizer)}); transformers {transformers.__version__}, Python {platform.python_version()}")
    print("identical input_ids and masks: yes")
    print(f"| method                                   |   time   | conv/s  | speed-up of ours |")
    print(f"|------------------------------------------|---------:|--------:|-----------------:|")
    for label, t in (("ours: chatml.encode + all_assistant_turns", t_ours),
                     ("hf apply_chat_template, 1 conv per call", t_hf),
                     (f"hf apply_chat_template, {args.batch} per call", t_hf_batched)):
        print(f"| {label:<40} | {t:7.2f}s | {args.n / t:7.0f} | {t / t_ours:15.1f}x |")


if __name__ == "__main__":
    main()
