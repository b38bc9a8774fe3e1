"""Bad and dropped data rows, the same for every stage: `bad_rows: error | skip`, the count of
every dropped row per reason, and encoding through `datasets.Dataset.map`.

- :class:`BadRowsSettings`: the two fields every stage's settings share (`bad_rows`,
  `max_bad_fraction`).
- :func:`bad_row`: a DataError that says why its row is bad (:data:`REASONS`).
- :class:`DroppedRows`: the rows a stage dropped from one source, counted per reason, with the
  first few row numbers (the user's file lines); one warning line, the metrics and the checks of
  `max_bad_fraction` and "no row left".
- :func:`map_rows`: a per-row encoder run by `Dataset.map` (Arrow-backed, `num_proc` optional);
  under `error` the first bad row raises its one-line DataError, under `skip` bad rows are
  filtered out and counted.

Light module: `datasets` is imported inside the functions, no torch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from ..errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = ["BAD_ROW_MODES", "BadRowsSettings", "DroppedRows", "REASONS", "bad_row", "map_rows",
           "reason_of"]

BAD_ROW_MODES = ("error", "skip")

#: why a row is dropped: the first three are bad rows (`bad_rows` decides: error or skip; they
#: count towards `max_bad_fraction`); truncated rows are always dropped and counted
REASONS = {
    "invalid": "schema, roles or a forged turn marker (the template rejects the conversation)",
    "empty_answer": "an assistant turn with nothing in it",
    "no_trained_token": "the masking strategy trains no token of the row",
    "truncated": "no trained token left within max_length",
}
#: reasons that are not bad rows (dropped whatever `bad_rows` says)
NOT_BAD = frozenset({"truncated"})
#: how many row numbers per reason the warning, the metrics and the errors name
FIRST_ROWS = 5

# bookkeeping columns of a mapped dataset
ROW, REASON, MESSAGE = "row", "drop_reason", "drop_message"


@dataclass
class BadRowsSettings:
    """What to do with a bad data row (every stage's settings inherit these two fields)."""

    #: `error`: the first bad row (schema, roles, forged turn marker, empty answer) stops the
    #: stage with one error line naming it; `skip`: bad rows are dropped, counted per reason
    #: and named (the first few) in one warning line
    bad_rows: str = "error"
    #: with `bad_rows: skip`, still fail when more than this fraction (0-1) of the rows is bad
    max_bad_fraction: float = 0.01

    def check_bad_rows(self) -> None:
        """ConfigError for a bad `bad_rows` or `max_bad_fraction`."""
        if self.bad_rows not in BAD_ROW_MODES:
            raise ConfigError(f"bad_rows: expected one of {', '.join(BAD_ROW_MODES)}, got "
                              f"{self.bad_rows!r}")
        value = self.max_bad_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"max_bad_fraction: expected a number in [0, 1], got {value!r}")


def bad_row(message: str, reason: str) -> DataError:
    """A DataError for a bad row that says why (`reason`, one of :data:`REASONS`)."""
    exc = DataError(message)
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def reason_of(exc: BaseException) -> str:
    """Why `exc`'s row is bad (`invalid` unless :func:`bad_row` said otherwise)."""
    return getattr(exc, "reason", None) or "invalid"


@dataclass
class DroppedRows:
    """The rows dropped from one source (`where`): counts per reason, first row numbers."""

    where: str
    #: rows the source held (the denominator of `max_bad_fraction`)
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[int]] = field(default_factory=dict)
    #: the error message of the first bad row (what `bad_rows: error` would have said)
    first_error: str | None = None

    def add(self, reason: str, row: int, message: str | None = None) -> None:
        """Count one dropped row (its user number `row`)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        rows = self.first.setdefault(reason, [])
        if len(rows) < FIRST_ROWS and row not in rows:
            rows.append(row)
        if message and reason not in NOT_BAD and self.first_error is None:
            self.first_error = message

    @property
    def dropped(self) -> int:
        """How many rows were dropped, all reasons."""
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        """How many rows were bad (dropped under `bad_rows: skip`)."""
        return sum(n for reason, n in self.counts.items() if reason not in NOT_BAD)

    def describe(self) -> str:
        """``invalid 2 (rows 4, 9), truncated 1 (row 3)``."""
        parts = []
        for reason in sorted(self.counts):
            rows = self.first.get(reason, [])
            more = ", ..." if self.counts[reason] > len(rows) else ""
            noun = "row" if len(rows) == 1 and not more else "rows"
            parts.append(f"{reason} {self.counts[reason]} ({noun} "
                         f"{', '.join(map(str, rows))}{more})")
        return ", ".join(parts)

    def warn(self) -> None:
        """Log the drops in one warning line (nothing when no row was dropped)."""
        if self.dropped:
            first = f"; first: {self.first_error}" if self.first_error else ""
            logger.warning("%s: dropped %d of %d rows: %s%s", self.where, self.dropped, self.total,
                           self.describe(), first)

    def metrics(self, prefix: str = "") -> dict[str, Any]:
        """``{prefix}dropped_rows`` (all reasons), ``{prefix}dropped`` (per reason) and
        ``{prefix}dropped_first_rows`` (the first row numbers per reason)."""
        return {f"{prefix}dropped_rows": self.dropped,
                f"{prefix}dropped": dict(sorted(self.counts.items())),
                f"{prefix}dropped_first_rows": {k: list(v) for k, v in sorted(self.first.items())}}

    def check(self, max_bad_fraction: float) -> None:
        """DataError when more than `max_bad_fraction` of the rows were bad."""
        if self.bad and self.bad > max_bad_fraction * self.total:
            bad = {k: n for k, n in self.counts.items() if k not in NOT_BAD}
            detail = DroppedRows(self.where, self.total, bad,
                                 {k: v for k, v in self.first.items() if k in bad}).describe()
            raise DataError(f"{self.where}: {self.bad} of {self.total} rows are bad, more than "
                            f"max_bad_fraction={max_bad_fraction}: {detail}; first: "
                            f"{self.first_error}")


def _empty(feature: Any) -> Any:
    """A placeholder value of `feature` for a dropped row (removed before anyone sees it)."""
    from datasets import Value

    if isinstance(feature, Value):
        return False if feature.dtype == "bool" else "" if feature.dtype == "string" else 0
    return []


def _scratch_file() -> str:
    """Where `Dataset.map` writes the encoded rows of an on-disk dataset: a temporary folder
    removed at exit, never the user's dataset folder (its default) nor the HF cache."""
    import atexit
    import os
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="rlhf-plugins-encoded-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "encoded.arrow")


