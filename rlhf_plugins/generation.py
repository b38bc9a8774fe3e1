"""Sampling N completions per prompt with HF `generate` (batched, left padding).

Every completion has its own random stream, seeded by ``(seed, prompt index, sample index)``
(:func:`sample_seed`): a logits processor draws each row's next token with that row's
``torch.Generator`` and hands HF's greedy decoder a one-hot choice. A completion therefore does
not depend on which other prompts share its batch, on the batch size, or on whether the run
was interrupted and resumed (up to the floating-point effect of padding on the forward pass,
which is fixed for a fixed chunk of prompts). Temperature 0 means greedy decoding.

Prompts are token ids produced by the chat template component with
``add_generation_prompt=True``; generation stops at the template's end-of-turn token(s)
(:func:`end_of_turn_token_ids`) and at every stop string that is several tokens
(:func:`end_of_turn_stop_strings`, through transformers' ``stop_strings``); the stop token or
string is not part of the returned text, and each completion records why it ended
(``finish_reason``: ``stop`` or ``length``).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, NamedTuple, Sequence

from .errors import ConfigError

logger = logging.getLogger(__name__)

_SENTINEL = "Zq7SENTINELx9"


class Completion(NamedTuple):
    """One sampled completion: its text (stop token cut), generated tokens, and why it ended."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of completion `sample_index` of prompt `prompt_index` (stable across runs)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(prompt_index)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def end_of_turn_token_ids(template: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn in `template`, then the tokenizer's eos.

    Exactly what the template declares: ``stop_token_ids(tokenizer)``, then each of
    ``stop_strings(tokenizer)`` as a token (a string that is several tokens of `tokenizer` is
    left to :func:`end_of_turn_stop_strings`); templates that leave them out get the Protocol's
    defaults (none; the eos). When that yields nothing beyond the eos, an assistant turn is rendered and the special token right
    after its content is added too, so a template's own end-of-turn marker still stops generation.
    """
    from .protocols import member

    ids: list[int] = []

    def add_token(tid: Any) -> None:
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)

    def add_string(text: Any) -> None:
        if not isinstance(text, str) or not text:
            return
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            add_token(tid)
            return
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            add_token(pieces[0])

    for tid in member(template, "chat_templates", "stop_token_ids")(tokenizer) or ():
        add_token(int(tid))
    for text in member(template, "chat_templates", "stop_strings")(tokenizer) or ():
        add_string(text)
    eos = tokenizer.eos_token_id
    if not any(t != eos for t in ids):
        ids.extend(t for t in _rendered_end_of_turn(template, tokenizer) if t not in ids)
    add_token(eos)
    if not ids:
        raise ConfigError("generation: cannot find an end-of-turn token for the chat template "
                          "and the tokenizer has no eos token")
    return ids


def _single_token(tokenizer: Any, text: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(text)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return True
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def end_of_turn_stop_strings(template: Any, tokenizer: Any) -> list[str]:
    """The template's stop strings that are several tokens of `tokenizer` (the others are ids in
    :func:`end_of_turn_token_ids`); generation stops at them too, through ``stop_strings``."""
    from .protocols import member

    out: list[str] = []
    for text in member(template, "chat_templates", "stop_strings")(tokenizer) or ():
        if isinstance(text, str) and text and text not in out and not _single_token(tokenizer, text):
            out.append(text)
    return out


def _rendered_end_of_turn(template: Any, tokenizer: Any) -> list[int]:
    """The special token right after an assistant message's content, found by rendering one."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = template.render_text(messages, tokenizer=tokenizer, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this simply declares nothing
        return []
    at = text.find(_SENTINEL)
    if at < 0:
        return []
    suffix = text[at + len(_SENTINEL):]
    pieces = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    return [pieces[0]] if pieces and pieces[0] in special else []


