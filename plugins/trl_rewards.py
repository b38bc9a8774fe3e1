"""TRL's reward functions (``trl.rewards``) as components (family ``reward_functions``).

Each wraps the function TRL ships, so scores are TRL's own; registering them imports neither
torch nor TRL (TRL is imported at the first call).

- ``trl_accuracy``: ``accuracy_reward`` - 1.0 when math-verify finds the completion's answer
  equal to the ``solution`` column, else 0.0; ``None`` where the solution does not parse.
- ``trl_reasoning_accuracy``: ``reasoning_accuracy_reward`` - the same on the text after the
  reasoning delimiter (``</think>``); 0.0 when the reasoning never ends.
- ``trl_think_format``: ``think_format_reward`` - 1.0 for ``<think>...</think>`` then the answer.
- ``trl_soft_overlong``: ``get_soft_overlong_punishment`` (DAPO) - 0 up to
  ``max_completion_len - soft_punish_cache`` tokens, then down linearly to -1.
- ``trl_cosine_scaled``: ``get_cosine_scaled_reward`` - correctness (math-verify) scaled by the
  completion length on a cosine schedule (short correct answers earn most).
- ``trl_repetition_penalty``: ``get_repetition_penalty_reward`` - ``max_penalty`` times the
  fraction of repeated token n-grams.

The accuracy-based ones need the optional extra ``pip install 'rlhf-plugins[math]'``
(math-verify): without it they are a :class:`~rlhf_plugins.errors.ConfigError` when a config
names them (:meth:`check_requirements`), before any model loads. math-verify's timeouts use
``signal.alarm``, which only works in the main thread; TRL disables them in other threads, so
these functions also run from a thread pool (as async reward functions or a server would).
The token-based ones read ``completion_ids``, which TRL's trainers pass.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_plugins import ConfigError, DataError, hookimpl
from rlhf_plugins.sdk import RewardFunction, completion_text, option

MATH_EXTRA = "pip install 'rlhf-plugins[math]'  (or: pip install 'math-verify>=0.9')"


def _conversational(completions: list) -> list[list[dict[str, str]]]:
    """Completions as TRL's reward functions read them: one assistant message each."""
    return [[{"role": "assistant", "content": completion_text(c)}] for c in completions]


def _column(columns: dict[str, Any], key: str, n: int, name: str, why: str) -> list[Any]:
    values = columns.get(key)
    if values is None or isinstance(values, (str, bytes)) or len(values) != n:
        raise DataError(f"reward function {name!r} needs the {key!r} column ({why}), one entry "
                        f"per completion")
    return list(values)


@dataclass(frozen=True)
class _TrlReward(RewardFunction):
    """Shared: the math-verify requirement and TRL's import, both checked lazily."""

    needs_math_verify: ClassVar[bool] = False

    def check_requirements(self) -> None:
        """ConfigError when an optional package this function needs is missing."""
        if not self.needs_math_verify:
            return
        try:
            importlib.import_module("math_verify")  # only whether it imports
        except ImportError:
            raise ConfigError(f"reward function {self.name!r} needs math-verify, which is not "
                              f"installed: {MATH_EXTRA}") from None

    def _solutions(self, columns: dict[str, Any], n: int) -> list[str]:
        values = _column(columns, self.solution_column, n, self.name, "the reference solutions")
        return ["" if v is None else str(v) for v in values]

    def _ids(self, columns: dict[str, Any], n: int) -> list[list[int]]:
        return _column(columns, "completion_ids", n, self.name,
                       "token ids of each completion; TRL's trainers pass it")


@dataclass(frozen=True)
class TrlAccuracy(_TrlReward):
    """TRL's accuracy_reward: math-verify equality with the solution (None: unparseable solution)."""

    name: ClassVar[str] = "trl_accuracy"
    description: ClassVar[str] = ("TRL accuracy_reward: 1.0 when math-verify finds the answer equal "
                                  "to the solution column (needs rlhf-plugins[math])")
    needs_math_verify: ClassVar[bool] = True

    solution_column: str = option("solution", help="the column holding the reference solution")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        self.check_requirements()
        from trl.rewards import accuracy_reward

        return accuracy_reward(_conversational(completions), self._solutions(columns, len(completions)))


@dataclass(frozen=True)
class TrlReasoningAccuracy(_TrlReward):
    """TRL's reasoning_accuracy_reward: accuracy of the text after the reasoning delimiter."""

    name: ClassVar[str] = "trl_reasoning_accuracy"
    description: ClassVar[str] = ("TRL reasoning_accuracy_reward: accuracy after the reasoning "
                                  "delimiter (</think>); 0.0 when reasoning never ends")
    needs_math_verify: ClassVar[bool] = True

    solution_column: str = option("solution", help="the column holding the reference solution")
    reasoning_delimiters: tuple[str, ...] = option(("</think>",), help="strings that end the reasoning")

    def validate_options(self) -> None:
        """At least one non-empty delimiter."""
        if not self.reasoning_delimiters or not all(isinstance(d, str) and d for d in self.reasoning_delimiters):
            raise ValueError("reasoning_delimiters must be a non-empty list of strings")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        self.check_requirements()
        from trl.rewards import reasoning_accuracy_reward

        return reasoning_accuracy_reward(_conversational(completions),
                                         self._solutions(columns, len(completions)),
                                         reasoning_delimiters=list(self.reasoning_delimiters))


