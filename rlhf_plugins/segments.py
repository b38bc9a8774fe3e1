"""The segment encoder: rendered text as owned segments, tokenized so content never makes a control token.

A chat template renders a conversation as `Segment`s (scaffolding, message content, end-of-turn
markers); `encode_segments` tokenizes them into an `Encoded` whose per-token roles/turns are
exact. Every built-in template uses it, and :class:`rlhf_plugins.sdk.ChatTemplate` wires it up
for third-party templates (they implement only `segments()`).

Importing this module does not import torch (nor tokenizers: that happens on first use).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .conversation import Encoded
from .errors import DataError

__all__ = ["TEMPLATE_ROLE", "Segment", "scaffold", "segment_encoder", "encode_segments"]

#: the role (and turn -1) of scaffolding: tokens the template writes that belong to no message
TEMPLATE_ROLE = "template"



class Segment(NamedTuple):
    """A piece of rendered text with its owner.

    `role`/`turn`: the message's role and index, or "template"/-1 for scaffolding. `literal`:
    the text is data (message content) - it is tokenized as plain text, so no special/control
    token can come from it; otherwise (scaffolding, end-of-turn markers) the tokenizer's added
    tokens are recognised in it.
    """

    text: str
    role: str = TEMPLATE_ROLE
    turn: int = -1
    literal: bool = False


def scaffold(text: str) -> Segment:
    """A scaffolding segment (role "template", turn -1)."""
    return Segment(text, TEMPLATE_ROLE, -1, False)


_UNSAFE = ("the tokenizer's vocabulary produces a control token from plain text; "
           "this conversation cannot be encoded safely")


class _SegmentEncoder:
    """Per-tokenizer state: control tokens, and a copy of the fast backend with no added tokens."""

    def __init__(self, tokenizer: Any) -> None:
        import json
        import re

        self.tokenizer = tokenizer
        self.control = dict(tokenizer.added_tokens_encoder)  # every added token is a control token
        self.control_ids = frozenset(self.control.values())
        longest = sorted(self.control, key=len, reverse=True)
        self.control_re = re.compile("(" + "|".join(map(re.escape, longest)) + ")") if longest else None
        self.backend = None
        self.newline_trick = False
        self.fast_pattern: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            spec = json.loads(backend.to_str())
            spec["added_tokens"] = []
            spec["post_processor"] = None  # no template, no offset trimming
            spec["truncation"] = None
            spec["padding"] = None
            self.backend = Tokenizer.from_str(json.dumps(spec))
            self.newline_ids: list[int] = self.backend.encode("\n", add_special_tokens=False).ids
            if longest:
                # SentencePiece-style pre-tokenizers add a prefix space at the start of a string but
                # not after an added token: detect it once, then encode later runs after a newline.
                whole = tokenizer.encode(longest[-1] + "a", add_special_tokens=False)[1:]
                alone = self.backend.encode("a", add_special_tokens=False).ids
                self.newline_trick = whole != alone
            self._setup_fast_path(spec)

    #: GPT-2's pre-tokenizer regex (what `ByteLevel(use_regex=True)` applies)
    GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def _setup_fast_path(self, spec: dict) -> None:
        # Byte-level BPE with GPT-2 pre-tokenization (GPT-2, SmolLM2, ...): tokenization is a pure
        # function of each pre-token, so ids are cached per pre-token. Anything else: offsets path.
        self.fast_pattern = None
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space") and model.get("type") == "BPE"
                and model.get("dropout") is None and not model.get("byte_fallback")):
            try:
                import regex
            except ImportError:  # pragma: no cover - transformers depends on regex
                return
            from tokenizers import pre_tokenizers

            alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (ord(c) > 255, ord(c)))
            printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
            table: dict[int, str] = {}
            n = 0
            for b in range(256):  # GPT-2's bytes_to_unicode
                if b in printable:
                    table[b] = chr(b)
                else:
                    table[b] = chr(256 + n)
                    n += 1
            if set(table.values()) != set(alphabet):
                return
            self.byte_table = table
            self.piece_cache: dict[str, list[int]] = {}
            self.fast_pattern = regex.compile(self.GPT2_PATTERN)
            # whitespace/control characters the engines might classify differently
            self.fast_guard = regex.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\u180e\u200b-\u200d\u2060]")

    def _split_markup(self, text: str) -> list[tuple[str, int | None]]:
        if self.control_re is None:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        for k, part in enumerate(self.control_re.split(text)):
            if k % 2:
                out.append((part, self.control[part]))
            elif part:
                out.append((part, None))
        return out

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[str], list[int]]:
        """Token ids and per-token roles/turns for `segments` (see `encode_segments`)."""
        from bisect import bisect_right

        # Flatten into text runs separated by control tokens written by the template.
        items: list[tuple[int | None, str, int, Any]] = []  # (special id | None, role, turn, run)
        runs: list[list[Any]] = []  # [text pieces, piece starts, roles, turns]
        current: list[Any] | None = None
        for seg in segments:
            if not seg.text:
                continue
            parts = [(seg.text, None)] if seg.literal else self._split_markup(seg.text)
            for text, special in parts:
                if special is not None:
                    items.append((special, seg.role, seg.turn, None))
                    current = None
                    continue
                if current is None:
                    current = [[], [], [], [], 0]
                    runs.append(current)
                    items.append((None, "", 0, current))
                current[0].append(text)
                current[1].append(current[4])
                current[2].append(seg.role)
                current[3].append(seg.turn)
                current[4] += len(text)
        ids: list[int] = []
        roles: list[str] = []
        turns: list[int] = []
        if self.backend is None:  # slow tokenizer: piece by piece, content never sees added tokens
            tok = self.tokenizer
            for special, role, turn, run in items:
                if special is not None:
                    ids.append(special), roles.append(role), turns.append(turn)
                    continue
                for text, r, t in zip(run[0], run[2], run[3]):
                    piece = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
                    if not self.control_ids.isdisjoint(piece):
                        raise DataError(_UNSAFE)
                    ids += piece
                    roles += [r] * len(piece)
                    turns += [t] * len(piece)
            return ids, roles, turns
        results: dict[int, tuple[list[int], list[str], list[int]]] = {}
        pending = runs
        if self.fast_pattern is not None:
            pending = []
            for run in runs:
                done = self._fast_run(run)
                if done is None:
                    pending.append(run)
                else:
                    results[id(run)] = done
        if pending:
            self._rust_runs(pending, items, results)
        for special, role, turn, run in items:
            if special is not None:
                ids.append(special), roles.append(role), turns.append(turn)
                continue
            run_ids, run_roles, run_turns = results[id(run)]
            if not self.control_ids.isdisjoint(run_ids):
                raise DataError(_UNSAFE)
            ids += run_ids
            roles += run_roles
            turns += run_turns
        return ids, roles, turns

    def _fast_run(self, run: list[Any]) -> tuple[list[int], list[str], list[int]] | None:
        """Byte-level BPE without Rust offsets: regex pre-tokens, each tokenized once and cached."""
        text = "".join(run[0])
        if self.fast_guard.search(text):
            return None  # characters whose class could differ between regex engines
        from bisect import bisect_right
        from itertools import accumulate

        starts, run_roles, run_turns = run[1], run[2], run[3]
        cache = self.piece_cache
        pieces = self.fast_pattern.findall(text)
        get = cache.get
        parts = [get(p) for p in pieces]
        if None in parts:
            if len(cache) > 200_000:
                cache.clear()
            model, table = self.backend.model, self.byte_table
            for n, piece in enumerate(pieces):
                if parts[n] is None:
                    mapped = "".join(table[b] for b in piece.encode("utf-8"))
                    parts[n] = cache[piece] = [t.id for t in model.tokenize(mapped)]
        ids = [i for part in parts for i in part]
        if len(starts) == 1:
            return ids, [run_roles[0]] * len(ids), [run_turns[0]] * len(ids)
        ends = list(accumulate(map(len, pieces)))
        counts = [0, *accumulate(map(len, parts))]  # tokens before piece n
        roles: list[str] = []
        turns: list[int] = []
        first = 0  # first piece of the current segment
        for k in range(len(starts)):
            stop = starts[k + 1] if k + 1 < len(starts) else len(text)
            last = bisect_right(ends, stop)  # pieces [first, last) end at or before `stop`
            if last < len(ends) and (ends[last - 1] if last else 0) != stop:
                return None  # a pre-token spans two segments: let the offsets path decide
            count = counts[last] - counts[first]
            roles += [run_roles[k]] * count
            turns += [run_turns[k]] * count
            first = last
        return ids, roles, turns

    def _rust_runs(self, runs: list[list[Any]], items: list[Any], results: dict) -> None:
        """Tokenize runs with the backend copy; per-token roles from character offsets."""
        from bisect import bisect_right

        at_start = items[0][3] if items and items[0][0] is None else None
        trick = [self.newline_trick and run is not at_start for run in runs]
        texts = [("\n" if t else "") + "".join(run[0]) for run, t in zip(runs, trick)]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        for run, enc, use_trick in zip(runs, encodings, trick):
            run_ids, offsets, shift = enc.ids, enc.offsets, 0
            if use_trick:
                n = len(self.newline_ids)
                if run_ids[:n] == self.newline_ids:
                    run_ids, offsets, shift = run_ids[n:], offsets[n:], 1
                else:  # the newline merged with the text: encode it alone instead
                    enc = self.backend.encode("".join(run[0]), add_special_tokens=False)
                    run_ids, offsets = enc.ids, enc.offsets
            starts, run_roles, run_turns = run[1], run[2], run[3]
            if len(starts) == 1:
                results[id(run)] = (run_ids, [run_roles[0]] * len(run_ids), [run_turns[0]] * len(run_ids))
                continue
            roles: list[str] = []
            turns: list[int] = []
            for begin, _end in offsets:
                k = bisect_right(starts, begin - shift) - 1
                k = 0 if k < 0 else k
                roles.append(run_roles[k])
                turns.append(run_turns[k])
            results[id(run)] = (run_ids, roles, turns)


_ENCODERS: dict[int, tuple[Any, int, _SegmentEncoder]] = {}


def segment_encoder(tokenizer: Any) -> _SegmentEncoder:
    """The cached per-tokenizer encoder (rebuilt when the tokenizer's added tokens change)."""
    import weakref

    key = id(tokenizer)
    size = len(getattr(tokenizer, "added_tokens_encoder", {}))
    entry = _ENCODERS.get(key)
    if entry is not None and entry[0]() is tokenizer and entry[1] == size:
        return entry[2]
    encoder = _SegmentEncoder(tokenizer)
    try:
        ref = weakref.ref(tokenizer, lambda _r, k=key, cache=_ENCODERS: cache.pop(k, None))
    except TypeError:  # not weak-referenceable: keep a strong reference
        ref = (lambda t=tokenizer: t)
    _ENCODERS[key] = (ref, size, encoder)
    return encoder


def encode_segments(segments: Sequence[Segment], tokenizer: Any, *, messages: Sequence[dict] = (),
                    text: str | None = None) -> Encoded:
    """Tokenize rendered segments into an `Encoded`, never producing a control token from content.

    Text between the template's control tokens is tokenized as one run (so ids equal
    tokenizing the whole rendered text, whenever content holds no control-token strings);
    each token takes the role/turn of the segment where it starts. Literal segments are never
    matched against the tokenizer's added tokens.
    """
    ids, roles, turns = segment_encoder(tokenizer).encode(segments)
    if text is None:
        text = "".join(seg.text for seg in segments)
    return Encoded(ids, roles, turns, text, list(messages))