def encode_prompt(template: Any, tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversational prompt followed by the assistant generation prompt."""
    from .guard import guarded

    with guarded(template, "chat_templates", "encode()"):
        encoded = template.encode(list(messages), tokenizer=tokenizer, add_generation_prompt=True)
    return [int(t) for t in encoded.input_ids]


def _nucleus(probs: Any, top_p: float) -> tuple[Any, Any]:
    """(probabilities, token ids) of each row's sampling candidates, as (rows, k) tensors.

    top_p < 1: the smallest prefix of the tokens by descending probability whose mass reaches
    top_p (the top token always stays), zeros after it. The prefix is found among the top k
    tokens (k grows until it holds every row's nucleus), not by sorting the whole vocabulary:
    ~10x cheaper at a 49k vocabulary, and the same candidates. top_p >= 1: every token, in
    vocabulary order.
    """
    import torch

    vocab = probs.shape[-1]
    if top_p >= 1.0:
        return probs, torch.arange(vocab, device=probs.device).expand_as(probs)
    k = min(vocab, 64)
    while True:
        top, ids = probs.topk(k, dim=-1)
        mass = top.cumsum(dim=-1)
        if k == vocab or bool((mass[:, -1] >= top_p).all()):
            break
        k = min(vocab, k * 8)
    return top.masked_fill(mass - top >= top_p, 0.0), ids


def _make_sampler(seeds: Sequence[int], temperature: float, top_p: float) -> Any:
    """A LogitsProcessor drawing row r's token from its own generator seeded with seeds[r].

    Each step takes one uniform u from row r's generator and returns the first candidate whose
    cumulative (renormalised) probability exceeds u (inverse-CDF sampling over `_nucleus`'s
    candidates): a row's tokens depend only on its seed, not on the batch it is in.
    """
    import torch
    from transformers import LogitsProcessor

    class PerSampleSampler(LogitsProcessor):
        """Temperature + nucleus sampling with one torch.Generator per row; returns a one-hot choice."""

        def __init__(self) -> None:
            self.generators: list[torch.Generator] | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.generators is None:
                self.generators = [torch.Generator(device=scores.device).manual_seed(int(s))
                                   for s in seeds]
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            kept, ids = _nucleus(probs, top_p)
            cdf = kept.cumsum(dim=-1)
            u = torch.stack([torch.rand((), generator=g, device=scores.device)
                             for g in self.generators])
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            # u * total may round up to the total: fall back to the row's last positive candidate
            positive = torch.arange(kept.shape[-1], device=kept.device).expand_as(kept)
            last = positive.masked_fill(kept <= 0, -1).amax(dim=-1, keepdim=True)
            choice = ids.gather(1, torch.minimum(pick, last))
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, choice, 0.0)

    return PerSampleSampler()


def _sampling_settings(generator: Any, stop_ids: Sequence[int], stop_strings: Sequence[str],
                       max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """The sampling settings a generator keeps, typed (stop_strings: multi-token stop strings,
    the text is cut before them)."""
    generator.stop_ids = [int(t) for t in stop_ids]
    generator.stop_strings = [str(t) for t in stop_strings if t]
    generator.max_new_tokens = int(max_new_tokens)
    generator.temperature = float(temperature)
    generator.top_p = float(top_p)
    generator.seed = int(seed)


class HFGenerator:
    """N completions per prompt with `model.generate`; `calls` counts generate calls made."""

    def __init__(self, model: Any, tokenizer: Any, *, stop_ids: Sequence[int],
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 16, stop_strings: Sequence[str] = (),
                 stop_patterns: Sequence[str] = ()) -> None:
        import re

        self.model = model
        #: regular expressions that end a completion once its text matches (e.g. an answer line)
        self.stop_patterns = [re.compile(p) for p in stop_patterns if p]
        self.tokenizer = tokenizer
        _sampling_settings(self, stop_ids, stop_strings, max_new_tokens, temperature, top_p, seed)
        self.batch_size = int(batch_size)
        #: prefill each distinct prompt once for all its samples in a batch (`_shared_prefix_cache`)
        self.share_prefill = True
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self.calls = 0

    def generate(self, prompt_ids: Sequence[Sequence[int]], prompt_indices: Sequence[int],
                 num_samples: int, progress: Callable[[int], Any] | None = None,
                 ) -> list[list[Completion]]:
        """`num_samples` completions for each prompt (ids), seeded by its global index."""
        import torch
        from transformers import GenerationConfig

        jobs = [(p, j) for p in range(len(prompt_ids)) for j in range(num_samples)]
        jobs.sort(key=lambda job: (len(prompt_ids[job[0]]), job))  # less padding per batch
        out: list[list[Completion | None]] = [[None] * num_samples for _ in prompt_ids]
        greedy = self.temperature == 0.0
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id,
                                  stop_strings=list(self.stop_strings) or None)
        extra = {"tokenizer": self.tokenizer} if self.stop_strings else {}
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        cache_arg = _cache_kwarg(model)
        try:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start:start + self.batch_size]
                width = max(len(prompt_ids[p]) for p, _ in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (p, _) in enumerate(batch):  # left padding (decoder-only generation)
                    n = len(prompt_ids[p])
                    ids[row, width - n:] = torch.tensor(list(prompt_ids[p]), dtype=torch.long)
                    mask[row, width - n:] = 1
                processors = []
                criteria = ([_PatternStop(self.tokenizer, self.stop_patterns, width)]
                            if self.stop_patterns else None)
                if not greedy:
                    seeds = [sample_seed(self.seed, prompt_indices[p], j) for p, j in batch]
                    processors.append(_make_sampler(seeds, self.temperature, self.top_p))
                with torch.no_grad():
                    self.calls += 1
                    ids, mask = ids.to(device), mask.to(device)
                    cache = (_shared_prefix_cache(model, ids, mask, [p for p, _ in batch], cache_arg)
                             if self.share_prefill else None)
                    generated = model.generate(input_ids=ids, attention_mask=mask,
                                               generation_config=config,
                                               logits_processor=processors or None,
                                               stopping_criteria=criteria,
                                               **({cache_arg: cache} if cache else {}),
                                               **extra)
                new_tokens = generated[:, width:].tolist()
                for row, (p, j) in enumerate(batch):
                    out[p][j] = self._completion(new_tokens[row])
                if progress is not None:
                    progress(len(batch))
        finally:
            model.train(was_training)
        return [[c for c in row if c is not None] for row in out]

    def _completion(self, tokens: list[int]) -> Completion:
        cut = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
        body = tokens if cut is None else tokens[:cut]
        if self.stop_strings:
            found = cut_at_stop_string(self.tokenizer, body, self.stop_strings)
            if found is not None:
                return Completion(found[0], found[1], "stop")
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        for pattern in self.stop_patterns:
            match = pattern.search(text)
            if match is not None:
                return Completion(text[:match.end()], len(body), "stop")
        return Completion(text, len(body), "length" if cut is None else "stop")


def _cache_kwarg(model: Any) -> str:
    """The model's name for a KV cache argument: `cache` (transformers >= 5.2x), else `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _shared_prefix_cache(model: Any, ids: Any, mask: Any, owners: Sequence[int],
                         cache_arg: str | None = None) -> Any:
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt.

    Rows of the same prompt (its N samples) share their prefill: the distinct prompts run through
    the model once and the cache is repeated to the rows (`reorder_cache`, as beam search does);
    `generate` then feeds only each row's last prompt token. None when no prompt repeats. The
    positions are the ones `generate` gives left-padded rows (attention-mask cumsum).
    `cache_arg`: the model's name for the cache argument (`_cache_kwarg`, looked up when None).
    """
    import torch
    from transformers import DynamicCache

    first: dict[int, int] = {}
    for row, p in enumerate(owners):
        first.setdefault(p, row)
    if len(first) == len(owners) or ids.shape[1] < 2:
        return None
    order = {p: k for k, p in enumerate(first)}
    unique = torch.tensor(list(first.values()), device=ids.device)
    rows = torch.tensor([order[p] for p in owners], device=ids.device)
    u_ids, u_mask = ids[unique, :-1], mask[unique, :-1]
    positions = (u_mask.cumsum(-1) - 1).masked_fill(u_mask == 0, 1)
    cache = DynamicCache(config=getattr(model, "config", None))
    kw = {"input_ids": u_ids, "attention_mask": u_mask, "position_ids": positions,
          cache_arg or _cache_kwarg(model): cache, "use_cache": True}
    try:  # the cache is what is wanted: the LM head on the last position only
        model(**kw, logits_to_keep=1)
    except TypeError:  # a model without `logits_to_keep`
        model(**kw)
    cache.reorder_cache(rows)
    return cache


def _PatternStop(tokenizer: Any, patterns: Sequence[Any], start: int) -> Any:  # noqa: N802
    """A transformers StoppingCriteria: a row is done once its new text matches a pattern."""
    import torch
    from transformers import StoppingCriteria

    class PatternStop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(p.search(t) for p in patterns) for t in texts],
                                dtype=torch.bool, device=input_ids.device)

    return PatternStop()


def cut_at_stop_string(tokenizer: Any, tokens: Sequence[int], stop_strings: Sequence[str],
                       ) -> tuple[str, int] | None:
    """(text before the first stop string, tokens wholly before it), or None when none occurs.

    The text drops special tokens as ``decode(skip_special_tokens=True)`` does.
    """
    def text_of(k: int) -> str:
        return tokenizer.decode(list(tokens[:k]), skip_special_tokens=False)

    full = text_of(len(tokens))
    hits = [(full.find(s), s) for s in stop_strings if s in full]
    if not hits:
        return None
    start = min(h[0] for h in hits)
    lo, hi = 0, len(tokens)  # the largest k whose text ends at or before the stop string
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(text_of(mid)) <= start:
            lo = mid
        else:
            hi = mid - 1
    text = full[:start]
    for special in sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True):
        text = text.replace(special, "")
    return text, lo
