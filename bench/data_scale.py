"""Benchmark: every stage's data preparation on 10k to 1M conversational rows vs TRL's (issue 29).

Run:  python bench/data_scale.py [--rows 10000 100000 1000000] [--stages sft dpo kto rm trl_sft]
                                 [--work-dir /tmp/rlhf-data-scale] [--tokenizer DIR] [--json OUT]

Writes two synthetic JSON-lines files per row count under `--work-dir` (deleted afterwards
unless `--keep-files`): conversations (``messages``: user, assistant, user, assistant; ~1 KB a
row, so 1M rows are ~1 GB) and preference pairs (``prompt``, ``chosen``, ``rejected``; ~1 KB).
Each measurement runs in a fresh process (so its peak RSS is its own) and goes through a
stage's own public data path on the file:

- ``load``: the reader alone: `load_dataset_source` (JSON -> memory-mapped Arrow) and one pass
  over the rows reading every message (no tokenizing): what the stages share;
- ``sft``: `load_dataset_source` + `build_sft_dataset(rows, tokenizer, "chatml", "all_assistant_turns")`;
- ``dpo``: `load_dataset_source` + `encode_pairs` (the DPO stage's encoder, same template/masking);
- ``kto``: `load_dataset_source` + `encode_unpaired` (a pair gives a desirable and an undesirable row);
- ``rm``: the reward-model stage's `load_rows` + `encode_rows` with the ``bradley_terry`` head;
- ``trl_sft``: TRL's own `SFTTrainer._prepare_dataset` (render + tokenize + assistant mask +
  labels, `assistant_only_loss=True`, `max_length=None`, `dataset_num_proc` unset) on the same
  conversations loaded the same way, the tokenizer's chat template set to the ChatML format
  with `{% generation %}` tags (the format ``chatml`` renders: bench/bench_encode.py checks
  that both give the same ids and masks), so both sides do the same work.

Recorded per measurement: input rows, output rows, load seconds (JSON -> Arrow), prepare
seconds, rows/s over the preparation, peak RSS (`ru_maxrss`: anonymous + file pages touched)
and peak anonymous RSS (`RssAnon`, sampled every 50 ms: the memory the process owns, not the
memory-mapped Arrow pages the kernel can drop), each also above the process's RSS before it
read the data. The tokenizer defaults to the embedded default model's (SmolLM2-135M-Instruct).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

STAGES = ("load", "sft", "dpo", "kto", "rm", "trl_sft")
#: what each measurement records
FIELDS = ("stage", "rows", "out_rows", "load_s", "prepare_s", "rows_per_s", "baseline_rss_mb",
          "peak_rss_mb", "baseline_anon_mb", "peak_anon_mb", "file_mb")
WORDS = ("the model learns to follow instructions step by step while the reward favours short "
         "answers, code like def f(x): return x * 2 and numbers 3.14 42 1e-5; café naïve 日本語 🙂").split()


# --------------------------------------------------------------------------------------------
# Synthetic rows, streamed to disk (never a list of them)
# --------------------------------------------------------------------------------------------

def _sentences(seed: int, count: int = 4096) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "." for _ in range(count)]


def write_rows(path: Path, n: int, kind: str, seed: int = 0) -> int:
    """Write `n` rows of `kind` ("sft" conversations or "preference" pairs); returns the bytes."""
    pool = _sentences(seed)
    rng = random.Random(seed + 1)

    def text(k: int) -> str:
        return " ".join(pool[rng.randrange(len(pool))] for _ in range(k))

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            if kind == "sft":
                row: dict[str, Any] = {"messages": [
                    {"role": "user", "content": text(2)}, {"role": "assistant", "content": text(3)},
                    {"role": "user", "content": text(1)}, {"role": "assistant", "content": text(2)}]}
            else:
                row = {"prompt": [{"role": "user", "content": text(2)}],
                       "chosen": [{"role": "assistant", "content": text(3)}],
                       "rejected": [{"role": "assistant", "content": text(3)}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# One measurement (run in a fresh process)
# --------------------------------------------------------------------------------------------

class AnonPeak(threading.Thread):
    """The largest `RssAnon` of this process, sampled every `interval` seconds (Linux)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.now())


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count(out: Any) -> int:
    """Rows of what a stage's encoder returned: a Dataset, (Dataset, dropped) or EncodedRows."""
    out = out[0] if isinstance(out, tuple) else out
    return len(out.features) if hasattr(out, "kept") else len(out)


def _ours(stage: str, tokenizer: Any) -> Callable[[str], tuple[int, float, int]]:
    """(path -> (input rows, load seconds, output rows)) through the stage's public data path."""
    from rlhf_plugins import registry
    from rlhf_plugins.stages.skeleton import load_dataset_source

    def run(path: str) -> tuple[int, float, int]:
        start = time.perf_counter()
        if stage == "rm":
            from rlhf_plugins.stages.reward_model.data import encode_rows, load_rows

            head = registry().reward_heads.get("bradley_terry")
            rows, where = load_rows(path, split="train", head=head, num_examples=None, seed=0)
            loaded = time.perf_counter() - start
            return len(rows), loaded, _count(encode_rows(
                rows, head, tokenizer, registry().chat_templates.get("chatml"), where=where))
        rows, where = load_dataset_source(path)
        loaded = time.perf_counter() - start
        if stage == "load":
            return len(rows), loaded, sum(1 for row in rows if sum(len(m["content"]) for m in row["messages"]))
        if stage == "sft":
            from rlhf_plugins.stages.sft.dataset import build_sft_dataset as encode
        elif stage == "dpo":
            from rlhf_plugins.stages.dpo.data import encode_pairs as encode
        else:
            from rlhf_plugins.stages.kto.data import encode_unpaired as encode
        return len(rows), loaded, _count(encode(rows, tokenizer, "chatml", "all_assistant_turns",
                                                where=where))

    return run


