"""Built-in reward functions (family ``reward_functions``), with TRL's call signature.

``f(prompts, completions, **columns) -> list[float | None]``: completions may be strings or
conversational (``[{"role": "assistant", "content": ...}]``, as TRL passes them). Each component
is an :class:`rlhf_plugins.sdk.RewardFunction` (options are dataclass fields, range checks in
``validate_options``; ``__name__`` comes from the base: TRL logs ``rewards/<__name__>/mean``). Extra keyword arguments TRL passes (``completion_ids``,
``trainer_state``, ``log_metric`` ...) are accepted and ignored unless used.

- ``exact_answer``: 1.0 when the completion's final answer equals the ``answer`` column
  numerically, else 0.0; ``None`` where the row has no reference answer. Understands the
  synthetic task's ``The answer is 12.`` line, GSM8K's ``#### 12`` and ``\\boxed{12}``; the last
  such marker in the completion counts.
- ``format``: 1.0 when the completion ends with a well-formed final-answer line, else 0.0.
- ``length_penalty``: ``-scale * max(0, length - target) / target`` (``two_sided``: ``|length -
  target|``), length in characters, words or tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from rlhf_plugins import DataError, hookimpl
from rlhf_plugins.sdk import RewardFunction, completion_text, option

# A number as models write it: sign, optional $, thousands separators, decimals or a fraction.
NUMBER = r"[-+−]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(NUMBER)
ANSWER_PATTERNS: dict[str, re.Pattern[str]] = {
    # "The answer is 12." (the synthetic task's final line); tolerate ':' and markdown bold
    "answer_line": re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*\**\s*(" + NUMBER + r")",
                              re.IGNORECASE),
    "gsm8k": re.compile(r"####\s*\**\s*(" + NUMBER + r")"),
    "boxed": re.compile(r"\\boxed\{\s*(" + NUMBER + r")\s*\}"),
}
FINAL_LINE_PATTERNS: dict[str, re.Pattern[str]] = {
    "answer_line": re.compile(r"The answer is (?:" + NUMBER + r")\.?"),
    "gsm8k": re.compile(r"####\s*(?:" + NUMBER + r")"),
}


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number string (``1,234``, ``-3.5``, ``$12``, ``3/4``), or None."""
    text = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    if not text:
        return None
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(Fraction(num), Fraction(den)) if Fraction(den) != 0 else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str, *, fallback_last_number: bool = False) -> Fraction | None:
    """The final answer of a completion: the value after its last answer marker, or None.

    Markers: ``The answer is N``, ``#### N`` and ``\\boxed{N}``. With ``fallback_last_number``
    a completion without a marker is read as its last number.
    """
    best: tuple[int, str] | None = None
    for pattern in ANSWER_PATTERNS.values():
        for match in pattern.finditer(text):
            if best is None or match.start() > best[0]:
                best = (match.start(), match.group(1))
    if best is None and fallback_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            best = (0, numbers[-1])
    return parse_number(best[1]) if best is not None else None