@dataclass(frozen=True)
class TrlThinkFormat(_TrlReward):
    """TRL's think_format_reward: 1.0 for `<think>...</think>` followed by the answer."""

    name: ClassVar[str] = "trl_think_format"
    description: ClassVar[str] = "TRL think_format_reward: 1.0 when reasoning is enclosed in <think>...</think>"

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        from trl.rewards import think_format_reward

        return think_format_reward(_conversational(completions))


@dataclass(frozen=True)
class TrlSoftOverlong(_TrlReward):
    """TRL's soft overlong punishment (DAPO): 0, then linearly down to -1 near the length limit."""

    name: ClassVar[str] = "trl_soft_overlong"
    description: ClassVar[str] = ("TRL soft overlong punishment (DAPO): 0 up to max_completion_len - "
                                  "soft_punish_cache tokens, then down to -1")

    max_completion_len: int = option(512, help="L_max: the completion length limit in tokens")
    soft_punish_cache: int = option(128, help="L_cache: the soft zone before L_max, in tokens")

    def validate_options(self) -> None:
        """0 <= soft_punish_cache <= max_completion_len, max_completion_len > 0."""
        if self.max_completion_len < 1:
            raise ValueError(f"max_completion_len must be >= 1, got {self.max_completion_len}")
        if not 0 <= self.soft_punish_cache <= self.max_completion_len:
            raise ValueError("soft_punish_cache must be in [0, max_completion_len], got "
                             f"{self.soft_punish_cache}")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        from trl.rewards import get_soft_overlong_punishment

        fn = get_soft_overlong_punishment(self.max_completion_len, self.soft_punish_cache)
        return fn(self._ids(columns, len(completions)))


@dataclass(frozen=True)
class TrlCosineScaled(_TrlReward):
    """TRL's cosine-scaled reward: correctness (math-verify) scaled by length on a cosine."""

    name: ClassVar[str] = "trl_cosine_scaled"
    description: ClassVar[str] = ("TRL cosine-scaled reward: correctness scaled by completion length "
                                  "on a cosine schedule (needs rlhf-plugins[math])")
    needs_math_verify: ClassVar[bool] = True

    max_len: int = option(512, help="L_max: the length (tokens) normalising the cosine schedule")
    min_value_wrong: float = option(-1.0, help="reward of a wrong completion at the shortest length")
    max_value_wrong: float = option(-0.5, help="reward of a wrong completion at the longest length")
    min_value_correct: float = option(0.5, help="reward of a correct completion at the longest length")
    max_value_correct: float = option(1.0, help="reward of a correct completion at the shortest length")
    solution_column: str = option("solution", help="the column holding the reference solution")

    def validate_options(self) -> None:
        """max_len >= 1 and finite values."""
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        for key in ("min_value_wrong", "max_value_wrong", "min_value_correct", "max_value_correct"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key} must be finite")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        self.check_requirements()
        from trl.rewards import get_cosine_scaled_reward

        fn = get_cosine_scaled_reward(self.max_len, self.min_value_wrong, self.max_value_wrong,
                                      self.min_value_correct, self.max_value_correct)
        n = len(completions)
        return fn(_conversational(completions), self._solutions(columns, n), self._ids(columns, n))


@dataclass(frozen=True)
class TrlRepetitionPenalty(_TrlReward):
    """TRL's repetition penalty: max_penalty x the fraction of repeated token n-grams."""

    name: ClassVar[str] = "trl_repetition_penalty"
    description: ClassVar[str] = ("TRL repetition penalty: max_penalty times the fraction of repeated "
                                  "token n-grams (completion_ids)")

    ngram_size: int = option(3, help="n of the token n-grams")
    max_penalty: float = option(-1.0, help="the penalty of a fully repetitive completion (<= 0)")

    def validate_options(self) -> None:
        """ngram_size >= 1, max_penalty <= 0."""
        if self.ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {self.ngram_size}")
        if not math.isfinite(self.max_penalty) or self.max_penalty > 0:
            raise ValueError(f"max_penalty must be a finite number <= 0, got {self.max_penalty}")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        from trl.rewards import get_repetition_penalty_reward

        fn = get_repetition_penalty_reward(self.ngram_size, self.max_penalty)
        return fn(self._ids(columns, len(completions)))


TRL_REWARD_FUNCTIONS = (TrlAccuracy(), TrlReasoningAccuracy(), TrlThinkFormat(), TrlSoftOverlong(),
                        TrlCosineScaled(), TrlRepetitionPenalty())


@hookimpl
def register_reward_functions(register):
    """Register TRL's reward functions (imports neither TRL nor torch)."""
    for func in TRL_REWARD_FUNCTIONS:
        register(func)