def _trl(tokenizer: Any, scratch: str) -> Callable[[str], tuple[int, float, int]]:
    """TRL's SFTTrainer data preparation (the trainer built on a tiny model and 2 rows first)."""
    from bench_encode import GENERATION_CHATML
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf_plugins.data.files import load_data_file

    tokenizer.chat_template = GENERATION_CHATML
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    args = SFTConfig(output_dir=scratch, report_to=[], max_length=None, assistant_only_loss=True,
                     use_cpu=True, save_strategy="no")
    two = Dataset.from_list([{"messages": [{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}]}] * 2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=two, processing_class=tokenizer)

    def run(path: str) -> tuple[int, float, int]:
        start = time.perf_counter()
        rows = load_data_file(path)  # what `load_dataset("json", ...)` gives: memory-mapped Arrow
        loaded = time.perf_counter() - start
        out = trainer._prepare_dataset(rows, tokenizer, args, False, None, "train")
        return len(rows), loaded, len(out)

    return run


def measure(stage: str, data: str, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """One stage's data preparation of `data`, timed, with this process's peak memory."""
    import datasets

    from rlhf_plugins.models import load_tokenizer, resolve_model

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(tokenizer_dir or resolve_model("default"))
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        run = _trl(tokenizer, scratch) if stage == "trl_sft" else _ours(stage, tokenizer)
        baseline, sampler = _max_rss(), AnonPeak()
        anon_before = sampler.now()
        sampler.start()
        start = time.perf_counter()
        rows, load_s, out_rows = run(data)
        total = time.perf_counter() - start
        peak_anon = sampler.stop()
    prepare_s = total - load_s
    mb = 1 / 2 ** 20
    return {"stage": stage, "rows": rows, "out_rows": out_rows, "load_s": round(load_s, 3),
            "prepare_s": round(prepare_s, 3), "rows_per_s": round(rows / prepare_s, 1),
            "baseline_rss_mb": round(baseline * mb), "peak_rss_mb": round(_max_rss() * mb),
            "baseline_anon_mb": round(anon_before * mb), "peak_anon_mb": round(peak_anon * mb)}


def measure_in_subprocess(stage: str, data: Path, tokenizer_dir: str | None,
                          timeout: float | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (its peak RSS its own); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", stage, "--data", str(data)]
    if tokenizer_dir:
        cmd += ["--tokenizer", str(tokenizer_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"{stage} on {data}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The sweep and its table
# --------------------------------------------------------------------------------------------

def _kind(stage: str) -> str:
    return "sft" if stage in ("load", "sft", "trl_sft") else "preference"


def bench(row_counts: list[int], stages: list[str], work_dir: Path, tokenizer_dir: str | None = None,
          keep_files: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every stage at every row count (files written once per count), one process each."""
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in row_counts:
        files = {kind: work_dir / f"{kind}_{n}.jsonl" for kind in {_kind(s) for s in stages}}
        sizes = {kind: write_rows(path, n, kind) for kind, path in files.items()}
        try:
            for stage in stages:
                kind = _kind(stage)
                result = measure_in_subprocess(stage, files[kind], tokenizer_dir)
                result["file_mb"] = round(sizes[kind] / 2 ** 20)
                results.append(result)
                log(json.dumps(result))
        finally:
            for path in files.values():
                if not keep_files:
                    path.unlink(missing_ok=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per row count, each stage's rows/s (vs TRL's SFT where measured) and memory,
    with the peak growth over the smallest row count measured for that stage."""
    trl = {r["rows"]: r for r in results if r["stage"] == "trl_sft"}
    first: dict[str, dict[str, Any]] = {}
    lines = ["| rows | stage | file MB | rows/s | vs TRL SFT rows/s | prepare s | load s | peak RSS MB "
             "(anon) | TRL SFT peak RSS MB (anon) | peak RSS growth MB (anon) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["rows"], STAGES.index(r["stage"]))):
        base = first.setdefault(r["stage"], r)
        t = trl.get(r["rows"])
        ratio = f"{r['rows_per_s'] / t['rows_per_s']:.2f}x" if t and r["stage"] not in ("load", "trl_sft") else ""
        trl_mem = f"{t['peak_rss_mb']} ({t['peak_anon_mb']})" if t else "n/a"
        growth = (f"+{r['peak_rss_mb'] - base['peak_rss_mb']} (+{r['peak_anon_mb'] - base['peak_anon_mb']})"
                  if base is not r else "-")
        lines.append(f"| {r['rows']:,} | {r['stage']} | {r.get('file_mb', '')} | {r['rows_per_s']:,.0f} | "
                     f"{ratio} | {r['prepare_s']} | {r['load_s']} | {r['peak_rss_mb']} ({r['peak_anon_mb']}) "
                     f"| {trl_mem} | {growth} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line; run one measurement (`--measure`) or the whole sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-data-scale")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the embedded default model)")
    parser.add_argument("--keep-files", action="store_true", help="keep the JSONL files")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process of one measurement
        print(json.dumps(measure(args.measure, args.data, args.tokenizer)))
        return
    results = bench(args.rows, args.stages, args.work_dir, args.tokenizer, args.keep_files)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    import datasets
    import transformers
    import trl

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python "
          f"{platform.python_version()}, datasets {datasets.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}\n")
    print(table(results))


if __name__ == "__main__":
    main()