def parse_reference(value: Any) -> Fraction | None:
    """A reference answer from a dataset column: a number, a number string or a GSM8K solution."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"reference answer {value!r} is a boolean, not a number")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"reference answer {value!r} is not finite")
        return Fraction(value)
    text = str(value).strip()
    if not text:
        return None
    if "####" in text:  # a full GSM8K solution: the answer follows the last ####
        text = text.rsplit("####", 1)[1]
    parsed = parse_number(text)
    if parsed is None:
        parsed = extract_answer(text)
    if parsed is None:
        raise ValueError(f"reference answer {value!r} is not a number")
    return parsed


@dataclass(frozen=True)
class ExactAnswer(RewardFunction):
    """Verifiable exact-answer reward: 1.0 if the final answer equals the reference, else 0.0."""

    answer_column: str = option("answer", help="the dataset column with the reference answers")
    tolerance: float = option(1e-6, help="relative tolerance (times max(1, |reference|))")
    fallback_last_number: bool = option(False, help="read a completion without an answer marker "
                                                    "as its last number")

    name: ClassVar[str] = "exact_answer"
    description: ClassVar[str] = ("1.0 if the final answer ('The answer is N.', '#### N', "
                                  "\\boxed{N}) equals the 'answer' column, else 0.0")

    def validate_options(self) -> None:
        if not self.answer_column:
            raise ValueError(f"answer_column must be a column name, got {self.answer_column!r}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be a number >= 0, got {self.tolerance!r}")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        answers = columns.get(self.answer_column)
        if answers is None:
            given = ", ".join(sorted(k for k in columns if k not in _TRL_EXTRAS)) or "none"
            raise DataError(f"reward function 'exact_answer' needs the {self.answer_column!r} "
                            f"column (reference answers); columns given: {given}")
        if isinstance(answers, (str, bytes)) or len(answers) != len(completions):
            raise DataError(f"reward function 'exact_answer': column {self.answer_column!r} "
                            f"must have one value per completion ({len(completions)})")
        out: list[float | None] = []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            try:
                ref = parse_reference(answer)
            except ValueError as exc:
                raise DataError(f"reward function 'exact_answer', row {i}: {exc}") from None
            if ref is None:
                out.append(None)
                continue
            got = extract_answer(completion_text(completion),
                                 fallback_last_number=self.fallback_last_number)
            ok = got is not None and abs(float(got - ref)) <= self.tolerance * max(1.0, abs(float(ref)))
            out.append(1.0 if ok else 0.0)
        return out


_TRL_EXTRAS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


@dataclass(frozen=True)
class FormatReward(RewardFunction):
    """1.0 when the completion ends with a well-formed final-answer line, else 0.0."""

    style: str = option("answer_line", help="the final line: 'answer_line' (The answer is N.), "
                                            "'gsm8k' (#### N) or 'any'")
    min_steps: int = option(0, help="blank-line separated steps needed before the final line")

    name: ClassVar[str] = "format"
    description: ClassVar[str] = ("1.0 if the completion ends with a final-answer line "
                                  "('The answer is N.' or '#### N'), else 0.0")
    STYLES: ClassVar[tuple[str, ...]] = ("answer_line", "gsm8k", "any")

    def validate_options(self) -> None:
        if self.style not in self.STYLES:
            raise ValueError(f"style must be one of {', '.join(self.STYLES)}, got {self.style!r}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {self.min_steps!r}")

    def check(self, text: str) -> bool:
        """Whether `text` ends with the answer line (after at least `min_steps` blank-line steps)."""
        lines = [line.strip() for line in text.strip().splitlines()]
        if not lines or not lines[-1]:
            return False
        styles = ("answer_line", "gsm8k") if self.style == "any" else (self.style,)
        if not any(FINAL_LINE_PATTERNS[s].fullmatch(lines[-1]) for s in styles):
            return False
        if self.min_steps:
            body = text.strip()[: -len(lines[-1])]
            steps = [block for block in re.split(r"\n\s*\n", body) if block.strip()]
            return len(steps) >= self.min_steps
        return True

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [1.0 if self.check(completion_text(c)) else 0.0 for c in completions]


@dataclass(frozen=True)
class LengthPenalty(RewardFunction):
    """``-scale * max(0, length - target) / target`` (or ``|length - target|`` when two-sided)."""

    target: float = option(200, help="the length without penalty (> 0)")
    scale: float = option(1.0, help="penalty per target-length of excess")
    unit: str = option("chars", help="how length is counted: 'chars', 'words' or 'tokens' "
                                     "(completion_ids)")
    two_sided: bool = option(False, help="also penalise completions shorter than target")

    name: ClassVar[str] = "length_penalty"
    description: ClassVar[str] = ("-scale * max(0, length - target) / target; length in "
                                  "chars, words or tokens")
    UNITS: ClassVar[tuple[str, ...]] = ("chars", "words", "tokens")

    def validate_options(self) -> None:
        for key in ("target", "scale"):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target!r}")
        if self.unit not in self.UNITS:
            raise ValueError(f"unit must be one of {', '.join(self.UNITS)}, got {self.unit!r}")

    def penalty(self, length: float) -> float:
        """The reward for a completion of `length` units."""
        excess = abs(length - self.target) if self.two_sided else max(0.0, length - self.target)
        return -self.scale * excess / self.target + 0.0  # + 0.0: no negative zero

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        if self.unit == "tokens":
            ids = columns.get("completion_ids")
            if ids is None or len(ids) != len(completions):
                raise DataError("reward function 'length_penalty' with unit='tokens' needs the "
                                "'completion_ids' column (TRL passes it), one entry per completion")
            lengths = [len(x) for x in ids]
        elif self.unit == "words":
            lengths = [len(completion_text(c).split()) for c in completions]
        else:
            lengths = [len(completion_text(c)) for c in completions]
        return [self.penalty(n) for n in lengths]


BUILTIN_REWARD_FUNCTIONS = (ExactAnswer(), FormatReward(), LengthPenalty())


@hookimpl
def register_reward_functions(register):
    """Register the built-in reward functions."""
    for func in BUILTIN_REWARD_FUNCTIONS:
        register(func)
