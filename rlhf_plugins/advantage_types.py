"""The result type of advantage estimators (torch-free, so plugin modules can import it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Advantages:
    """What an advantage estimator returns.

    ``advantages``: [B] for sequence-level estimators given [B] rewards, [B, T] for token-level
    ones (and for sequence-level ones given [B, T] rewards). ``returns``: [B, T] value targets for
    the critic, or None when the estimator uses no critic. Both are detached from the graph.
    """

    advantages: Any
    returns: Any = None

    @property
    def token_level(self) -> bool:
        """Whether `advantages` is per token ([B, T]) rather than per sequence ([B])."""
        return getattr(self.advantages, "dim", lambda: 1)() == 2