def map_rows(rows: "Iterable[Mapping[str, Any]] | Dataset", encode: Callable[[Any], list[dict]],
             features: Mapping[str, Any], *, where: str, bad_rows: str = "error",
             max_bad_fraction: float = 0.01, num_proc: int | None = None,
             drop: Callable[[dict], str | None] | None = None,
             desc: str = "Encoding rows") -> tuple["Dataset", DroppedRows]:
    """`encode(row)` (-> a list of feature dicts) over every row, through `Dataset.map`.

    `rows` is a `datasets.Dataset` (mapped as it is, Arrow-backed) or any iterable of rows.
    Returns the encoded rows (`features` + a `row` column: the row's user number, see
    :func:`~rlhf_plugins.guard.row_number`) and what was dropped. A bad row (a DataError from
    `encode`, named with its place by :func:`~rlhf_plugins.guard.row_errors`) raises under
    `bad_rows: error` and is dropped and counted under `skip`; `drop(encoded)` names a reason
    to drop an encoded row whatever `bad_rows` says (truncation). DataError when more than
    `max_bad_fraction` of the rows are bad or none is left; a component's failure
    (ComponentError) always raises.
    """
    from datasets import Dataset, Features, Value

    from ..guard import row_errors, row_number

    if isinstance(rows, Dataset):
        base, source = rows, None
    else:
        source = rows if isinstance(rows, Sequence) else list(rows)
        base = Dataset.from_dict({"_index": list(range(len(source)))})
    total = len(base)
    names = list(features)
    # in-process: stop at the first bad row; worker processes record it (raised in row order)
    raise_early = bad_rows == "error" and (num_proc is None or num_proc <= 1)

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in names + [ROW, REASON, MESSAGE]}

        def put(values: Mapping[str, Any], number: int, reason: str = "", message: str = "") -> None:
            for name in names:
                out[name].append(values[name] if name in values else _empty(features[name]))
            out[ROW].append(number)
            out[REASON].append(reason)
            out[MESSAGE].append(message)

        columns = list(batch)
        for k, index in enumerate(indices):
            row = source[index] if source is not None else {c: batch[c][k] for c in columns}
            number = row_number(where, index)
            place = f"{where} row {number}"
            try:
                with row_errors(place):
                    if not isinstance(row, Mapping):
                        raise DataError(f"expected a mapping, got {type(row).__name__}")
                    encoded = encode(row)
            except DataError as exc:
                if raise_early:
                    raise
                put({}, number, reason_of(exc), str(exc))
                continue
            for item in encoded:
                why = drop(item) if drop is not None else None
                put(item if not why else {}, number, why or "")
        return out

    import datasets as hf

    bars = hf.is_progress_bar_enabled()
    if total < 2000:
        hf.disable_progress_bars()
    try:
        mapped = base.map(encode_batch, with_indices=True, batched=True,
                          remove_columns=base.column_names, num_proc=num_proc,
                          cache_file_name=_scratch_file() if base.cache_files else None,
                          features=Features({**features, ROW: Value("int64"), REASON: Value("string"),
                                             MESSAGE: Value("string")}),
                          desc=desc, load_from_cache_file=False)
    finally:
        if bars and total < 2000:
            hf.enable_progress_bars()
    drops = DroppedRows(where, total)
    reasons = mapped[REASON]
    dropped_at = [i for i, reason in enumerate(reasons) if reason]
    if dropped_at:
        picked = mapped.select(dropped_at)
        for reason, number, message in zip(picked[REASON], picked[ROW], picked[MESSAGE]):
            if bad_rows == "error" and reason not in NOT_BAD:
                raise DataError(message)  # a worker's bad row: the first one, in row order
            drops.add(reason, number, message)
        kept = set(dropped_at)
        mapped = mapped.select([i for i in range(len(reasons)) if i not in kept])
    drops.check(max_bad_fraction)
    return mapped.remove_columns([REASON, MESSAGE]), drops
