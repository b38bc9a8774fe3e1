"""The built-in synthetic verifiable task: short arithmetic and percentage word problems.

Deterministic by seed, no downloads. One :class:`Problem` is the source of truth for every
dataset the pipeline needs; a worked solution is a list of steps joined by a blank line
(``STEP_SEPARATOR``), and its last step is always ``The answer is N.`` (``ANSWER_TEMPLATE``),
which the ``exact_answer`` reward function parses. Example (the course notes' PRM example)::

    What is 15% of 80?

    15% = 0.15.

    0.15 * 80 = 12.

    The answer is 12.

Errors are injected at a known computation step: that step's result is off by a small amount
and later steps compute correctly from the wrong value, so the final answer is wrong and the
first wrong step is known exactly.

Splits: every problem's arithmetic (kind + numbers) is hashed into a bucket; ``train``,
``validation`` and ``test`` own disjoint buckets, so no problem of one split ever appears in
another, whatever the seeds.

Dataset builders return Hugging Face ``datasets.Dataset`` objects (imported lazily); prompts
and completions are conversational (TRL's format): ``prompt = [{"role": "user", ...}]``,
completions ``[{"role": "assistant", ...}]``. The ``*_rows`` functions return plain lists of
dicts (what the CLI writes as JSONL).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..cache import atomic_write_lines, atomic_write_text
from ..errors import ConfigError

ANSWER_TEMPLATE = "The answer is {}."
STEP_SEPARATOR = "\n\n"
INSTRUCTION = 'Solve step by step. End with "The answer is <number>."'
SPLITS: dict[str, range] = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
HELD_OUT_SPLIT = "test"

# step kinds: "calc" computes a value (errors are injected here), "fact" is a correct
# non-arithmetic step, "note" restates the question (neutral, PRM label 0), "answer" is the end.
STEP_LABEL_CORRECT, STEP_LABEL_NEUTRAL, STEP_LABEL_WRONG = 1, 0, -1

_NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Eva")
_ITEMS = ("apples", "pens", "books", "coins", "cards", "stickers", "marbles", "shells")
_GOODS = ("shirt", "lamp", "bike", "game", "jacket", "chair", "watch", "bag")
_RAMBLE_OPEN = ("Hmm, let me think about this question for a moment.",
                "Okay, let me read the question again carefully.",
                "Let me think about what the question is asking first.")
_RAMBLE_MID = ("Let me double-check that step again to be sure.",
               "I think that is right, but let me make sure.",
               "Okay, that seems correct so far.")
_ERROR_DELTAS = (-10, -2, -1, 1, 2, 10)


def fmt_number(value: Fraction | int) -> str:
    """A value as the solutions write it: integers plainly, other values as decimals or a/b."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:  # a terminating decimal
        text = f"{float(value):.10f}".rstrip("0").rstrip(".")
        return text
    return f"{value.numerator}/{value.denominator}"


def answer_line(value: Fraction | int) -> str:
    """The final line of a solution, e.g. ``The answer is 12.``."""
    return ANSWER_TEMPLATE.format(fmt_number(value))


class _Writer:
    """Writes solution steps, injecting an arithmetic error at step `error_step` (by `delta`)."""

    def __init__(self, error_step: int | None = None, delta: int = 0) -> None:
        self.steps: list[str] = []
        self.kinds: list[str] = []
        self.error_step = error_step
        self.delta = delta

    def note(self, text: str) -> None:
        self.steps.append(text)
        self.kinds.append("note")

    def fact(self, text: str) -> None:
        self.steps.append(text)
        self.kinds.append("fact")

    def calc(self, expression: str, value: Fraction | int) -> Fraction:
        value = Fraction(value)
        if len(self.steps) == self.error_step:
            value += self.delta
        self.steps.append(f"{expression} = {fmt_number(value)}.")
        self.kinds.append("calc")
        return value

    def finish(self, value: Fraction) -> tuple[tuple[str, ...], tuple[str, ...], Fraction]:
        self.steps.append(answer_line(value))
        self.kinds.append("answer")
        return tuple(self.steps), tuple(self.kinds), value


