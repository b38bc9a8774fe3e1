"""A second entry point showing `override=True`: replaces the built-in `format` reward function."""
from __future__ import annotations

import re

from rlhf_plugins import hookimpl

from . import _text

ANSWER_LINE = re.compile(r"The answer is -?\d+(\.\d+)?\.\s*$")


def strict_format(prompts, completions, **columns) -> list[float]:
    """1.0 only when the completion's last line is exactly 'The answer is N.'"""
    return [1.0 if ANSWER_LINE.search(_text(c).strip()) else 0.0 for c in completions]


@hookimpl
def register_reward_functions(register):
    register(strict_format, name="format", override=True)
