"""The synthetic verifiable task's problems: kinds, worked solutions, splits, injected errors.

A :class:`Problem` is the source of truth for every dataset of :mod:`rlhf_plugins.data.synth`
(which documents the task); this module generates problems deterministically by seed.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

from ..errors import ConfigError

ANSWER_TEMPLATE = "The answer is {}."
#: a completed answer line (the number may hold '.', so the line ends at '.' + whitespace);
#: generation for evaluation stops there instead of repeating it until max_new_tokens
ANSWER_STOP_PATTERN = r"The answer is\s*\S+?\.(?=\s)"
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


def check_split(split: str) -> range:
    if split not in SPLITS:
        raise ConfigError(f"unknown synthetic split {split!r} (expected one of {', '.join(SPLITS)})")
    return SPLITS[split]


def check_n(n: Any) -> int:
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
    n = check_n(n)
    buckets = check_split(split)
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


def rng_for(name: str, seed: int, split: str) -> random.Random:
    return random.Random(f"{name}:{seed}:{split}")


def inject_error(problem: Problem, rng: random.Random) -> tuple[int, int]:
    """A random (error step, delta) for `problem` whose wrong values stay positive."""
    step = rng.choice(problem.error_steps)
    deltas = list(_ERROR_DELTAS)
    rng.shuffle(deltas)
    for delta in deltas:
        if problem.wrong_answer(step, delta) > 0:
            return step, delta
    return step, 1