# --- problem kinds: (sample numbers, write the question, write the solution) -------------

def _add_numbers(rng: random.Random) -> tuple[int, ...]:
    return rng.randint(2, 99), rng.randint(2, 99)


def _add_solve(v: Sequence[int], w: _Writer) -> Fraction:
    a, b = v
    return w.calc(f"{a} + {b}", a + b)


def _sub_numbers(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(10, 99)
    return a, rng.randint(1, a - 1)


def _sub_solve(v: Sequence[int], w: _Writer) -> Fraction:
    a, b = v
    return w.calc(f"{a} - {b}", a - b)


def _mul_numbers(rng: random.Random) -> tuple[int, ...]:
    return rng.randint(2, 12), rng.randint(2, 50)


def _mul_solve(v: Sequence[int], w: _Writer) -> Fraction:
    a, b = v
    return w.calc(f"{a} * {b}", a * b)


def _two_step_numbers(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return a, b, rng.randint(1, a + b - 1)


def _two_step_solve(v: Sequence[int], w: _Writer) -> Fraction:
    a, b, c = v
    s = w.calc(f"{a} + {b}", a + b)
    return w.calc(f"{fmt_number(s)} - {c}", s - c)


def _percent_pair(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    while True:  # integer results only: p * n divisible by 100
        p, n = 5 * rng.randint(1, 19), rng.randint(low, high)
        if p * n % 100 == 0:
            return p, n


def _percent_numbers(rng: random.Random) -> tuple[int, ...]:
    return _percent_pair(rng, 4, 200)


def _percent_solve(v: Sequence[int], w: _Writer) -> Fraction:
    p, n = v
    rate = Fraction(p, 100)
    w.fact(f"{p}% = {fmt_number(rate)}.")
    return w.calc(f"{fmt_number(rate)} * {n}", rate * n)


def _discount_numbers(rng: random.Random) -> tuple[int, ...]:
    p, price = _percent_pair(rng, 4, 300)
    return p, price


def _discount_solve(v: Sequence[int], w: _Writer) -> Fraction:
    p, price = v
    d = w.calc(f"{price} * {p} / 100", Fraction(price * p, 100))
    return w.calc(f"{price} - {fmt_number(d)}", price - d)


def _question(kind: str, v: Sequence[int], rng: random.Random) -> tuple[str, str]:
    """(question, restating note or '') for a problem of `kind` with numbers `v`."""
    name, item, good = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_GOODS)
    if kind == "add":
        return (f"{name} has {v[0]} {item} and gets {v[1]} more. How many does {name} have "
                f"now?", f"{name} starts with {v[0]} {item} and gets {v[1]} more.")
    if kind == "sub":
        return (f"{name} has {v[0]} {item} and gives away {v[1]}. How many {item} are left?",
                f"{name} starts with {v[0]} {item} and gives away {v[1]}.")
    if kind == "mul":
        return (f"There are {v[0]} boxes with {v[1]} {item} each. How many {item} are there "
                f"in total?", f"There are {v[0]} boxes of {v[1]} {item}.")
    if kind == "two_step":
        return (f"{name} has {v[0]} {item}, gets {v[1]} more and then gives away {v[2]}. How "
                f"many {item} are left?", "")
    if kind == "percent":
        return f"What is {v[0]}% of {v[1]}?", ""
    if kind == "discount":
        return (f"A {good} costs {v[1]} dollars and is {v[0]}% off. What is the sale price in "
                f"dollars?", "")
    raise ConfigError(f"unknown synthetic problem kind {kind!r}")


_KINDS: dict[str, tuple[Callable[[random.Random], tuple[int, ...]],
                        Callable[[Sequence[int], _Writer], Fraction]]] = {
    "add": (_add_numbers, _add_solve),
    "sub": (_sub_numbers, _sub_solve),
    "mul": (_mul_numbers, _mul_solve),
    "two_step": (_two_step_numbers, _two_step_solve),
    "percent": (_percent_numbers, _percent_solve),
    "discount": (_discount_numbers, _discount_solve),
}
KINDS: tuple[str, ...] = tuple(_KINDS)


@dataclass(frozen=True)
class Problem:
    """One synthetic problem: question, numbers, the worked solution and the answer."""

    uid: str
    kind: str
    numbers: tuple[int, ...]
    question: str
    note: str
    steps: tuple[str, ...]
    step_kinds: tuple[str, ...]
    answer: int
    split: str

    @property
    def prompt_text(self) -> str:
        """The user message: the question plus the answer-format instruction."""
        return f"{self.question} {INSTRUCTION}"

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversational prompt (TRL format)."""
        return [{"role": "user", "content": self.prompt_text}]

    @property
    def solution(self) -> str:
        """The correct worked solution (steps joined by a blank line)."""
        return STEP_SEPARATOR.join(self.steps)

    @property
    def error_steps(self) -> tuple[int, ...]:
        """Indices of the computation steps where an error can be injected."""
        return tuple(i for i, k in enumerate(self.step_kinds) if k == "calc")

    def corrupted(self, step: int, delta: int) -> tuple[str, ...]:
        """The steps with an arithmetic error of `delta` at `step`, propagated to the answer."""
        if step not in self.error_steps:
            raise ConfigError(f"problem {self.uid}: step {step} is not a computation step "
                              f"(choose from {list(self.error_steps)})")
        if delta == 0:
            raise ConfigError("an injected error needs a non-zero delta")
        steps, _, _ = _solve(self.kind, self.numbers, self.note, error_step=step, delta=delta)
        return steps

    def wrong_answer(self, step: int, delta: int) -> Fraction:
        """The final answer of the solution with an error of `delta` at `step`."""
        _, _, value = _solve(self.kind, self.numbers, self.note, error_step=step, delta=delta)
        return value

    def step_labels(self, error_step: int | None = None) -> list[int]:
        """PRM labels: +1 correct, 0 neutral restatement, -1 from the first wrong step on."""
        labels = []
        for i, kind in enumerate(self.step_kinds):
            if error_step is not None and i >= error_step:
                labels.append(STEP_LABEL_WRONG)
            elif kind == "note":
                labels.append(STEP_LABEL_NEUTRAL)
            else:
                labels.append(STEP_LABEL_CORRECT)
        return labels

    def rambling(self, rng: random.Random) -> tuple[str, ...]:
        """A correct but rambling solution (filler sentences around the same steps)."""
        steps = list(self.steps)
        steps.insert(rng.randint(1, len(steps) - 1), rng.choice(_RAMBLE_MID))
        steps.insert(0, rng.choice(_RAMBLE_OPEN))
        return tuple(steps)

    def unsupported(self, rng: random.Random) -> tuple[str, ...]:
        """Correct steps whose final answer line states another number (it does not follow)."""
        deltas = [d for d in _ERROR_DELTAS if self.answer + d > 0]
        return self.steps[:-1] + (answer_line(self.answer + rng.choice(deltas)),)

    def to_dict(self) -> dict[str, Any]:
        """The problem as a JSON-able row."""
        return {"uid": self.uid, "kind": self.kind, "split": self.split,
                "question": self.question, "prompt": self.prompt, "answer": str(self.answer),
                "steps": list(self.steps), "solution": self.solution}


def _solve(kind: str, numbers: Sequence[int], note: str, *, error_step: int | None = None,
           delta: int = 0) -> tuple[tuple[str, ...], tuple[str, ...], Fraction]:
    writer = _Writer(error_step, delta)
    if note:
        writer.note(note)
    value = _KINDS[kind][1](numbers, writer)
    return writer.finish(value)


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def _check_split(split: str) -> range:
    if split not in SPLITS:
        raise ConfigError(f"unknown synthetic split {split!r} (expected one of {', '.join(SPLITS)})")
    return SPLITS[split]


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"number of synthetic problems must be an integer >= 0, got {n!r}")
    return n


def _key(kind: str, numbers: Sequence[int]) -> str:
    return f"{kind}:{','.join(map(str, numbers))}"


def split_of(kind: str, numbers: Sequence[int]) -> str:
    """The split that owns the problem (`kind`, `numbers`): train, validation or test."""
    bucket = _bucket(_key(kind, numbers))
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def make_problem(kind: str, numbers: Sequence[int], rng: random.Random | None = None) -> Problem:
    """The problem of `kind` with `numbers` (e.g. ``make_problem("percent", (15, 80))``)."""
    if kind not in _KINDS:
        raise ConfigError(f"unknown synthetic problem kind {kind!r} (expected one of {', '.join(KINDS)})")
    numbers = tuple(int(x) for x in numbers)
    key = _key(kind, numbers)
    question, note = _question(kind, numbers, rng or random.Random(key))
    steps, step_kinds, value = _solve(kind, numbers, note)
    if value.denominator != 1:
        raise ConfigError(f"synthetic problem {key} has a non-integer answer ({fmt_number(value)})")
    uid = f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return Problem(uid=uid, kind=kind, numbers=numbers, question=question, note=note, steps=steps,
                   step_kinds=step_kinds, answer=value.numerator, split=split_of(kind, numbers))


def generate_problems(n: int, seed: int = 0, split: str = "train",
                      kinds: Iterable[str] | None = None) -> list[Problem]:
    """`n` distinct problems of `split`, deterministic for (`n`, `seed`, `split`, `kinds`)."""
    n = _check_n(n)
    buckets = _check_split(split)
    kinds = tuple(kinds) if kinds is not None else KINDS
    for kind in kinds:
        if kind not in _KINDS:
            raise ConfigError(f"unknown synthetic problem kind {kind!r} "
                              f"(expected some of {', '.join(KINDS)})")
    if not kinds:
        raise ConfigError("no synthetic problem kinds selected")
    rng = random.Random(f"problems:{seed}:{split}:{','.join(kinds)}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ConfigError(f"could not find {n} distinct {split} problems of kinds "
                              f"{', '.join(kinds)}; ask for fewer")
        kind = rng.choice(kinds)
        numbers = _KINDS[kind][0](rng)
        key = _key(kind, numbers)
        if key in seen or _bucket(key) not in buckets:
            continue
        seen.add(key)
        out.append(make_problem(kind, numbers, rng))
    return out


def _rng(name: str, seed: int, split: str) -> random.Random:
    return random.Random(f"{name}:{seed}:{split}")


def _inject(problem: Problem, rng: random.Random) -> tuple[int, int]:
    """A random (error step, delta) for `problem` whose wrong values stay positive."""
    step = rng.choice(problem.error_steps)
    deltas = list(_ERROR_DELTAS)
    rng.shuffle(deltas)
    for delta in deltas:
        if problem.wrong_answer(step, delta) > 0:
            return step, delta
    return step, 1


def _assistant(steps: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": STEP_SEPARATOR.join(steps)}]


def _base(problem: Problem) -> dict[str, Any]:
    return {"uid": problem.uid, "kind": problem.kind, "answer": str(problem.answer)}


# --- rows ---------------------------------------------------------------------------------

def problem_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: uid, kind, split, question, prompt, answer, steps, solution."""
    return [p.to_dict() for p in generate_problems(n, seed, split)]


def sft_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: ``messages`` (user question, assistant worked solution), uid, kind, answer."""
    return [{"messages": p.prompt + _assistant(p.steps), **_base(p)}
            for p in generate_problems(n, seed, split)]


def _check_fractions(**fractions: float) -> None:
    """ConfigError unless every named value is a fraction in [0, 1]."""
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def preference_rows(n: int, seed: int = 0, split: str = "train", rambling_fraction: float = 0.25,
                    unsupported_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Rows: prompt, chosen (correct), rejected, rejected_kind, error_step.

    Rejected kinds: ``rambling`` (correct, with filler sentences), ``unsupported`` (correct
    steps, but the final answer line states another number; error_step = the answer line) and
    ``error`` (an arithmetic error carried to the answer) for the rest.
    """
    _check_fractions(rambling_fraction=rambling_fraction, unsupported_fraction=unsupported_fraction)
    if rambling_fraction + unsupported_fraction > 1.0 + 1e-9:  # they split one draw
        raise ConfigError(f"rambling_fraction + unsupported_fraction must be at most 1, got "
                          f"{rambling_fraction + unsupported_fraction!r}")
    rng = _rng("preference", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        draw = rng.random()
        if draw < rambling_fraction:
            rejected, kind, error_step = p.rambling(rng), "rambling", -1
        elif draw < rambling_fraction + unsupported_fraction:
            rejected, kind, error_step = p.unsupported(rng), "unsupported", len(p.steps) - 1
        else:
            error_step, delta = _inject(p, rng)
            rejected, kind = p.corrupted(error_step, delta), "error"
        rows.append({"prompt": p.prompt, "chosen": _assistant(p.steps),
                     "rejected": _assistant(rejected), "rejected_kind": kind,
                     "error_step": error_step, **_base(p)})
    return rows


RANKED_KINDS = {2: ("correct", "error"), 3: ("correct", "rambling", "error"),
                4: ("correct", "rambling", "error", "no_answer")}


def ranked_rows(n: int, seed: int = 0, split: str = "train", k: int = 4) -> list[dict[str, Any]]:
    """Rows: prompt, completions best->worst (correct, rambling, wrong, wrong without answer), completion_kinds."""
    if k not in RANKED_KINDS:
        raise ConfigError(f"ranked dataset: k must be 2, 3 or 4, got {k!r}")
    rng = _rng("ranked", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        error_step, delta = _inject(p, rng)
        wrong = p.corrupted(error_step, delta)
        candidates = {"correct": p.steps, "rambling": p.rambling(rng), "error": wrong,
                      "no_answer": wrong[:-1]}
        kinds = RANKED_KINDS[k]
        rows.append({"prompt": p.prompt, "completions": [_assistant(candidates[c]) for c in kinds],
                     "completion_kinds": list(kinds), **_base(p)})
    return rows


def outcome_rows(n: int, seed: int = 0, split: str = "train", correct_fraction: float = 0.5,
                 unsupported_fraction: float = 0.0, per_prompt: int = 1) -> list[dict[str, Any]]:
    """Rows: prompt, completion, label (1 correct final answer, 0 wrong), error_step (-1 if none).

    ``per_prompt`` candidates per problem (consecutive rows, same prompt: best-of-N metrics);
    a wrong candidate is ``unsupported`` (correct steps, another final number) with probability
    ``unsupported_fraction``, else an arithmetic error (column ``completion_kind``).
    """
    _check_fractions(correct_fraction=correct_fraction, unsupported_fraction=unsupported_fraction)
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ConfigError(f"per_prompt must be an integer >= 1, got {per_prompt!r}")
    rng = _rng("outcome", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        for _ in range(per_prompt):
            if rng.random() < correct_fraction:
                steps, label, error_step, kind = p.steps, 1, -1, "correct"
            elif unsupported_fraction and rng.random() < unsupported_fraction:
                steps, label, kind = p.unsupported(rng), 0, "unsupported"
                error_step = len(steps) - 1
            else:
                error_step, delta = _inject(p, rng)
                steps, label, kind = p.corrupted(error_step, delta), 0, "error"
            rows.append({"prompt": p.prompt, "completion": _assistant(steps), "label": label,
                         "error_step": error_step, "completion_kind": kind, **_base(p)})
    return rows


def step_rows(n: int, seed: int = 0, split: str = "train",
              error_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Rows: prompt, steps, labels (+1/0/-1 per step; -1 from the injected error on), error_step."""
    if not 0.0 <= error_fraction <= 1.0:
        raise ConfigError(f"error_fraction must be in [0, 1], got {error_fraction!r}")
    rng = _rng("step", seed, split)
    rows = []
    for p in generate_problems(n, seed, split):
        if rng.random() < error_fraction:
            error_step, delta = _inject(p, rng)
            steps = p.corrupted(error_step, delta)
        else:
            error_step, steps = -1, p.steps
        labels = p.step_labels(None if error_step < 0 else error_step)
        rows.append({"prompt": p.prompt, "steps": list(steps), "labels": labels,
                     "error_step": error_step, **_base(p)})
    return rows


def rl_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Rows: prompt (conversational, TRL format), answer (string), uid, kind."""
    return [{"prompt": p.prompt, **_base(p)} for p in generate_problems(n, seed, split)]


# --- datasets -----------------------------------------------------------------------------

def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def problems(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of problems: uid, kind, split, question, prompt, answer, steps, solution."""
    return _dataset(problem_rows(n, seed, split))


def sft_dataset(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of SFT conversations (``messages``) with worked solutions."""
    return _dataset(sft_rows(n, seed, split))


def preference_dataset(n: int, seed: int = 0, split: str = "train",
                       rambling_fraction: float = 0.25) -> Any:
    """`datasets.Dataset` of preference pairs: prompt, chosen (correct), rejected (wrong or rambling)."""
    return _dataset(preference_rows(n, seed, split, rambling_fraction))


def ranked_dataset(n: int, seed: int = 0, split: str = "train", k: int = 4) -> Any:
    """`datasets.Dataset` of rankings: prompt, completions ordered best to worst (k = 2..4)."""
    return _dataset(ranked_rows(n, seed, split, k))


def outcome_dataset(n: int, seed: int = 0, split: str = "train",
                    correct_fraction: float = 0.5) -> Any:
    """`datasets.Dataset` of outcome-labelled completions: prompt, completion, label (0/1)."""
    return _dataset(outcome_rows(n, seed, split, correct_fraction))


def step_dataset(n: int, seed: int = 0, split: str = "train", error_fraction: float = 0.5) -> Any:
    """`datasets.Dataset` of step-labelled solutions: prompt, steps, labels (+1/0/-1)."""
    return _dataset(step_rows(n, seed, split, error_fraction))


def rl_dataset(n: int, seed: int = 0, split: str = "train") -> Any:
    """`datasets.Dataset` of RL prompts (TRL conversational ``prompt``) with their ``answer``."""
    return _dataset(rl_rows(n, seed, split))


ROW_BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "problems": problem_rows,
    "sft": sft_rows,
    "preference": preference_rows,
    "ranked": ranked_rows,
    "outcome": outcome_rows,
    "step": step_rows,
    "rl": rl_rows,
}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write `rows` as JSON lines atomically (temp file + ``os.replace``); returns the row count."""
    return atomic_write_lines(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_synth(out_dir: str | os.PathLike, n: int = 1000, seed: int = 0,
                n_test: int | None = None,
                splits: Sequence[str] = ("train", "test")) -> dict[str, dict[str, Any]]:
    """Write every synthetic dataset as ``DIR/<name>_<split>.jsonl`` plus ``manifest.json``.

    ``n`` rows per dataset for ``train`` (and ``validation``), ``n_test`` (default
    ``max(1, n // 5)``) for ``test``. Returns ``{file name: {"dataset", "split", "rows", "path"}}``.
    """
    n = _check_n(n)
    n_test = max(1, n // 5) if n_test is None else _check_n(n_test)
    out_dir = Path(out_dir)
    summary: dict[str, dict[str, Any]] = {}
    for split in splits:
        _check_split(split)
        count = n_test if split == "test" else n
        for name, build in ROW_BUILDERS.items():
            path = out_dir / f"{name}_{split}.jsonl"
            rows = write_jsonl(path, build(count, seed, split))
            summary[path.name] = {"dataset": name, "split": split, "rows": rows, "path": str(path)}
    manifest = {"task": "rlhf_plugins.data.synth", "seed": seed, "n": n, "n_test": n_test,
                "answer_template": ANSWER_TEMPLATE, "step_separator": STEP_SEPARATOR,
                "files": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                          for k, v in summary.items()}}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return summary
